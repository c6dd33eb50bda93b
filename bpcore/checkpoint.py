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
import math
import os
import secrets
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._array import nested_leaves, nested_unflatten
from .activations import ACTIVATIONS
from .errors import CheckpointError, ShapeError
from .losses import LOSSES
from .mlp import MLP, param_shapes, params_from_dict, shape_mismatches
from .optim import OPTIMIZERS, SCHEDULES, GradientTransformation
from .preprocess import Standardize, from_spec

__all__ = ["save", "load", "load_checkpoint", "Checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
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
        """Your own ``metadata`` dict, as given to :func:`save` (JSON values)."""
        return self.meta.get("user", {})

    @property
    def preprocessing(self) -> Standardize | None:
        """The input preprocessing saved with the model (None if there was none)."""
        return from_spec(self.meta.get("preprocessing"), self.model.sizes[0])

    def preprocess(self, X: Any) -> np.ndarray:
        """``X`` as the model was trained on it: the saved preprocessing applied, if any."""
        pre = self.preprocessing
        return np.asarray(X) if pre is None else pre(X)

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
            try:
                hyper["lr"] = SCHEDULES[kind](**args)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"optimizer: bad schedule settings {args} for "
                                      f"{kind!r}: {e}") from None
        elif lr == "schedule":
            raise CheckpointError("optimizer: the checkpoint used a custom learning-rate "
                                  "schedule, which cannot be rebuilt by name; pass the "
                                  "optimizer yourself")
        try:
            if name == "momentum":
                hyper["beta"] = hyper.pop("momentum")
            return OPTIMIZERS[name](**hyper)
        except (TypeError, ValueError, KeyError) as e:  # ConfigError is a ValueError
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
    """The file's bytes: safetensors' own writer, with bpcore's description as metadata.

    ``meta`` gains ``sha256``, the checksum of the tensor data (every byte after the header).
    """
    from safetensors.numpy import save as st_save

    arrays = {}
    for name, a in tensors.items():
        a = np.ascontiguousarray(a) if np.ndim(a) else np.asarray(a).reshape(())
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if np.dtype(a.dtype) not in _CODES:
            raise CheckpointError(f"save: tensor {name!r} has dtype {a.dtype}, which a bpcore "
                                  "checkpoint cannot hold")
        arrays[name] = a
    draft = st_save(arrays)  # once for the data's checksum, then with it in the header
    (n,) = struct.unpack("<Q", draft[:8])
    meta = dict(meta, sha256=hashlib.sha256(draft[8 + n:]).hexdigest())
    return st_save(arrays, metadata={"format": "bpcore",
                                     "bpcore": json.dumps(meta, sort_keys=True)})


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _remove_dead_writers_leftovers(path: str) -> None:
    """Delete temporary files that writers on this host left when they died mid-save.

    A temporary file is ``.NAME.HOST.PID.TOKEN.tmp``; one whose process no longer exists is
    garbage. Those of live writers (concurrent saves) and of other hosts are left alone.
    """
    folder, prefix = os.path.dirname(path), _temp_prefix(path)
    host = socket.gethostname()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix):-len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive (or alive under another user: PermissionError below)
        except ProcessLookupError:
            pass
        except (PermissionError, OSError):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def _atomic_write(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that a crash leaves the old file or the new one.

    The new file's mode is the old file's when there is one, else what the umask gives
    (as for any file the user writes).
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"save: folder {folder!r} does not exist; create it first")
    _remove_dead_writers_leftovers(path)
    tmp = os.path.join(folder, f"{_temp_prefix(path)}{socket.gethostname()}.{os.getpid()}."
                               f"{secrets.token_hex(4)}.tmp")
    try:
        old_mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        old_mode = None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            if old_mode is not None:
                os.fchmod(f.fileno(), old_mode)
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
         extra: dict | None = None, preprocessing: Standardize | None = None) -> None:
    """Write ``model`` (and optionally optimizer state) to ``path`` atomically.

    ``metadata`` is any JSON-serialisable dict of your own, returned as
    ``load_checkpoint(path).metadata``. ``preprocessing`` (a
    :class:`~bpcore.preprocess.Standardize`) is what was done to the inputs before training;
    ``load_checkpoint(path).preprocess(X)`` does it again. A failed save leaves any existing
    file at ``path`` untouched.
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
        "user": metadata or {},
        "preprocessing": None if preprocessing is None else preprocessing.to_spec(),
        **(extra or {}),
    }
    _atomic_write(path, _encode(tensors, meta))


def _read(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and validated bpcore metadata of the file at ``path``; any defect of the file
    (or a file that is no file) is a :class:`CheckpointError`, never another exception."""
    where = f"load {path!r}"
    for _ in range(5):  # another process may replace the file while we read it: read again
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
        except FileNotFoundError:
            raise CheckpointError(f"load: no checkpoint at {path!r}") from None
        except IsADirectoryError:
            raise CheckpointError(f"load: {path!r} is a folder, not a checkpoint file") from None
        except OSError as e:
            raise CheckpointError(f"{where}: cannot be read ({e})") from None
        try:
            got = _read_open_file(path, fd, where)
        finally:
            os.close(fd)
        if got is not None:
            return got
    raise CheckpointError(f"{where}: the file kept changing while it was read (another "
                          "process is writing it); try again")


def _read_open_file(path: str, fd: int, where: str):
    """:func:`_read` on the file ``fd`` holds open; None if ``path`` stopped being that file."""
    from safetensors import SafetensorError, safe_open

    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"load: {path!r} is a folder, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
        raise CheckpointError(f"{where}: not a regular file (a pipe, socket or device); a "
                              "checkpoint is a file written by bpcore.save")
    if st.st_size < 8:
        raise CheckpointError(f"{where}: truncated ({st.st_size} bytes; a safetensors file "
                              "starts with an 8-byte header length)")

    def same_file() -> bool:  # our open file pins its inode, which therefore is never reused
        try:
            now = os.stat(path)
        except OSError:
            return False
        return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)

    if not same_file():
        return None
    try:
        # safetensors' reader checks the header (size, JSON, dtypes, shapes, offsets that
        # tile the data exactly) on a memory map: a file larger or smaller than its header
        # says is refused without reading the data.
        with safe_open(path, framework="numpy") as f:
            md = f.metadata() or {}
            if md.get("format") != "bpcore" or "bpcore" not in md:
                raise CheckpointError(
                    f"{where}: not a bpcore checkpoint (a safetensors file without bpcore's "
                    "metadata; foreign files cannot be loaded as models)")
            meta = _parse_meta(md["bpcore"], where)
            expected = _expected_tensors(meta)
            names = set(f.keys())
            if names - set(expected):
                raise CheckpointError(f"{where}: unexpected tensors {sorted(names - set(expected))}"
                                      f"; a model of sizes {meta['sizes']} holds "
                                      f"{sorted(expected)}")
            tensors = {name: f.get_tensor(name) for name in expected if name in names}
        if not same_file():
            return None
        _check_sha256(fd, meta["sha256"], where)  # the very file safetensors read
    except CheckpointError:
        raise
    except SafetensorError as e:
        raise CheckpointError(f"{where}: corrupted or truncated: not a valid safetensors file "
                              f"({e})") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot be read ({e})") from None
    except Exception as e:  # whatever else a crafted file provokes: still the file's fault
        raise CheckpointError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
    return tensors, meta


def _check_sha256(fd: int, want: str, where: str) -> None:
    """Compare the checksum of the tensor data, read in blocks (never all at once)."""
    h = hashlib.sha256()
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    pos = 8 + n
    while block := os.pread(fd, 1 << 20, pos):
        h.update(block)
        pos += len(block)
    if h.hexdigest() != want:
        raise CheckpointError(f"{where}: the tensor data does not match its checksum; the "
                              "file is truncated or corrupted")


def _is_int(v: Any, lo: int = 0, hi: int = 2**62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (what it must be, test); fields not listed are optional extras of a newer writer
_FIELDS = {
    "format_version": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "sizes": ("a list of 2 to 10000 layer widths in [1, 2**31]",
              lambda v: isinstance(v, list) and 2 <= len(v) <= 10000 and
              all(_is_int(n, 1, 2**31) for n in v)),
    "activations": ("a list of activation names", lambda v: isinstance(v, list) and
                    all(isinstance(a, str) for a in v)),
    "dtype": ("'float32' or 'float64'", lambda v: v in ("float32", "float64")),
    "loss": ("a loss name or null", lambda v: v is None or isinstance(v, str)),
    "step": ("a non-negative integer", _is_int),
    "epoch": ("a non-negative integer", _is_int),
    "n_optimizer_tensors": ("an integer in [0, 100000]", lambda v: _is_int(v, 0, 100000)),
    "optimizer": ("null or an object with a name and hyper-parameters",
                  lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("name"), str)
                                          and isinstance(v.get("hyper", {}), dict))),
    "user": ("an object", lambda v: isinstance(v, dict)),
    "sha256": ("a hex digest", lambda v: isinstance(v, str) and len(v) == 64),
    "clip_norm": ("null or a positive number", lambda v: v is None or (_is_number(v) and v > 0)),
    "check_finite": ("true or false", lambda v: isinstance(v, bool)),
    "divergence_factor": ("null or a number > 1",
                          lambda v: v is None or (_is_number(v) and v > 1)),
    "ref_loss": ("null or a number", lambda v: v is None or _is_number(v)),
    "preprocessing": ("null or an object", lambda v: v is None or isinstance(v, dict)),
}
_REQUIRED = ("format_version", "sizes", "activations", "dtype", "sha256")
_DEFAULTS = {"loss": None, "step": 0, "epoch": 0, "n_optimizer_tensors": 0, "optimizer": None,
             "user": {}}


def _parse_meta(text: str, where: str) -> dict:
    """bpcore's metadata, checked field by field: right JSON types, sane values, known names."""
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise CheckpointError(f"{where}: corrupted bpcore metadata ({type(e).__name__})") \
            from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: corrupted bpcore metadata (a JSON "
                              f"{type(meta).__name__}, expected an object)")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: the bpcore metadata lacks {missing}")
    meta = {**_DEFAULTS, **meta}
    for key, (want, ok) in _FIELDS.items():
        if key in meta and not ok(meta[key]):
            shown = repr(meta[key])
            raise CheckpointError(f"{where}: metadata field {key!r} must be {want}, got "
                                  f"{shown[:80] + '...' if len(shown) > 80 else shown}")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{where}: written by a newer bpcore (format "
                              f"{meta['format_version']}); upgrade bpcore to read it")
    sizes, acts = meta["sizes"], meta["activations"]
    unknown = [a for a in acts if a not in ACTIVATIONS]
    if unknown or len(acts) != len(sizes) - 1:
        raise CheckpointError(f"{where}: activations {acts[:10]} do not fit sizes {sizes[:10]} "
                              f"or name unknown ones {unknown[:10]}; valid: {sorted(ACTIVATIONS)}")
    if meta["loss"] is not None and meta["loss"] not in LOSSES:
        raise CheckpointError(f"{where}: unknown loss {meta['loss']!r}")
    return meta


def _expected_tensors(meta: dict) -> dict[str, tuple[int, ...] | None]:
    """Name -> shape of every tensor the metadata describes (None: any shape)."""
    out: dict[str, tuple[int, ...] | None] = dict(param_shapes(meta["sizes"]))
    for i in range(meta["n_optimizer_tensors"]):
        out[f"opt.{i}"] = None
    return out


def load_checkpoint(path: str | os.PathLike, backend: Any = "numpy",
                    dtype: str | None = None) -> Checkpoint:
    """Read a checkpoint; the model is rebuilt on ``backend`` (any backend, any saved one).

    A checkpoint is untrusted input: whatever is wrong with the file (not a file, truncated,
    corrupted, crafted) gives a :class:`~bpcore.errors.CheckpointError` saying what.
    """
    path = os.fspath(path)
    tensors, meta = _read(path)
    where = f"load {path!r}"
    sizes, acts, saved_dtype = meta["sizes"], meta["activations"], meta["dtype"]
    problems = shape_mismatches(tensors, sizes)
    if problems:
        raise CheckpointError(f"{where}: tensor shape mismatch: " + "; ".join(problems))
    not_float = [n for n, a in tensors.items() if not n.startswith("opt.") and
                 a.dtype.kind != "f"]
    if not_float:
        raise CheckpointError(f"{where}: parameters {not_float} are not floating point")
    params = params_from_dict(tensors, len(sizes) - 1)
    try:
        model = MLP(sizes, acts[:-1], acts[-1], backend=backend, dtype=dtype or saved_dtype,
                    params=params,
                    task=None if meta["loss"] is None else LOSSES[meta["loss"]].targets)
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
