"""Finite-difference gradient check a user can run on their own model, on any backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .losses import Loss, get_loss
from .._layout import FlatLayout
from .model import MLP, value_and_grad

__all__ = ["gradcheck", "GradcheckResult"]


@dataclass
class GradcheckResult:
    """Outcome of :func:`gradcheck`; truthy when the check passed."""

    ok: bool
    max_abs_error: float
    max_rel_error: float
    worst: str  # which parameter entry or direction was worst
    n_checked: int
    mode: str  # "entries" or "directions"
    dtype: str = "float64"  # the precision the check ran in

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        return (f"gradcheck {verdict}: {self.n_checked} {self.mode} checked in {self.dtype}, max "
                f"relative error {self.max_rel_error:.3g} (abs {self.max_abs_error:.3g}) at "
                f"{self.worst}")


# (eps, rtol, atol): both sides in float64; or, where the backend has no float64, its
# float32 gradient against float64 differences (then float32 rounding sets the tolerance).
TOLERANCES = {"float64": (1e-6, 1e-6, 1e-9), "float32": (1e-6, 1e-3, 1e-6)}


def gradcheck(model: MLP, x: Any, y: Any, loss: str | Loss = "mse", *,
              eps: float | None = None, rtol: float | None = None, atol: float | None = None,
              max_entries: int = 4000, n_directions: int = 20, seed: int = 0
              ) -> GradcheckResult:
    """Compare the hand-written gradients with central differences.

    A float64 copy of ``model`` on the same backend is used (the model itself is not
    touched), so float32 models are checked in float64 too. On a backend where float64 is
    switched off (JAX without ``jax_enable_x64``) the backend's float32 gradient is checked
    against float64 differences of the same network computed on the host (NumPy), with a
    tolerance for float32 rounding (``TOLERANCES``; the result's ``dtype`` says
    "float32"); it never flips a process-wide switch. Nets with at most ``max_entries``
    parameters are checked entry by entry; larger ones along ``n_directions`` random unit
    directions ``v`` (``<∇g, v>`` against ``(g(θ+εv) - g(θ-εv)) / 2ε``).
    """
    lossf = get_loss(loss)
    be = model.backend
    dtype = "float32" if be.float64_error() else "float64"
    d_eps, d_rtol, d_atol = TOLERANCES[dtype]
    eps, rtol, atol = (d_eps if eps is None else eps, d_rtol if rtol is None else rtol,
                       d_atol if atol is None else atol)
    analytic_model = model.to(dtype=dtype)
    _, grads = value_and_grad(analytic_model, x, y, lossf)
    to_np = be.to_numpy
    if dtype == "float64":
        m64 = analytic_model
    else:  # the differences in float64 on the host; data moved there first
        m64 = model.to(backend="numpy", dtype="float64")
        x, y = (to_np(a) if be.is_native(a) else a for a in (x, y))
    layout = FlatLayout(model.sizes)  # bpcore's one flat layout: all W, then all b
    host = [(m64.backend.to_numpy(W), m64.backend.to_numpy(b)) for W, b in m64.params]
    flat_grad = np.concatenate([to_np(g).ravel() for g in layout.leaves(grads)]
                               ).astype(np.float64)
    theta = layout.flatten(host).astype(np.float64)

    def g_at(vec: np.ndarray) -> float:
        m64.set_params([(np.array(W), np.array(b)) for W, b in layout.unflatten(vec)])
        return float(value_and_grad(m64, x, y, lossf)[0])

    where = layout.locate

    if theta.size <= max_entries:
        mode, n = "entries", theta.size
        numeric = np.empty_like(theta)
        for i in range(theta.size):
            e = np.zeros_like(theta)
            e[i] = eps
            numeric[i] = (g_at(theta + e) - g_at(theta - e)) / (2 * eps)
        analytic = flat_grad
        label = where
    else:
        mode, n = "directions", n_directions
        rng = np.random.default_rng(seed)
        V = rng.standard_normal((n_directions, theta.size))
        V /= np.linalg.norm(V, axis=1, keepdims=True)
        numeric = np.array([(g_at(theta + eps * v) - g_at(theta - eps * v)) / (2 * eps)
                            for v in V])
        analytic = V @ flat_grad
        label = lambda i: f"direction {i}"  # noqa: E731
    abs_err = np.abs(analytic - numeric)
    scale = np.maximum(np.abs(analytic), np.abs(numeric))
    rel_err = abs_err / np.maximum(scale, atol)
    ok = bool(np.all(abs_err <= atol + rtol * scale))
    worst = int(np.argmax(abs_err - rtol * scale))
    return GradcheckResult(ok, float(abs_err.max()), float(rel_err.max()), label(worst), n, mode,
                           dtype)
