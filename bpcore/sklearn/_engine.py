"""The estimators' compiled step, its cache, and inputs from any array library."""

from __future__ import annotations

from typing import Any

import numpy as np

import scipy.optimize
import scipy.sparse

from .._array import array_device, array_namespace
from ..backends._base import Backend, cpu_array_to_numpy, on_cpu
from ..nn.losses import Loss
from ..parallel import SINGLE
from ..training.guard import GuardState, where_select
from ..training.step import TrainState, host_select, train_step
from . import _rules
from ._rules import _finish, _grad_sums


def _make_step(acts, loss: Loss, solver: str, nesterov: bool, select_on_host: bool,
               rows: Any, workers: Any = None):
    """One guarded stochastic step: ``(params, opt, bad, x, Y, sw, h, S=None) -> (params,
    opt, bad, loss)``: bpcore's :func:`~bpcore.training.step.train_step` with scikit-learn's
    loss, L2 penalty and optimizer (:mod:`bpcore.sklearn._rules`), its scalars ``h`` passed
    at run time. ``bad`` (0-d bool) turns true at the first step the guard refuses (a loss or
    update that is not finite); that step and every later one leave parameters and
    optimizer state as they were.

    ``select_on_host``: for backends whose values are read without waiting for a device
    (NumPy, PyTorch on the CPU), the guard's decision is read and the old or new arrays
    returned; elsewhere (JAX, CUDA) an elementwise ``where`` decides on the device.
    ``rows``: the backend's gather (:meth:`Backend.rows`), for the step on rows of the data.
    ``workers`` (:mod:`bpcore.parallel`, data-parallel training): over MPI each rank passes
    its rows of the batch and ``S``, the global batch's Σ sw, and the step adds the ranks'
    sums before the penalty and the update; under JAX sharding the gathered batch is split
    across the devices inside the compiled step."""
    select = host_select if select_on_host else where_select
    reduce = _rules.summed_over(workers)

    def step(params, opt, bad, x, Y, sw, h, S=None):
        xp, dev = array_namespace(x), array_device(x)
        zero = xp.zeros((), dtype=xp.int32, device=dev)
        nan = xp.full((), float("nan"), dtype=x.dtype, device=dev)  # (no reference loss)
        optimizer, penalty, T = _rules.step_parts(solver, nesterov, h, Y, sw, S)
        new, metrics = train_step(_state(params, opt, bad, zero, nan), (x, T),
                                  activations=acts, loss=loss, optimizer=optimizer,
                                  divergence_factor=None, penalty=penalty, select=select,
                                  reduce=reduce)
        return new.params, new.opt_state, new.guard.bad_step != 0, metrics.loss

    return step, _indexed(step, rows, workers)


def _state(params, opt, bad, zero, nan) -> TrainState:
    """The training state of one estimator step: ``bad`` (0-d bool) as the guard's refused
    step, no reference loss (``divergence_factor=None``)."""
    xp = array_namespace(zero)
    return TrainState(params, opt, zero, GuardState(xp.astype(bad, xp.int32), zero, nan), zero)


def _indexed(step, rows, workers: Any = None):
    """``step`` on rows ``idx`` of the data on the device, gathered by ``rows`` (the
    backend's :meth:`Backend.rows`; inside the compiled step on JAX, where sharding splits
    the gathered batch across the devices)."""
    constrain = workers.constrain if workers is not None else (lambda a: a)

    def step_indexed(params, opt, bad, X, Y, SW, idx, h, S=None):
        return step(params, opt, bad, *(constrain(rows(a, idx)) for a in (X, Y, SW)), h, S)

    return step_indexed


def _make_buffered_step(be: Backend, dtype: str, params, opt_state, acts, loss: Loss,
                        solver: str, nesterov: bool, h: _rules._Hyper, workers: Any = None):
    """:func:`_make_step`'s two functions, run by bpcore's executors of the one step on a
    backend with in-place operations (NumPy, PyTorch, CuPy): the same ``train_step`` with the
    same parts, its forward and backward on preallocated buffers (each activation's in-place
    kernel). Where the host reads values for free (NumPy, PyTorch on the CPU) and no
    data-parallel sums are added, the in-place step (:class:`bpcore.training.inplace.
    InplaceStep`) runs it: the penalty and the optimizer's in-place forms
    (:mod:`bpcore.sklearn._rules`), the guard proved on the host before anything is written.
    Elsewhere the buffered step (:class:`bpcore.training.buffered.BufferedStep`): the
    update on the flat parameter vector, the guard's decision committed by selection. The
    parameters and optimizer state it returns are views of its buffers, overwritten by the
    next step: one executor per ``fit``, never shared. ``h``: scalars of a step (their
    values do not matter: each step passes its own)."""
    from types import SimpleNamespace

    from ..training.buffered import BufferedStep
    from ..training.inplace import InplaceStep

    sizes = [int(params[0][0].shape[1])] + [int(W.shape[0]) for W, _ in params]
    model = SimpleNamespace(backend=be, sizes=sizes, dtype=be.dtype(dtype), dtype_name=dtype,
                            activations=tuple(acts), params=params)
    reduce = _rules.summed_over(workers)
    optimizer, penalty, _ = _rules.step_parts(solver, nesterov, h, None, None)
    parts = SimpleNamespace(
        model=model, loss=loss, optimizer=optimizer, base_optimizer=optimizer,
        opt_template=opt_state, penalty=penalty, check_finite=True, divergence_factor=None,
        _workers=SINGLE if reduce is None else workers, reduce=reduce)
    exe = (InplaceStep if be.inplace_ops.host_reads and reduce is None else BufferedStep)(parts)
    zero = be.asarray(np.asarray(0, dtype=np.int32))
    nan = be.asarray(np.asarray(np.nan, dtype=dtype))  # (no reference loss)

    def step(params, opt, bad, x, Y, sw, h, S=None):
        exe.optimizer, exe.penalty, T = _rules.step_parts(solver, nesterov, h, Y, sw, S)
        exe.base_optimizer = exe.optimizer
        new, metrics = exe.step(_state(params, opt, bad, zero, nan), x, T)
        return new.params, new.opt_state, new.guard.bad_step != 0, metrics.loss

    return step, _indexed(step, be.rows)


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


def _compiled(be: Backend, key: tuple, build, workers: Any = None):
    """Compiled functions shared by every estimator with the same structure (so a
    ``partial_fit`` loop or a grid search compiles once per backend and shape). ``workers``:
    the data-parallel engine the functions were built for (its jit options apply)."""
    full = (be.name, id(be), id(workers)) + key
    fn = _COMPILED.get(full)
    if fn is None:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        kw = workers.jit_options() if workers is not None else {}
        fn = _COMPILED[full] = tuple(be.jit(f, **kw) for f in build())
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
