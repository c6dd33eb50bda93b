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

from ._array import Array, array_device
from ._checks import dtype_kind, host_view
from .errors import DTypeError, ShapeError
from .losses import Loss

__all__ = ["prepare_target"]


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
        if kind not in ("int", "uint"):
            raise DTypeError(
                f"{argument}: class labels for {loss.name} must be integers in "
                f"[0, {n_out}), got dtype {src.dtype}; pass integer labels "
                f"(y.astype('int64')) or one-hot rows of shape ({batch}, {n_out})."
            )
        if host is not None and host.size:
            lo, hi = int(host.min()), int(host.max())
            if lo < 0 or hi >= n_out:
                bad = lo if lo < 0 else hi
                raise ShapeError(
                    f"{argument}: class label {bad} is out of range; the network has "
                    f"{n_out} outputs, so labels must lie in [0, {n_out - 1}]."
                )
        labels = be.asarray(src)
        xp = be.xp
        classes = xp.arange(n_out, dtype=labels.dtype, device=array_device(labels))
        T = xp.astype(labels[:, None] == classes[None, :], be.dtype(dtype))
        if host is not None:
            return T
        # Labels on an asynchronous device are not read back here: one out of range
        # becomes a row of NaN, which the step's guard refuses and reports.
        valid = (labels >= 0) & (labels < n_out)
        return xp.where(valid[:, None], T, math.nan)
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
