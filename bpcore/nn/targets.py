"""Targets at the public API boundary: validated, moved to the device once, and brought to
the canonical form a loss takes (``(batch, n_out)`` arrays of the model's dtype).

Host data is checked at once, with a message saying what is wrong (a label out of range, a
negative or non-finite target, ...). Data already on an asynchronous device (JAX, CUDA) is
not read back: an out-of-range label there becomes a row of NaN, which the training step's
guard refuses and reports (:meth:`bpcore.Loss.targets_valid`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._array import Array, array_device, array_namespace
from .._checks import dtype_kind, host_view
from ..errors import DTypeError, ShapeError
from .losses import Loss

__all__ = ["prepare_target", "label_targets", "labels_to_canonical"]


def prepare_target(loss: Loss, backend: Any, y: Any, n_out: int, batch: int, dtype: Any,
                   *, argument: str = "y") -> Array:
    """Validate ``y`` for ``loss`` and return it as a ``(batch, n_out)`` array on ``backend``.

    ``classes`` losses take integer labels ``(batch,)`` in ``[0, n_out)`` or one-hot /
    probability rows ``(batch, n_out)``; the others take ``(batch, n_out)`` values (or
    ``(batch,)`` when ``n_out == 1``).
    """
    be = backend
    host = host_view(be, y)  # None: on an asynchronous device, not read back
    src = host if host is not None else y
    shape, kind = tuple(src.shape), dtype_kind(src.dtype)
    if kind == "complex" or kind == "other":
        raise DTypeError(f"{argument}: expected real numbers for the {loss.name} loss, "
                         f"got dtype {src.dtype}; convert the targets first.")
    if not shape or shape[0] != batch:
        raise ShapeError(
            f"{argument}: expected {batch} targets (one per row of x), got shape {shape}; "
            "x and y must have the same number of rows."
        )
    if loss.targets == "classes" and len(shape) == 1:
        labels = _checked_labels(loss, be, y, host, src, shape, kind, n_out, argument)
        return labels_to_canonical(labels, n_out, be.dtype(dtype))
    if len(shape) == 1 and n_out == 1:
        shape = (batch, 1)
        src = host.reshape(shape) if host is not None else be.xp.reshape(y, shape)
    if len(shape) != 2 or shape[1] != n_out:
        want = f"({batch},) integer labels or ({batch}, {n_out})" if loss.targets == \
            "classes" else f"({batch}, {n_out})" + (f" or ({batch},)" if n_out == 1 else "")
        raise ShapeError(f"{argument}: expected shape {want} for the {loss.name} loss "
                         f"with {n_out} outputs, got {shape}.")
    if host is not None and host.size:
        _check_host_values(loss, np.asarray(src), argument)
    return be.asarray(src, dtype=dtype)


def label_targets(loss: Loss, backend: Any, y: Any, n_out: int, batch: int, *,
                  argument: str = "y") -> Array | None:
    """``y`` as class labels on ``backend`` (checked as :func:`prepare_target` checks them),
    or None when ``y`` is not a vector of labels for a ``classes`` loss (then use
    :func:`prepare_target`). The training step turns labels into targets itself
    (:func:`labels_to_canonical`), inside the compiled step on JAX."""
    if loss.targets != "classes":
        return None
    host = host_view(backend, y)
    src = host if host is not None else y
    shape = tuple(getattr(src, "shape", ()))
    if len(shape) != 1 or shape[0] != batch:
        return None
    kind = dtype_kind(src.dtype)
    if kind not in ("int", "uint"):
        return None
    return _checked_labels(loss, backend, y, host, src, shape, kind, n_out, argument)


def labels_to_canonical(labels: Array, n_out: int, dtype: Any) -> Array:
    """Integer labels ``(batch,)`` as one-hot rows ``(batch, n_out)`` of ``dtype``; a label
    outside ``[0, n_out)`` (possible only for labels never read on the host) becomes a row of
    NaN, which the step's guard refuses and reports. Pure: runs inside ``jit``."""
    xp = array_namespace(labels)
    classes = xp.arange(n_out, dtype=labels.dtype, device=array_device(labels))
    T = xp.astype(labels[:, None] == classes[None, :], dtype)
    valid = (labels >= 0) & (labels < n_out)
    return xp.where(valid[:, None], T, math.nan)


def _checked_labels(loss: Loss, be: Any, y: Any, host: Any, src: Any, shape: tuple,
                    kind: str, n_out: int, argument: str) -> Array:
    batch = shape[0]
    if kind not in ("int", "uint"):
        raise DTypeError(
            f"{argument}: class labels for {loss.name} must be integers in "
            f"[0, {n_out}), got dtype {src.dtype}; pass integer labels "
            f"(y.astype('int64')) or one-hot rows of shape ({batch}, {n_out})."
        )
    if host is not None and host.size and not _labels_in_range(host, n_out):
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= n_out:
            bad = lo if lo < 0 else hi
            raise ShapeError(
                f"{argument}: class label {bad} is out of range; the network has "
                f"{n_out} outputs, so labels must lie in [0, {n_out - 1}]."
            )
    labels = be.native_to_device(y) if be.is_native(y) else be.asarray(src)
    if be.label_dtype is not None:  # the dtype the backend's kernels index with (torch: int64)
        want = getattr(be.xp, be.label_dtype)
        if labels.dtype != want:
            labels = be.xp.astype(labels, want)
    return labels


def _labels_in_range(host: np.ndarray, n_out: int) -> bool:
    """Whether every integer label in ``host`` lies in ``[0, n_out)``, in one pass: seen as
    unsigned integers of the same width, a negative label is at least ``2**(bits-1)``."""
    dt = host.dtype
    if dt.kind == "i":
        host = host.view(np.dtype(f"u{dt.itemsize}").newbyteorder(dt.byteorder))
    return int(np.maximum.reduce(host, axis=None)) < n_out


def _check_host_values(loss: Loss, T: np.ndarray, argument: str) -> None:
    """The host-side twin of :meth:`targets_valid`, with a message saying what is wrong."""
    if not np.all(np.isfinite(T)):
        raise ShapeError(f"{argument}: the targets hold NaN or inf "
                         f"({int(np.sum(~np.isfinite(T)))} values); clean the data first.")
    lo, hi = float(T.min()), float(T.max())
    if loss.targets == "binary" and not (lo >= 0.0 and hi <= 1.0):
        raise ShapeError(f"{argument}: binary cross-entropy targets must lie in "
                         f"[0, 1], got values in [{lo}, {hi}].")
    if loss.targets == "classes" and lo < 0:
        raise ShapeError(f"{argument}: one-hot or probability targets for {loss.name} "
                         f"must be >= 0, got a minimum of {lo}.")
