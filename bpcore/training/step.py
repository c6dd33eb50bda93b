"""The training state as plain data, and the pure step that advances it.

``TrainState`` holds everything that changes during training — parameters, optimizer state,
the step count, the divergence guard and the epoch — as a NamedTuple of arrays (a pytree on
JAX). ``train_step(state, batch, ...) -> (state, metrics)`` is a pure function of it: the
backend's ``jit`` compiles it once per input shape, and a caller that wants the old state
back simply keeps the old value. There is one step counter, ``state.step``: the number of
updates applied, which the optimizer and its schedules read too.

Each step is guarded (:mod:`bpcore.training.guard`): a step whose targets, loss, update or
new optimizer state is not valid, or whose loss grew past ``divergence_factor`` times the
first step's, changes nothing but the guard, decided on the device without a host sync.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from .._array import Array, Params, nested_leaves
from ..nn.activations import Activation
from ..backends._base import dtype_name
from ..nn.losses import Loss
from ..nn.mlp import loss_grad_output
from ..optim import GradientTransformation, apply_updates
from .guard import (DEFAULT_DIVERGENCE_FACTOR, GUARD_GREW, GUARD_NONFINITE, GUARD_TARGETS,
                    GuardState, guard_decision, step_is_finite, tree_sq_norm, where_select)

__all__ = ["TrainState", "GuardState", "StepMetrics", "train_step", "init_state", "host_select",
           "state_mismatch",
           "guard_decision", "step_is_finite", "tree_sq_norm", "where_select",
           "GUARD_NONFINITE", "GUARD_GREW", "GUARD_TARGETS", "DEFAULT_DIVERGENCE_FACTOR"]


class TrainState(NamedTuple):
    params: Params    # [(W1, b1), ...]
    opt_state: Any    # the optimizer's own state (moments, velocities)
    step: Array       # 0-d int32: updates applied so far
    guard: GuardState
    epoch: Array      # 0-d int32: completed passes of Trainer.fit


class StepMetrics(NamedTuple):
    loss: Array       # 0-d: the batch's mean loss, computed before the update
    correct: Array    # 0-d: correctly classified samples (or labels), 0 for regression


def init_state(params: Params, optimizer: GradientTransformation, backend: Any, *,
               step: int = 0, epoch: int = 0, ref_loss: float = float("nan")) -> TrainState:
    """A fresh state on ``backend`` for ``params`` (optimizer state from ``optimizer.init``)."""
    i32 = lambda v: backend.asarray(np.int32(v))  # noqa: E731
    ref = backend.asarray(np.asarray(ref_loss, dtype=dtype_name(params[0][0].dtype)))
    return TrainState(params, optimizer.init(params), i32(step),
                      GuardState(i32(0), i32(0), ref), i32(epoch))


def state_mismatch(mine: TrainState, theirs: TrainState) -> list[str]:
    """How state ``theirs`` differs from ``mine`` in the count and shapes of its parameters
    and optimizer state (empty: it fits)."""
    problems = []
    for name in ("params", "opt_state"):
        a, b = nested_leaves(getattr(mine, name)), nested_leaves(getattr(theirs, name))
        if len(a) != len(b):
            problems.append(f"{name}: {len(b)} arrays, this trainer's has {len(a)}")
            continue
        problems += [f"{name}[{i}]: shape {tuple(y.shape)}, this trainer's is "
                     f"{tuple(x.shape)}" for i, (x, y) in enumerate(zip(a, b))
                     if tuple(x.shape) != tuple(y.shape)][:4]
    return problems


def train_step(state: TrainState, batch: tuple[Array, Array], *,
               activations: Sequence[Activation], loss: Loss,
               optimizer: GradientTransformation, check_finite: bool = True,
               divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR,
               reduce: Any = None, penalty: Any = None,
               select: Any = where_select, gradient: Any = None
               ) -> tuple[TrainState, StepMetrics]:
    """One guarded step of gradient descent (any optimizer) on ``batch = (x, T)``.

    ``T`` is in the loss's canonical form (``Trainer.prepare_batch`` makes it). With
    ``check_finite=False`` there is no guard: every step is applied as computed.
    ``reduce(value, correct, targets_ok, grads) -> (value, correct, targets_ok, grads)``, for
    data-parallel training over MPI (:mod:`bpcore.parallel`), turns this worker's loss,
    counts and gradients into the global batch's before the update and the guard see them.
    ``penalty(value, grads, params, T) -> (value, grads)``: a term of the objective beyond
    the loss (scikit-learn's L2 and its normalisation, :mod:`bpcore.sklearn`), added before
    the update and the guard see them. ``select(ok, if_ok, if_not)``: how the guard's
    decision picks the new or the old state (by default an elementwise ``where`` on the
    device; an executor on a backend whose values the host reads for free may read ``ok``
    and return one branch). ``gradient(params, x, T) -> (value, grads, correct, targets_ok)``:
    how the loss, its gradient and the batch's counts are computed (by default the generic
    forward and backward of :mod:`bpcore.nn.mlp`; the buffered executor,
    :mod:`bpcore.training.buffered`, passes its pass on preallocated buffers).
    """
    x, T = batch
    params = state.params
    if gradient is None:
        value, grads, _, Y = loss_grad_output(params, activations, loss, x, T)
        correct, targets_ok = loss.correct(Y, T), loss.targets_valid(T)
    else:
        value, grads, correct, targets_ok = gradient(params, x, T)
    if reduce is not None:
        value, correct, targets_ok, grads = reduce(value, correct, targets_ok, grads)
    if penalty is not None:
        value, grads = penalty(value, grads, params, T)
    updates, opt_state = optimizer.update(grads, state.opt_state, params, step=state.step)
    metrics = StepMetrics(value, correct)

    def applied():
        return apply_updates(params, updates), opt_state, state.step + 1

    if not check_finite:
        p, o, k = applied()
        return state._replace(params=p, opt_state=o, step=k), metrics

    # The update's squared norm decides: finite and at most max/4 (|u_i| <= sqrt(max)/2)
    # proves every updated parameter finite, as no finite parameter can overflow by so
    # little, and a non-finite gradient always makes it non-finite (every update is
    # elementwise in the gradient; a clip scale of a NaN norm is NaN). One reduction over
    # the update, and the new parameters need not exist before the decision.
    ok, new_guard = guard_decision(state, value, T, step_is_finite(value, updates, opt_state),
                                   loss=loss, divergence_factor=divergence_factor,
                                   targets_ok=targets_ok)
    # (An elementwise where, fused into the update by XLA; jax.lax.cond would run one branch
    # only, but on a GPU it reads the predicate on the host, inside the compiled step.)
    p, o, k = select(ok, applied, lambda: (params, state.opt_state, state.step))
    return state._replace(params=p, opt_state=o, step=k, guard=new_guard), metrics


def host_select(ok: Array, if_ok: Any, if_not: Any) -> Any:
    """``select`` for :func:`train_step` on a backend whose values the host reads without a
    device wait (NumPy, PyTorch on the CPU): reads ``ok`` and computes one branch."""
    return if_ok() if bool(ok) else if_not()
