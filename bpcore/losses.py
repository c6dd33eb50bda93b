"""Losses ``g(y^K)``, each returning its value and ``D = ∂g/∂Y_K`` together.

All losses are means over the batch (sums over the output units of each sample), so
every gradient carries a ``1/B``. The two cross-entropies take **logits**: the network's
output activation should be ``identity`` and the loss applies softmax/sigmoid itself.
That fuses the activation's Jacobian with the loss gradient into ``p - t`` (see each
function), which is both cheaper and stable where the separate pieces would overflow.

Targets are brought to one canonical form by :meth:`Loss.prepare_target` at the public
API boundary (validated there, on the host when the data is on the host):
``(batch, n_out)`` arrays of the model's dtype. Class labels become one-hot rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable


import numpy as np

from ._array import Array, array_device, array_namespace
from .activations import sigmoid, softplus
from ._checks import dtype_kind, host_view
from ._registry import lookup
from .errors import DTypeError, ShapeError

__all__ = ["Loss", "LOSSES", "get_loss"]


def _logsumexp_rows(Z: Array) -> Array:
    xp = array_namespace(Z)
    m = xp.max(Z, axis=1, keepdims=True)
    return m + xp.log(xp.sum(xp.exp(Z - m), axis=1, keepdims=True))


# ---- mean squared error, g = 1/(2B) Σ ||y - t||^2 ------------------------------------
def _mse(Y: Array, T: Array) -> tuple[Array, Array]:
    xp = array_namespace(Y, T)
    R = Y - T
    B = Y.shape[0]
    # Fused with an identity output this is the textbook (y - t)/B.
    return 0.5 * xp.sum(R * R) / B, R / B


# ---- softmax cross-entropy on logits Z, g = 1/B Σ_b Σ_c t_bc (lse(z_b) - z_bc) --------
def _softmax_cross_entropy(Z: Array, T: Array) -> tuple[Array, Array]:
    xp = array_namespace(Z, T)
    B = Z.shape[0]
    lse = _logsumexp_rows(Z)
    value = xp.sum(T * (lse - Z)) / B
    # Softmax and cross-entropy fused: ∂g/∂z = (softmax(z) Σ_c t_c - t)/B, which is the
    # familiar (p - onehot)/B for labels (rows of t sum to 1) and exact for any soft target.
    P = xp.exp(Z - lse)
    D = (P * xp.sum(T, axis=1, keepdims=True) - T) / B
    return value, D


# ---- binary cross-entropy on logits Z, per unit: softplus(z) - t z ------------------
def _binary_cross_entropy(Z: Array, T: Array) -> tuple[Array, Array]:
    xp = array_namespace(Z, T)
    B = Z.shape[0]
    value = xp.sum(softplus(Z) - T * Z) / B  # softplus: log(1 + e^z), stable at |z| = 1e4
    # Sigmoid and BCE fused: ∂g/∂z = (sigmoid(z) - t)/B.
    return value, (sigmoid(Z) - T) / B


@dataclass(frozen=True)
class Loss:
    """A named loss: ``forward(Y_K, T) -> (value, D)`` on canonical targets ``T``."""

    name: str
    forward: Callable[[Array, Array], tuple[Array, Array]]
    targets: str  # "values" (mse), "classes" (softmax CE), "binary" (BCE)

    def __call__(self, Y: Array, T: Array) -> Array:
        return self.forward(Y, T)[0]

    def correct(self, Y: Array, T: Array) -> Array:
        """How many predictions in the batch are right (0-d, in ``Y``'s dtype, on device).

        Classes: ``argmax`` of the logits equals ``argmax`` of the target row. Binary: each
        unit's logit sign matches its target (> 0.5). Values (mse): always 0.
        """
        xp = array_namespace(Y, T)
        if self.targets == "classes":
            hit = xp.argmax(Y, axis=1) == xp.argmax(T, axis=1)
        elif self.targets == "binary":
            hit = (Y > 0) == (T > 0.5)
        else:
            return xp.zeros((), dtype=Y.dtype, device=array_device(Y))
        return xp.sum(xp.astype(hit, Y.dtype))

    def _check_host_values(self, T: np.ndarray, argument: str) -> None:
        """The host-side twin of :meth:`targets_valid`, with a message saying what is wrong."""
        if not np.all(np.isfinite(T)):
            raise ShapeError(f"{argument}: the targets hold NaN or inf "
                             f"({int(np.sum(~np.isfinite(T)))} values); clean the data first.")
        lo, hi = float(T.min()), float(T.max())
        if self.targets == "binary" and not (lo >= 0.0 and hi <= 1.0):
            raise ShapeError(f"{argument}: binary cross-entropy targets must lie in "
                             f"[0, 1], got values in [{lo}, {hi}].")
        if self.targets == "classes" and lo < 0:
            raise ShapeError(f"{argument}: one-hot or probability targets for {self.name} "
                             f"must be >= 0, got a minimum of {lo}.")

    def targets_valid(self, T: Array) -> Array:
        """0-d boolean, on the device: every target is one this loss accepts.

        Classes: finite and >= 0 (a label that was out of range on the device arrives as a
        row of NaN, see :meth:`prepare_target`). Binary: in [0, 1]. Values: finite.
        """
        xp = array_namespace(T)
        if self.targets == "classes":
            return xp.all(xp.isfinite(T) & (T >= 0))
        if self.targets == "binary":
            return xp.all((T >= 0) & (T <= 1))
        return xp.all(xp.isfinite(T))

    def correct_per_row(self, T: Array) -> int:
        """How many predictions :meth:`correct` counts per sample."""
        return int(T.shape[1]) if self.targets == "binary" else 1

    def prepare_target(self, backend: Any, y: Any, n_out: int, batch: int, dtype: Any,
                       *, argument: str = "y") -> Array:
        """Validate ``y`` and return it as a ``(batch, n_out)`` array on ``backend``.

        ``classes`` losses take integer labels ``(batch,)`` in ``[0, n_out)`` or one-hot /
        probability rows ``(batch, n_out)``; the others take ``(batch, n_out)`` values (or
        ``(batch,)`` when ``n_out == 1``).
        """
        be = backend
        host = host_view(be, y)  # None: on an asynchronous device, not read back
        src = host if host is not None else y
        shape, kind = tuple(src.shape), dtype_kind(src.dtype)
        if kind == "complex" or kind == "other":
            raise DTypeError(f"{argument}: expected real numbers for the {self.name} loss, "
                             f"got dtype {src.dtype}; convert the targets first.")
        if not shape or shape[0] != batch:
            raise ShapeError(
                f"{argument}: expected {batch} targets (one per row of x), got shape {shape}; "
                "x and y must have the same number of rows."
            )
        if self.targets == "classes" and len(shape) == 1:
            if kind not in ("int", "uint"):
                raise DTypeError(
                    f"{argument}: class labels for {self.name} must be integers in "
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
            want = f"({batch},) integer labels or ({batch}, {n_out})" if self.targets == \
                "classes" else f"({batch}, {n_out})" + (f" or ({batch},)" if n_out == 1 else "")
            raise ShapeError(f"{argument}: expected shape {want} for the {self.name} loss "
                             f"with {n_out} outputs, got {shape}.")
        if host is not None and host.size:
            self._check_host_values(np.asarray(src), argument)
        return be.asarray(src, dtype=dtype)


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("mse", _mse, "values"),
        Loss("softmax_cross_entropy", _softmax_cross_entropy, "classes"),
        Loss("binary_cross_entropy", _binary_cross_entropy, "binary"),
    )
}


def get_loss(name: str | Loss, *, argument: str = "loss") -> Loss:
    """Look ``name`` up in :data:`LOSSES` (a :class:`Loss` passes through)."""
    return lookup(LOSSES, name, kind="loss", argument=argument, passthrough=Loss)
