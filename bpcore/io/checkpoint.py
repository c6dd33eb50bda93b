"""Checkpoints: the training state's tensors plus its config, in the safetensors format.

A file holds the parameters (``W1, b1, ...``), and for a training state also the optimizer
state (``opt.0, opt.1, ...``) and the step count, epoch and guard (``state.*``, 0-d), as
safetensors tensors. Its metadata ``__metadata__["bpcore"]`` is one JSON string: the format
version, the :class:`~bpcore.io.config.TrainConfig`, your own ``metadata`` and a SHA-256 of the
tensor data. Files open in any safetensors reader.

The ``safetensors`` library writes and parses the format (its reader validates an
untrusted header on a memory map); bpcore checks the rest — every field's type and value,
names only ever looked up in its registries, the checksum, every tensor's shape — and turns
anything wrong into a :class:`~bpcore.errors.CheckpointError`. Nothing is unpickled or
executed. Writing is atomic (:mod:`bpcore.io.files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._array import nested_leaves, nested_unflatten
from .files import atomic_write, read_consistent
from ..nn.activations import ACTIVATIONS
from .config import TrainConfig
from ..errors import CheckpointError, ConfigError, ShapeError
from ..nn.model import MLP, param_shapes, params_from_dict, shape_mismatches
from .preprocess import Standardize, from_spec

__all__ = ["save", "load", "load_checkpoint", "Checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 2  # 1: flat metadata and optimizer step counts (before TrainState)
_STATE = ("state.step", "state.epoch", "state.guard.bad_step", "state.guard.reason",
          "state.guard.ref_loss", "state.epoch_batch")
_OPTIONAL = ("state.epoch_batch",)  # absent from files written before it existed
_INT32_MAX = 2 ** 31 - 1  # the counters are int32 on the device
_CODES = {np.dtype(t) for t in (np.float64, np.float32, np.float16, np.int64, np.int32,
                                np.int16, np.int8, np.uint8, np.bool_)}


@dataclass
class Checkpoint:
    """What a checkpoint holds, with the model already on the requested backend."""

    model: MLP
    config: TrainConfig
    meta: dict                                  # the file's bpcore metadata, validated
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # optimizer and state, host

    @property
    def metadata(self) -> dict:
        """Your own ``metadata`` dict, as given when saving (JSON values)."""
        return self.meta["user"]

    @property
    def step(self) -> int:
        return int(self.tensors["state.step"]) if "state.step" in self.tensors else 0

    @property
    def epoch(self) -> int:
        return int(self.tensors["state.epoch"]) if "state.epoch" in self.tensors else 0

    @property
    def epoch_plan(self) -> tuple | None:
        """How ``fit`` batched the interrupted epoch: ``(rows, batch_size, drop_last, shuffle,
        seed)``; None when the state was saved between epochs."""
        plan = self.meta.get("epoch_plan")
        return None if plan is None else tuple(plan)

    @property
    def epoch_batch(self) -> int:
        """Batches of an unfinished epoch that ``fit`` had run when the state was saved (0:
        saved between epochs, and in files written before it was recorded)."""
        return int(self.tensors.get("state.epoch_batch", 0))

    @property
    def preprocessing(self) -> Standardize | None:
        """The input preprocessing saved with the model (None if there was none)."""
        return from_spec(self.config.preprocessing, self.model.sizes[0])

    def preprocess(self, X: Any) -> np.ndarray:
        """``X`` as the model was trained on it: the saved preprocessing applied, if any."""
        pre = self.preprocessing
        return np.asarray(X) if pre is None else pre(X)

    def require_state(self) -> None:
        """Raise :class:`CheckpointError` unless a training state can be resumed from here."""
        if self.meta["format_version"] < 2:
            raise CheckpointError(
                f"resume: written by an older format ({self.meta['format_version']}) of "
                "bpcore: its model loads (bpcore.load), but its optimizer state cannot be "
                "resumed by this version; continue from bpcore.Trainer(bpcore.load(path), ...)")
        if "state.step" not in self.tensors:
            raise CheckpointError("resume: the checkpoint holds a model only (bpcore.save), "
                                  "not a training state (Trainer.save)")

    def restore_state(self, template: Any) -> Any:
        """The saved :class:`~bpcore.training.step.TrainState`, shaped like ``template`` (a fresh
        state of the same model and optimizer), on the model's backend."""
        where = "resume"
        self.require_state()
        leaves = nested_leaves(template.opt_state)
        saved = [self.tensors[f"opt.{i}"] for i in range(self.meta["n_optimizer_tensors"])]
        if len(leaves) != len(saved):
            raise CheckpointError(
                f"{where}: the checkpoint has {len(saved)} optimizer tensors, the optimizer "
                f"expects {len(leaves)}; was it saved with another optimizer?")
        bad = [f"opt.{i}: expected {tuple(t.shape)}, got {a.shape}"
               for i, (t, a) in enumerate(zip(leaves, saved)) if tuple(t.shape) != a.shape]
        if bad:
            raise CheckpointError(f"{where}: optimizer state shape mismatch: " + "; ".join(bad))
        be = self.model.backend
        move = lambda a, like: be.asarray(np.asarray(a), dtype=like.dtype)  # noqa: E731
        g = template.guard
        return template._replace(
            params=self.model.params,
            opt_state=nested_unflatten(template.opt_state,
                                       [move(a, t) for a, t in zip(saved, leaves)]),
            step=move(self.tensors["state.step"], template.step),
            epoch=move(self.tensors["state.epoch"], template.epoch),
            guard=g._replace(bad_step=move(self.tensors["state.guard.bad_step"], g.bad_step),
                             reason=move(self.tensors["state.guard.reason"], g.reason),
                             ref_loss=move(self.tensors["state.guard.ref_loss"], g.ref_loss)))


# ---- writing ---------------------------------------------------------------------------------
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


def _write(path: Any, model: MLP, config: TrainConfig, tensors: dict, metadata: Any,
           params: dict | None = None, epoch_plan: list | None = None) -> None:
    for k, act in enumerate(model.activations, start=1):
        if ACTIVATIONS.get(act.name) is not act:
            raise CheckpointError(f"save: layer {k} uses a custom activation {act.name!r}; "
                                  "only activations from bpcore.ACTIVATIONS can be saved by "
                                  "name")
    try:
        json.dumps(metadata or {})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"metadata: must be JSON-serialisable ({e})") from None
    from .. import __version__

    meta = {"format_version": FORMAT_VERSION, "bpcore_version": __version__,
            "config": config.to_dict(), "user": metadata or {},
            "n_optimizer_tensors": sum(k.startswith("opt.") for k in tensors)}
    if epoch_plan is not None:  # how the interrupted epoch batches its data (see fit)
        meta["epoch_plan"] = list(epoch_plan)
    params = model.state_dict() if params is None else params  # host copies, taken whole
    atomic_write(os.fspath(path), _encode({**params, **tensors}, meta))


def save(path: str | os.PathLike, model: MLP, metadata: dict | None = None, *,
         preprocessing: Standardize | None = None) -> None:
    """Write ``model`` alone to ``path`` atomically (``Trainer.save`` adds the training state).

    ``metadata`` is any JSON-serialisable dict of your own, returned as
    ``load_checkpoint(path).metadata``. ``preprocessing`` (a
    :class:`~bpcore.io.preprocess.Standardize`) is what was done to the inputs before training;
    ``load_checkpoint(path).preprocess(X)`` does it again. A failed save leaves any existing
    file at ``path`` untouched.
    """
    config = TrainConfig(list(model.sizes), model.activation_names, model.dtype_name,
                         preprocessing=None if preprocessing is None else preprocessing.to_spec())
    _write(path, model, config, {}, metadata)


def save_state(path: Any, trainer: Any, *, metadata: dict | None = None,
               preprocessing: Standardize | None = None) -> None:
    """``Trainer.save``: the model, the whole training state and the trainer's config.

    The state is copied to the host under the trainer's step lock: one whole state, between
    two steps, even while ``fit`` runs in another thread (the in-place step overwrites its
    buffers). The file is then written from those copies alone."""
    to_np = trainer.model.backend.to_numpy
    with trainer._lock:
        state = trainer.state
        tensors = {f"opt.{i}": to_np(a) for i, a in enumerate(nested_leaves(state.opt_state))}
        for name, a in zip(_STATE, (state.step, state.epoch, *state.guard)):
            tensors[name] = to_np(a)
        tensors["state.epoch_batch"] = np.asarray(trainer.epoch_batch, dtype=np.int64)
        tensors = {k: np.array(a, copy=True) for k, a in tensors.items()}
        params = trainer.model.state_dict()  # copies too
        plan = trainer.epoch_plan if trainer.epoch_batch else None
    _write(path, trainer.model, TrainConfig.of(trainer, preprocessing), tensors, metadata,
           params, plan)


# ---- reading ---------------------------------------------------------------------------------
def _is_int(v: Any, lo: int = 0, hi: int = 2 ** 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _from_format_1(meta: dict, where: str) -> dict:
    """A format-1 description (flat fields) in today's shape; its state is not resumable."""
    for key, ok in (("step", _is_int), ("epoch", _is_int),
                    ("n_optimizer_tensors", lambda v: _is_int(v, 0, 100000)),
                    ("user", lambda v: isinstance(v, dict)),
                    ("optimizer", lambda v: v is None or isinstance(v, dict))):
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{where}: metadata field {key!r} is malformed: "
                                  f"{str(meta[key])[:80]}")
    config = {k: meta[k] for k in ("sizes", "activations", "dtype", "loss", "clip_norm",
                                   "check_finite", "divergence_factor", "preprocessing")
              if k in meta}
    return {"format_version": 1, "config": config, "user": meta.get("user", {}),
            "n_optimizer_tensors": meta.get("n_optimizer_tensors", 0), "sha256": meta["sha256"]}


def _parse_meta(text: str, where: str) -> tuple[dict, TrainConfig]:
    """bpcore's metadata, checked field by field: right JSON types, sane values, known names."""
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise CheckpointError(f"{where}: corrupted bpcore metadata ({type(e).__name__})") \
            from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: corrupted bpcore metadata (a JSON "
                              f"{type(meta).__name__}, expected an object)")
    version = meta.get("format_version")
    if not _is_int(version, 1):
        raise CheckpointError(f"{where}: metadata field 'format_version' must be an integer "
                              f">= 1, got {str(version)[:40]}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: written by a newer bpcore (format {version}); "
                              "upgrade bpcore to read it")
    if not (isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64):
        raise CheckpointError(f"{where}: metadata field 'sha256' must be a hex digest")
    if version == 1:
        meta = _from_format_1(meta, where)
    for key, ok in (("user", lambda v: isinstance(v, dict)),
                    ("n_optimizer_tensors", lambda v: _is_int(v, 0, 100000)),
                    ("epoch_plan", lambda v: v is None or (
                        isinstance(v, list) and len(v) == 5 and _is_int(v[0], 1) and
                        _is_int(v[1], 1) and all(isinstance(b, bool) for b in v[2:4]) and
                        _is_int(v[4], 0, 2 ** 64)))):
        if not ok(meta.get(key)):
            raise CheckpointError(f"{where}: metadata field {key!r} is missing or malformed: "
                                  f"{str(meta.get(key))[:80]}")
    try:
        config = TrainConfig.from_dict(meta.get("config"))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return meta, config


def _read(path: str) -> tuple[dict[str, np.ndarray], dict, TrainConfig]:
    def read(f: Any, where: str):
        md = f.metadata() or {}
        if md.get("format") != "bpcore" or "bpcore" not in md:
            raise CheckpointError(f"{where}: not a bpcore checkpoint (a safetensors file "
                                  "without bpcore's metadata; foreign files cannot be loaded "
                                  "as models)")
        meta, config = _parse_meta(md["bpcore"], where)
        expected = set(param_shapes(config.sizes))
        expected |= {f"opt.{i}" for i in range(meta["n_optimizer_tensors"])}
        expected |= set(_STATE) if meta["format_version"] >= 2 else set()
        extra = set(f.keys()) - expected
        if extra:
            raise CheckpointError(f"{where}: unexpected tensors {sorted(extra)[:10]}; a "
                                  f"model of sizes {config.sizes[:10]} holds "
                                  f"{sorted(expected)[:10]}...")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        return (tensors, meta, config), meta["sha256"]

    return read_consistent(path, read)


def load_checkpoint(path: str | os.PathLike, backend: Any = "numpy",
                    dtype: str | None = None) -> Checkpoint:
    """Read a checkpoint; the model is rebuilt on ``backend`` (any backend, any saved one).

    A checkpoint is untrusted input: whatever is wrong with the file (not a file, truncated,
    corrupted, crafted) gives a :class:`~bpcore.errors.CheckpointError` saying what.
    """
    path = os.fspath(path)
    where = f"load {path!r}"
    tensors, meta, config = _read(path)
    problems = shape_mismatches(tensors, config.sizes)
    if problems:
        raise CheckpointError(f"{where}: tensor shape mismatch: " + "; ".join(problems))
    names = param_shapes(config.sizes)
    not_float = [n for n in names if tensors[n].dtype.kind != "f"]
    if not_float:
        raise CheckpointError(f"{where}: parameters {not_float} are not floating point")
    not_finite = [n for n in tensors if not n.startswith("state.") and tensors[n].dtype.kind
                  == "f" and not np.isfinite(tensors[n]).all()]
    if not_finite:
        raise CheckpointError(f"{where}: tensors {sorted(not_finite)[:10]} hold NaN or inf; "
                              "parameters and optimizer state are finite in every file bpcore "
                              "writes (the guard refuses steps that would make them not)")
    if meta["format_version"] >= 2 and any(n in tensors for n in _STATE):
        _check_state_tensors(tensors, where)
    try:
        from_spec(config.preprocessing, config.sizes[0])  # (None: no preprocessing)
        model = config.build_model(backend, dtype, params_from_dict(tensors, len(names) // 2))
    except (ShapeError, ConfigError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    rest = {k: v for k, v in tensors.items() if k not in names}
    return Checkpoint(model, config, meta, rest)


def _check_state_tensors(tensors: dict, where: str) -> None:
    """Each ``state.*`` tensor: present, a scalar of the right kind, and a value some real
    training could have reached (a crafted file with a valid checksum gets no further)."""
    bad = [n for n in _STATE if n not in _OPTIONAL and n not in tensors]
    bad += [n for n in _STATE if n in tensors and tensors[n].shape != ()]
    if bad:
        raise CheckpointError(f"{where}: training-state tensors {bad} are missing or not "
                              "scalars")

    def whole(name: str, lo: int, hi: int) -> int:
        a = tensors[name]
        if a.dtype.kind not in "iu":
            raise CheckpointError(f"{where}: {name} must be an integer tensor, got dtype "
                                  f"{a.dtype}")
        v = int(a)
        if not lo <= v <= hi:
            raise CheckpointError(f"{where}: {name} = {v} is outside [{lo}, {hi}]")
        return v

    step = whole("state.step", 0, _INT32_MAX - 1)
    whole("state.epoch", 0, _INT32_MAX - 1)
    if "state.epoch_batch" in tensors:
        whole("state.epoch_batch", 0, _INT32_MAX)
    bad_step = whole("state.guard.bad_step", 0, step + 1)
    reason = whole("state.guard.reason", 0, 3)
    if (bad_step == 0) != (reason == 0):
        raise CheckpointError(f"{where}: state.guard.bad_step = {bad_step} and "
                              f"state.guard.reason = {reason} contradict each other (both are 0, "
                              "or both are not)")
    ref = tensors["state.guard.ref_loss"]
    if ref.dtype.kind != "f" or float(ref) < 0:  # (every loss is >= 0; a negative reference
        #                                           would switch the growth check off)
        raise CheckpointError(f"{where}: state.guard.ref_loss must be a float >= 0 (NaN before "
                              f"the first step), got {ref.dtype} {ref}")


def load(path: str | os.PathLike, backend: Any = "numpy", dtype: str | None = None) -> MLP:
    """The model stored at ``path``, on ``backend``. See :func:`load_checkpoint` for the rest."""
    return load_checkpoint(path, backend=backend, dtype=dtype).model


def trainer_from_checkpoint(cls: Any, ckpt: "Checkpoint", optimizer: Any = None, *,
                            data_parallel: bool = False) -> Any:
    """``Trainer.from_checkpoint``: a ``cls`` (Trainer) that continues where ``ckpt``'s
    stopped, on any number of workers."""
    ckpt.require_state()
    config = ckpt.config
    if config.loss is None:
        raise CheckpointError("resume: the checkpoint does not name its loss")
    try:
        opt = optimizer or config.build_optimizer()
    except ConfigError as e:
        raise CheckpointError(f"resume: {e}") from None
    trainer = cls(ckpt.model, config.loss, opt, clip_norm=config.clip_norm,
                  check_finite=config.check_finite,
                  divergence_factor=config.divergence_factor, data_parallel=data_parallel)
    trainer._state = ckpt.restore_state(trainer._state)
    trainer._epoch_batch = ckpt.epoch_batch
    trainer.epoch_plan = ckpt.epoch_plan
    trainer._state = trainer._workers.place(trainer._state)
    trainer.model.params = trainer._state.params
    return trainer
