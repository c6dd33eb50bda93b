"""Losses ``g(y^K)``, each returning its value and ``D = ∂g/∂Y_K`` together.

All losses are means over the batch (sums over the output units of each sample), so
every gradient carries a ``1/B``. The two cross-entropies take **logits**: the network's
output activation should be ``identity`` and the loss applies softmax/sigmoid itself.
That fuses the activation's Jacobian with the loss gradient into ``p - t`` (see each
function), which is both cheaper and stable where the separate pieces would overflow.

Targets reach a loss in one canonical form, ``(batch, n_out)`` arrays of the model's dtype
(class labels as one-hot rows): :func:`bpcore.nn.targets.prepare_target` validates and converts
them at the public API boundary.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable

from .._array import Array, array_device, array_namespace
from .._registry import lookup
from .activations import sigmoid, softplus

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


def backend_pass(ops: Any, name: str, *args: Any) -> Any:
    """A loss kernel's one-pass form ``name`` on the backend's in-place operations ``ops``
    (Numba's loops, PyTorch's kernels: the hooks in ``backends/``), run on ``args``; None
    where ``ops`` has none or it declines (the kernel then runs its own operations)."""
    fused = getattr(ops, name, None)
    return fused(*args) if fused is not None else None


class SoftmaxXentKernel:
    """Softmax cross-entropy's in-place form, kept beside its generic one
    (:func:`_softmax_cross_entropy`): the same operations, in buffers, with the backend's
    in-place operations ``ops`` (used by :mod:`bpcore.training.inplace`; held to the
    generic form by ``tests/test_inplace.py``). ``Z`` are the logits (the output layer is
    the identity)."""

    def buffers(self, ops: Any, Z: Array) -> tuple:
        """Scratch for a batch shaped like ``Z``: ``(D, lse, rows, work)``."""
        B, C = Z.shape
        return (ops.empty((B, C), Z.dtype), ops.empty((B, 1), Z.dtype),
                ops.empty((B, 1), Z.dtype), ops.empty((B, C), Z.dtype))

    def __call__(self, ops: Any, Z: Array, T: Array, bufs: tuple) -> tuple[Any, Array, Any]:
        """``(value, D, correct)`` on canonical targets ``T``: ``correct`` as
        :meth:`Loss.correct` where the pass counts it, else None (the executor counts, with
        :meth:`correct`). Where the backend has a one-pass form of exactly this
        (``ops.softmax_xent``: Numba's), that runs instead (it may decline with None: then
        the operations below)."""
        out = self._pass_or_lse(ops, "softmax_xent", Z, T, bufs)
        if out is not None:
            return out
        D, lse, rows, scratch = bufs
        B = Z.shape[0]
        ops.sub(lse, Z, scratch)                  # value = Σ T (lse - Z) / B
        ops.mul(T, scratch, scratch)
        value = ops.total(scratch) / B
        ops.sub(Z, lse, D)                        # D = (exp(Z - lse) Σ_c T - T) / B
        ops.exp(D, D)
        ops.row_sum(T, rows)
        ops.mul(D, rows, D)
        ops.sub(D, T, D)
        ops.div(D, B, D)
        return value, D, None

    def labels(self, ops: Any, Z: Array, labels: Array, bufs: tuple
               ) -> tuple[Any, Array, Any]:
        """:meth:`__call__` for one-hot targets given as labels ``y``: value
        ``Σ_b (lse_b - Z_{b,y_b}) / B`` and ``D = (softmax(Z) - onehot(y)) / B``, the same
        numbers to round-off without the one-hot rows; and the number of rows whose
        ``argmax`` (the first, as ``argmax_rows``) is the label, where the pass counts it
        (else None: the executor counts). Where the backend has a one-pass form of exactly
        this (``ops.softmax_xent_labels``: PyTorch's, Numba's), that runs instead (it may
        decline with None: then the operations below)."""
        out = self._pass_or_lse(ops, "softmax_xent_labels", Z, labels, bufs)
        if out is not None:
            return out
        D, lse = bufs[:2]
        B = Z.shape[0]
        picked = ops.pick(Z, labels)              # Z_{b, y_b}
        ops.sub(lse[:, 0], picked, picked)
        value = ops.total(picked) / B
        ops.sub(Z, lse, D)
        ops.exp(D, D)
        ops.sub_at(D, labels, 1.0)                # D_{b, y_b} -= 1
        ops.div(D, B, D)
        return value, D, None

    def correct(self, ops: Any, Z: Array, T: Array) -> Any:
        """:meth:`Loss.correct` on canonical targets (``argmax`` of the logits equals
        ``argmax`` of the target row)."""
        return ops.count(ops.argmax_rows(Z) == ops.argmax_rows(T), Z)

    def _pass_or_lse(self, ops: Any, name: str, Z: Array, targets: Array, bufs: tuple
                     ) -> tuple | None:
        """Both forms' start: the backend's one pass ``name`` where it has one (its
        ``(value, D, correct)``), else None with each row's log-sum-exp in ``bufs[1]``."""
        out = backend_pass(ops, name, Z, targets, bufs[0])
        if out is None:
            self._logsumexp_rows(ops, Z, *bufs[:3])
        return out

    @staticmethod
    def _logsumexp_rows(ops: Any, Z: Array, work: Array, lse: Array, rows: Array) -> None:
        """``lse ← m + log Σ exp(Z - m)`` per row, ``m`` the row's max (``work``, ``rows``:
        scratch), as :func:`_logsumexp_rows`."""
        ops.row_max(Z, lse)
        ops.sub(Z, lse, work)
        ops.exp(work, work)
        ops.row_sum(work, rows)
        ops.log(rows, rows)
        ops.add(lse, rows, lse)


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
    # Its in-place form on the logits (None: the generic forward runs in every executor).
    # Executors take the entry's own kernel: a loss of your own, whatever its name, has none.
    kernel: Any = None

    def __call__(self, Y: Array, T: Array) -> Array:
        return self.forward(Y, T)[0]

    @property
    def has_accuracy(self) -> bool:
        """Whether the loss classifies (an accuracy is reported), or regresses values."""
        return self.targets != "values"

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

    def targets_valid(self, T: Array, host_ops: Any = None) -> Array:
        """0-d boolean, on the device: every target is one this loss accepts.

        Classes: finite and >= 0 (a label that was out of range on the device arrives as a
        row of NaN, see :func:`bpcore.nn.targets.prepare_target`). Binary: in [0, 1]. Values: finite.
        Decided from the smallest and the largest target: two reductions, no temporary (a
        NaN anywhere makes both NaN, and every comparison with NaN is false).
        ``host_ops``: a backend's in-place operations whose values the host reads for free
        (the in-place step's): the same rule on host floats, a Python bool.
        """
        if math.prod(T.shape) == 0:  # (no targets: nothing invalid)
            return True if host_ops is not None else array_namespace(T).all(T == T)
        if host_ops is not None:
            return bool(self.targets_in_range(*host_ops.min_max(T)))
        xp = array_namespace(T)
        return self.targets_in_range(xp.min(T), xp.max(T))

    def targets_in_range(self, lo: Any, hi: Any) -> Any:
        """The rule of :meth:`targets_valid`, on the smallest and the largest target: 0-d
        arrays on the device, or Python floats where the host reads them for free (the
        in-place step). NaN in either fails every comparison."""
        if self.targets == "classes":
            return (lo >= 0) & (hi < math.inf)
        if self.targets == "binary":
            return (lo >= 0) & (hi <= 1)
        return (lo > -math.inf) & (hi < math.inf)

    def correct_per_row(self, T: Array) -> int:
        """How many predictions :meth:`correct` counts per sample."""
        return int(T.shape[1]) if self.targets == "binary" else 1

LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("mse", _mse, "values"),
        Loss("softmax_cross_entropy", _softmax_cross_entropy, "classes",
             kernel=SoftmaxXentKernel()),
        Loss("binary_cross_entropy", _binary_cross_entropy, "binary"),
    )
}


def get_loss(name: str | Loss, *, argument: str = "loss") -> Loss:
    """Look ``name`` up in :data:`LOSSES` (a :class:`Loss` passes through)."""
    return lookup(LOSSES, name, kind="loss", argument=argument, passthrough=Loss)
