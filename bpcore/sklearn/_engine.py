"""The estimators' compiled step, its cache, and inputs from any array library."""

from __future__ import annotations

from typing import Any

import numpy as np

import scipy.optimize
import scipy.sparse

from .._array import array_namespace
from ..backends._base import Backend, cpu_array_to_numpy, on_cpu
from ..nn.losses import Loss
from ..training.guard import step_is_finite, where_select

from ._rules import _adam_update, _finish, _grad_sums, _sgd_update

def _make_step(acts, loss: Loss, solver: str, nesterov: bool, select_on_host: bool):
    """One guarded stochastic step: ``(params, opt, bad, x, Y, sw, h) -> (params, opt, bad,
    loss)``. ``bad`` (0-d bool) turns true at the first step whose loss or update is not
    finite; that step and every later one leave parameters and optimizer state as they were.

    ``select_on_host``: for backends whose values are read without waiting for a device
    (NumPy, PyTorch on the CPU), the guard's decision is read and the old or new arrays
    returned; elsewhere (JAX, CUDA) an elementwise ``where`` decides on the device."""

    def step(params, opt, bad, x, Y, sw, h):
        xp = array_namespace(x)
        value, grads = _grad_sums(params, acts, loss, x, Y, sw)
        value, grads = _finish(value, grads, params, xp.sum(sw), h.alpha)
        if solver == "sgd":
            u, new_opt = _sgd_update(grads, opt, params, h, nesterov)
        else:
            u, new_opt = _adam_update(grads, opt, params, h)
        # bpcore's guard rule (bpcore.training.guard.step_is_finite): a finite loss, a bounded update
        # and a finite optimizer state
        ok = step_is_finite(value, u, new_opt) & ~bad
        if select_on_host:
            if not bool(ok):
                return params, opt, ~ok, value
            return [(W + uW, b + ub) for (W, b), (uW, ub) in zip(params, u)], new_opt, ~ok, value
        new_params = [(W + uW, b + ub) for (W, b), (uW, ub) in zip(params, u)]
        params, opt = where_select(ok, lambda: (new_params, new_opt), lambda: (params, opt))
        return params, opt, ~ok, value

    def step_indexed(params, opt, bad, X, Y, SW, idx, h):
        xp = array_namespace(X)
        return step(params, opt, bad, xp.take(X, idx, axis=0), xp.take(Y, idx, axis=0),
                    xp.take(SW, idx, axis=0), h)

    return step, step_indexed


def _make_value_and_grad(acts, loss: Loss):
    """Full-batch (L-BFGS) pieces: per-chunk sums, and :func:`_finish` over their total."""
    return (lambda params, x, Y, sw: _grad_sums(params, acts, loss, x, Y, sw)), _finish


_COMPILED: dict[Any, Any] = {}


class _Diverged(ValueError):
    """scikit-learn's ValueError for non-finite weights (a fit that keeps its progress)."""


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of 2^(bits(n) - 4): sizes within ~12% share it."""
    q = 1 << max(0, int(n).bit_length() - 4)
    return -(-int(n) // q) * q


def _padded(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``rows``."""
    if a.shape[0] >= rows:
        return a
    out = np.zeros((rows,) + a.shape[1:], dtype=a.dtype)
    out[:a.shape[0]] = a
    return out


def _compiled(be: Backend, key: tuple, build):
    """Compiled functions shared by every estimator with the same structure (so a
    ``partial_fit`` loop or a grid search compiles once per backend and shape)."""
    full = (be.name, id(be)) + key
    fn = _COMPILED.get(full)
    if fn is None:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        fn = _COMPILED[full] = tuple(be.jit(f) for f in build())
    return fn


# ---- inputs from any array library -------------------------------------------------------
def _host(a: Any) -> Any:
    """NumPy (or SciPy sparse, or a pandas object) for scikit-learn's validation: arrays of
    other libraries are brought to the host (a device array by its library's own copy)."""
    if a is None or isinstance(a, (np.ndarray, list, tuple)) or scipy.sparse.issparse(a):
        return a
    mod = type(a).__module__.split(".")[0]
    if mod == "pandas" or not hasattr(a, "__dlpack__"):
        return a
    if on_cpu(a):
        return cpu_array_to_numpy(a)
    if hasattr(a, "get"):            # CuPy
        return a.get()
    if hasattr(a, "cpu"):            # a CUDA torch tensor
        return a.detach().cpu().numpy()
    return np.asarray(a)             # JAX on an accelerator
