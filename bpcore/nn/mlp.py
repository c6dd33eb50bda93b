"""The multilayer perceptron's math: forward pass and hand-written backward pass.

Notation follows the derivation (docs/derivation.md), one row per sample:

    Z^k = Y^{k-1} W^{kT} + b^k         (derivation: z^k = W^k y^{k-1} + b^k)
    Y^k = f^k(Z^k)                     (y^k = f^k(z^k)),  Y^0 = X
    D^K = ∂g/∂Y^K                      (∂g^{K+1}/∂y^K)
    G^k = f'^k(Z^k) ⊙ D^k              (f'^k ⊙ δ^k; a Jacobian-transpose product for softmax)
    ∇W^k = G^{kT} Y^{k-1}              ((f'^k ⊙ δ^k) y^{k-1 T}, summed over the batch)
    ∇b^k = Σ_batch G^k
    D^{k-1} = G^k W^k                  (δ^{k-1} = W^{kT} (f'^k ⊙ δ^k))

``params`` is a plain list ``[(W^1, b^1), ..., (W^K, b^K)]`` with ``W^k`` of shape
``(n_k, n_{k-1})`` and ``b^k`` of shape ``(n_k,)``. Every function here is pure: it
returns new arrays and never mutates its inputs, so it runs under ``jax.jit``. The
:class:`~bpcore.nn.model.MLP` shell around these functions is in :mod:`bpcore.nn.model`.
"""

from __future__ import annotations

from typing import Sequence

from .._array import Array, Params, array_namespace
from .activations import Activation
from .losses import Loss

__all__ = ["forward", "forward_cache", "backward", "loss_and_grad", "loss_grad_output"]


def forward(params: Params, x: Array, activations: Sequence[Activation]) -> Array:
    """Network output ``Y^K`` of shape ``(batch, n_K)`` for input ``x`` ``(batch, n_0)``."""
    Y = x
    for (W, b), act in zip(params, activations):
        Y = act.forward(Y @ W.T + b[None, :])
    return Y


def forward_cache(params: Params, x: Array, activations: Sequence[Activation]
                  ) -> tuple[Array, list[tuple[Array, Array, Array]]]:
    """Like :func:`forward`, also returning ``[(Y^{k-1}, Z^k, Y^k)]`` for :func:`backward`."""
    Y = x
    cache = []
    for (W, b), act in zip(params, activations):
        Z = Y @ W.T + b[None, :]
        Y_next = act.forward(Z)
        cache.append((Y, Z, Y_next))
        Y = Y_next
    return Y, cache


def backward(params: Params, activations: Sequence[Activation],
             cache: list[tuple[Array, Array, Array]], D: Array, *,
             input_grad: bool = False) -> tuple[Params, Array | None]:
    """Back-propagate ``D = ∂g/∂Y^K`` ``(batch, n_K)`` through the network.

    Returns ``(grads, dX)``: ``grads`` has the structure, shapes and dtype of ``params``;
    ``dX = ∂g/∂X`` ``(batch, n_0)`` when ``input_grad`` is set, else ``None``.
    """
    xp = array_namespace(D)
    grads: list[tuple[Array, Array]] = [None] * len(params)  # type: ignore[list-item]
    for k in range(len(params) - 1, -1, -1):
        W, _ = params[k]
        Y_prev, Z, Y = cache[k]
        G = activations[k].vjp(Z, Y, D)           # f'^k ⊙ δ^k  (batch, n_k)
        grads[k] = (G.T @ Y_prev, xp.sum(G, axis=0))  # ∇W^k (n_k, n_{k-1}), ∇b^k (n_k,)
        # δ^0 = ∂g/∂x is one more GEMM nobody needs for training: skip it unless asked.
        if k > 0 or input_grad:
            D = G @ W                              # δ^{k-1}  (batch, n_{k-1})
    return grads, (D if input_grad else None)


def loss_and_grad(params: Params, activations: Sequence[Activation], loss: Loss,
                  x: Array, T: Array, *, input_grad: bool = False
                  ) -> tuple[Array, Params, Array | None]:
    """Pure ``(loss value, grads, dX or None)`` for canonical targets ``T`` (batch, n_K)."""
    return loss_grad_output(params, activations, loss, x, T, input_grad=input_grad)[:3]


def loss_grad_output(params: Params, activations: Sequence[Activation], loss: Loss,
                     x: Array, T: Array, *, input_grad: bool = False
                     ) -> tuple[Array, Params, Array | None, Array]:
    """:func:`loss_and_grad` plus the network output ``Y^K`` (for metrics at no extra cost)."""
    Y, cache = forward_cache(params, x, activations)
    value, D = loss.forward(Y, T)
    grads, dX = backward(params, activations, cache, D, input_grad=input_grad)
    return value, grads, dX, Y
