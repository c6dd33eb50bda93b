"""Activation functions ``f^k``, each paired with its Jacobian-transpose product.

Notation (see docs/derivation.md): ``Z = Y_prev @ W.T + b`` is the pre-activation,
``Y = f(Z)`` the layer output, ``D = ∂g/∂Y`` (the derivation's δ^k, one row per sample),
and ``G = ∂g/∂Z``. For an elementwise ``f``, ``G = f'(Z) ⊙ D``; for softmax, which mixes
the units of a row, ``G = J(Z)^T D`` row by row. Every ``vjp`` takes ``(Z, Y, D)`` so it
can use whichever of ``Z`` and ``Y`` makes the derivative cheaper (sigmoid, tanh and
softmax reuse ``Y``; relu and gelu use ``Z``).

All shapes are ``(batch, n_units)``; the dtype of ``Z`` is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .._array import Array, array_namespace, clip_above, clip_below
from .._registry import lookup

__all__ = ["Activation", "ACTIVATIONS", "InplaceKernel", "get_activation", "sigmoid", "softplus"]


@dataclass(frozen=True)
class InplaceKernel:
    """An activation's in-place form, kept beside its generic one: how an executor with
    preallocated buffers (:mod:`bpcore.training.buffered`) runs it inside the layer's ``Z``
    buffer, with the backend's in-place operations ``ops``.

    ``forward_(ops, Z)`` overwrites ``Z`` with ``Y = f(Z)`` (None: ``f`` is the identity).
    ``backward_(ops, D, Y)`` turns ``D`` into ``G = J^T D`` in place, from the layer's output
    ``Y``, which the executor keeps intact until then (None: ``f' = 1``, ``G = D``).
    ``tests/test_registry_kernels.py`` holds every kernel to its entry's ``forward``/``vjp``,
    bit for bit, for every ``Z`` and every finite ``D`` (at a NaN output, where ``f'`` is
    undefined, ``backward_`` may keep ``D`` where the generic form gives 0: a NaN output
    makes its row's loss NaN, so the step is refused either way).
    """

    forward_: Callable[[Any, Array], None] | None
    backward_: Callable[[Any, Array, Array], None] | None = None


# relu: Y = max(Z, 0) in place; G = D where Y > 0, else 0 (Y > 0 exactly where Z > 0): the
# backend's one-pass form (ops.relu_backward_: PyTorch's threshold_backward; on NumPy the
# product with the mask, as one compiled pass with Numba, which equals the generic vjp's
# where() for every finite D).
RELU_KERNEL = InplaceKernel(lambda ops, Z: ops.relu_(Z),
                            backward_=lambda ops, D, Y: ops.relu_backward_(D, Y))
IDENTITY_KERNEL = InplaceKernel(None)


@dataclass(frozen=True)
class Activation:
    """A named activation: ``forward(Z) -> Y`` and ``vjp(Z, Y, D) -> G``, and optionally
    its in-place ``kernel`` (an :class:`InplaceKernel`). Executors dispatch on the entry's
    own kernel, never on its name: an activation of your own called "relu" runs its own
    ``forward``/``vjp`` unless you give it a kernel."""

    name: str
    forward: Callable[[Array], Array]
    vjp: Callable[[Array, Array, Array], Array]
    elementwise: bool = True
    init: str = "glorot"  # which initialisation suits it: "he" or "glorot"
    kernel: InplaceKernel | None = None

    def __call__(self, Z: Array) -> Array:
        return self.forward(Z)


def sigmoid(Z: Array) -> Array:
    """``1 / (1 + e^{-z})`` without overflow (also the fused loss's output)."""
    xp = array_namespace(Z)
    # exp(-|Z|) never overflows; the two branches are the same function rearranged.
    e = xp.exp(-xp.abs(Z))
    return xp.where(Z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softplus(Z: Array) -> Array:
    """``log(1 + e^z)`` without overflow (also binary cross-entropy's value)."""
    xp = array_namespace(Z)
    # log(1 + e^z) = max(z, 0) + log1p(e^{-|z|}): no overflow at |z| = 1e4.
    return clip_below(Z, 0.0) + xp.log1p(xp.exp(-xp.abs(Z)))


def _softmax(Z: Array) -> Array:
    xp = array_namespace(Z)
    e = xp.exp(Z - xp.max(Z, axis=1, keepdims=True))
    return e / xp.sum(e, axis=1, keepdims=True)


# ---- identity -----------------------------------------------------------------------
def _identity(Z):
    return Z


def _identity_vjp(Z, Y, D):
    return D


# ---- sigmoid: f' = y (1 - y) --------------------------------------------------------
def _sigmoid_vjp(Z, Y, D):
    return D * Y * (1.0 - Y)


# ---- tanh: f' = 1 - y^2 -------------------------------------------------------------
def _tanh(Z):
    return array_namespace(Z).tanh(Z)


def _tanh_vjp(Z, Y, D):
    return D * (1.0 - Y * Y)


# ---- relu ---------------------------------------------------------------------------
def _relu(Z):
    return clip_below(Z, 0.0)


def _relu_vjp(Z, Y, D):
    return array_namespace(Z, D).where(Z > 0, D, 0.0)


# ---- leaky relu (slope 0.01 below zero, as PyTorch and Keras) -----------------------
LEAKY_SLOPE = 0.01


def _leaky_relu(Z):
    return array_namespace(Z).where(Z > 0, Z, LEAKY_SLOPE * Z)


def _leaky_relu_vjp(Z, Y, D):
    return array_namespace(Z, D).where(Z > 0, D, LEAKY_SLOPE * D)


# ---- elu (alpha = 1): f' = 1 for z > 0, else y + alpha -------------------------------
ELU_ALPHA = 1.0


def _elu(Z):
    xp = array_namespace(Z)
    # expm1 of min(z, 0): the unused branch never overflows.
    return xp.where(Z > 0, Z, ELU_ALPHA * xp.expm1(clip_above(Z, 0.0)))


def _elu_vjp(Z, Y, D):
    return array_namespace(Z, D).where(Z > 0, D, D * (Y + ELU_ALPHA))


# ---- softplus: f' = sigmoid(z) ------------------------------------------------------
def _softplus_vjp(Z, Y, D):
    return D * sigmoid(Z)


# ---- gelu, tanh approximation (Hendrycks & Gimpel; PyTorch approximate="tanh") -------
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu(Z):
    xp = array_namespace(Z)
    return 0.5 * Z * (1.0 + xp.tanh(_GELU_C * (Z + _GELU_A * Z * Z * Z)))


def _gelu_vjp(Z, Y, D):
    xp = array_namespace(Z)
    t = xp.tanh(_GELU_C * (Z + _GELU_A * Z * Z * Z))
    dt = _GELU_C * (1.0 + 3.0 * _GELU_A * Z * Z)
    return D * (0.5 * (1.0 + t) + 0.5 * Z * (1.0 - t * t) * dt)


# ---- softmax over each row: J = diag(y) - y y^T, so J^T d = y ⊙ (d - <d, y>) ----------
def _softmax_vjp(Z, Y, D):
    xp = array_namespace(Y, D)
    return Y * (D - xp.sum(D * Y, axis=1, keepdims=True))


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", _identity, _identity_vjp, kernel=IDENTITY_KERNEL),
        Activation("sigmoid", sigmoid, _sigmoid_vjp),
        Activation("tanh", _tanh, _tanh_vjp),
        Activation("relu", _relu, _relu_vjp, init="he", kernel=RELU_KERNEL),
        Activation("leaky_relu", _leaky_relu, _leaky_relu_vjp, init="he"),
        Activation("elu", _elu, _elu_vjp, init="he"),
        Activation("softplus", softplus, _softplus_vjp, init="he"),
        Activation("gelu", _gelu, _gelu_vjp, init="he"),
        Activation("softmax", _softmax, _softmax_vjp, elementwise=False),
    )
}


def get_activation(name: str | Activation, *, argument: str = "activation") -> Activation:
    """Look ``name`` up in :data:`ACTIVATIONS` (an :class:`Activation` passes through)."""
    return lookup(ACTIVATIONS, name, kind="activation", argument=argument,
                  passthrough=Activation)
