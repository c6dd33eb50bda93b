"""Checkpoints in the safetensors format, written atomically, read without executing anything.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}``, then the
raw little-endian tensor bytes. bpcore writes the parameters as ``W1, b1, ...``, optimizer
state leaves as ``opt.0, opt.1, ...`` and puts its own description (layer sizes, activation,
loss and optimizer *names*, dtype, step, epoch, version, a SHA-256 of the data) as one JSON
string under ``__metadata__["bpcore"]``. Files open in any safetensors reader.

Safety: names read from a file are only looked up in bpcore's registries; nothing is
imported, evaluated or unpickled. Writes go to a temporary file in the destination folder,
are flushed and fsynced, then ``os.replace``d over the target, and the folder is fsynced:
a crash at any point leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._array import nested_leaves, nested_unflatten
from .activations import ACTIVATIONS
from .errors import CheckpointError, ShapeError
from .losses import LOSSES
from .mlp import MLP
from .optim import OPTIMIZERS, SCHEDULES, GradientTransformation

__all__ = ["save", "load", "load_checkpoint", "Checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MAX_HEADER = 64 * 1024 * 1024
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, with the model already on the requested backend."""

    model: MLP
    meta: dict
    optimizer_state: list[np.ndarray] = field(default_factory=list)  # flat leaves, host

    @property
    def metadata(self) -> dict:
        return self.meta.get("user", {})

    def build_optimizer(self) -> GradientTransformation | None:
        """The optimizer described in the file, rebuilt from bpcore's registry (or None)."""
        spec = self.meta.get("optimizer")
        if not spec:
            return None
        name, hyper = spec["name"], dict(spec.get("hyper", {}))
        if name not in OPTIMIZERS:
            raise CheckpointError(f"optimizer: {name!r} in the checkpoint is not one of "
                                  f"bpcore's {sorted(OPTIMIZERS)}")
        lr = hyper.get("lr")
        if isinstance(lr, dict):
            kind = lr.get("schedule")
            if kind not in SCHEDULES:
                raise CheckpointError(f"optimizer: learning-rate schedule {kind!r} is not one "
                                      f"of {sorted(SCHEDULES)}")
            args = {k: v for k, v in lr.items() if k != "schedule"}
            hyper["lr"] = SCHEDULES[kind](**args)
        elif lr == "schedule":
            raise CheckpointError("optimizer: the checkpoint used a custom learning-rate "
                                  "schedule, which cannot be rebuilt by name; pass the "
                                  "optimizer yourself")
        if name == "momentum":
            hyper["beta"] = hyper.pop("momentum")
        try:
            return OPTIMIZERS[name](**hyper)
        except TypeError as e:
            raise CheckpointError(f"optimizer: bad settings {hyper} for {name!r}: {e}") from None

    def restore_state(self, template: Any) -> Any:
        """The optimizer state, shaped like ``template`` (from ``optimizer.init``), on device."""
        leaves = nested_leaves(template)
        if len(leaves) != len(self.optimizer_state):
            raise CheckpointError(
                f"optimizer state: the checkpoint has {len(self.optimizer_state)} tensors, the "
                f"optimizer expects {len(leaves)}; was it saved with another optimizer?")
        bad = [f"opt.{i}: expected {tuple(t.shape)}, got {a.shape}"
               for i, (t, a) in enumerate(zip(leaves, self.optimizer_state))
               if tuple(t.shape) != a.shape]
        if bad:
            raise CheckpointError("optimizer state shape mismatch: " + "; ".join(bad))
        be = self.model.backend
        return nested_unflatten(template, [be.asarray(a, dtype=t.dtype)
                                           for t, a in zip(leaves, self.optimizer_state)])


def _encode(tensors: dict[str, np.ndarray], meta: dict) -> bytes:
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name, a in tensors.items():
        a = np.asarray(a, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = _CODES.get(np.dtype(a.dtype))
        if code is None:
            raise CheckpointError(f"save: tensor {name!r} has dtype {a.dtype}, which the "
                                  "safetensors format cannot hold")
        raw = a.tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    meta = dict(meta, sha256=hashlib.sha256(data).hexdigest())
    header["__metadata__"] = {"format": "bpcore", "bpcore": json.dumps(meta, sort_keys=True)}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(hb)) + hb + data


def _atomic_write(path: str, payload: bytes) -> None:
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"save: folder {folder!r} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems cannot fsync a directory; the file is already safe
        pass


def save(path: str | os.PathLike, model: MLP, optimizer_state: Any = None,
         metadata: dict | None = None, *, optimizer: GradientTransformation | None = None,
         loss: str | None = None, step: int = 0, epoch: int = 0,
         extra: dict | None = None) -> None:
    """Write ``model`` (and optionally optimizer state) to ``path`` atomically.

    ``metadata`` is any JSON-serialisable dict of your own, returned by :func:`load_checkpoint`.
    A failed save leaves any existing file at ``path`` untouched.
    """
    path = os.fspath(path)
    for k, act in enumerate(model.activations, start=1):
        if ACTIVATIONS.get(act.name) is not act:
            raise CheckpointError(f"save: layer {k} uses a custom activation {act.name!r}; "
                                  "only activations from bpcore.ACTIVATIONS can be saved by "
                                  "name")
    if loss is not None and loss not in LOSSES:
        raise CheckpointError(f"save: unknown loss {loss!r}")
    try:
        json.dumps(metadata or {})
    except TypeError as e:
        raise CheckpointError(f"metadata: must be JSON-serialisable ({e})") from None
    tensors = model.state_dict()
    opt_leaves = [] if optimizer_state is None else nested_leaves(optimizer_state)
    for i, leaf in enumerate(opt_leaves):
        tensors[f"opt.{i}"] = model.backend.to_numpy(leaf)
    from . import __version__

    meta = {
        "format_version": FORMAT_VERSION, "bpcore_version": __version__,
        "sizes": model.sizes, "activations": model.activation_names,
        "dtype": model.dtype_name, "loss": loss, "step": int(step), "epoch": int(epoch),
        "n_optimizer_tensors": len(opt_leaves),
        "optimizer": (None if optimizer is None else
                      {"name": optimizer.name, "hyper": optimizer.hyper}),
        "user": metadata or {}, **(extra or {}),
    }
    _atomic_write(path, _encode(tensors, meta))


def _read(path: str) -> tuple[dict[str, np.ndarray], dict]:
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"load: no checkpoint at {path!r}") from None
    except IsADirectoryError:
        raise CheckpointError(f"load: {path!r} is a folder, not a checkpoint file") from None
    where = f"load {path!r}"
    if len(blob) < 8:
        raise CheckpointError(f"{where}: truncated ({len(blob)} bytes; a safetensors file "
                              "starts with an 8-byte header length)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise CheckpointError(f"{where}: header length {n} does not fit the file's "
                              f"{len(blob)} bytes; the file is truncated or not safetensors")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: corrupted header ({e})") from None
    md = header.pop("__metadata__", None) or {}
    if md.get("format") != "bpcore" or "bpcore" not in md:
        raise CheckpointError(f"{where}: not a bpcore checkpoint (a safetensors file without "
                              "bpcore's metadata; foreign files cannot be loaded as models)")
    try:
        meta = json.loads(md["bpcore"])
    except ValueError as e:
        raise CheckpointError(f"{where}: corrupted bpcore metadata ({e})") from None
    data = blob[8 + n:]
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{where}: the tensor data does not match its checksum; the "
                              "file is truncated or corrupted")
    tensors = {}
    for name, info in header.items():
        try:
            dt = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in info["shape"])
            lo, hi = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed entry "
                                  f"{info!r}") from None
        if not (0 <= lo <= hi <= len(data)) or hi - lo != int(np.prod(shape)) * dt.itemsize:
            raise CheckpointError(f"{where}: tensor {name!r} ({info['dtype']} {list(shape)}) "
                                  f"does not fit bytes [{lo}, {hi}) of {len(data)}")
        tensors[name] = np.frombuffer(data, dtype=dt, count=int(np.prod(shape)),
                                      offset=lo).reshape(shape).astype(dt.newbyteorder("="))
    return tensors, meta


def load_checkpoint(path: str | os.PathLike, backend: Any = "numpy",
                    dtype: str | None = None) -> Checkpoint:
    """Read a checkpoint; the model is rebuilt on ``backend`` (any backend, any saved one)."""
    path = os.fspath(path)
    tensors, meta = _read(path)
    where = f"load {path!r}"
    try:
        sizes = [int(s) for s in meta["sizes"]]
        acts = list(meta["activations"])
        saved_dtype = str(meta["dtype"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: the bpcore metadata lacks sizes/activations/dtype")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{where}: written by a newer bpcore (format "
                              f"{meta['format_version']}); upgrade bpcore to read it")
    unknown = [a for a in acts if a not in ACTIVATIONS]
    if unknown or len(acts) != len(sizes) - 1:
        raise CheckpointError(f"{where}: activations {acts} do not fit sizes {sizes} or name "
                              f"unknown ones {unknown}; valid: {sorted(ACTIVATIONS)}")
    if meta.get("loss") is not None and meta["loss"] not in LOSSES:
        raise CheckpointError(f"{where}: unknown loss {meta['loss']!r}")
    expected = {}
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        expected[f"W{k}"], expected[f"b{k}"] = (n_out, n_in), (n_out,)
    problems = [f"{name}: expected {want}, got "
                f"{tensors[name].shape if name in tensors else 'nothing (missing)'}"
                for name, want in expected.items()
                if name not in tensors or tensors[name].shape != want]
    if problems:
        raise CheckpointError(f"{where}: tensor shape mismatch: " + "; ".join(problems))
    params = [(tensors[f"W{k}"], tensors[f"b{k}"]) for k in range(1, len(sizes))]
    try:
        model = MLP(sizes, acts[:-1], acts[-1], backend=backend, dtype=dtype or saved_dtype,
                    params=params)
    except ShapeError as e:
        raise CheckpointError(f"{where}: {e}") from None
    n_opt = int(meta.get("n_optimizer_tensors", 0))
    opt = []
    for i in range(n_opt):
        if f"opt.{i}" not in tensors:
            raise CheckpointError(f"{where}: optimizer tensor opt.{i} is missing")
        opt.append(tensors[f"opt.{i}"])
    return Checkpoint(model, meta, opt)


def load(path: str | os.PathLike, backend: Any = "numpy", dtype: str | None = None) -> MLP:
    """The model stored at ``path``, on ``backend``. See :func:`load_checkpoint` for the rest."""
    return load_checkpoint(path, backend=backend, dtype=dtype).model
