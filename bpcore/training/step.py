"""The training state as plain data, and the pure step that advances it.

``TrainState`` holds everything that changes during training — parameters, optimizer state,
the step count, the divergence guard and the epoch — as a NamedTuple of arrays (a pytree on
JAX). ``train_step(state, batch, ...) -> (state, metrics)`` is a pure function of it: the
backend's ``jit`` compiles it once per input shape, and a caller that wants the old state
back simply keeps the old value. There is one step counter, ``state.step``: the number of
updates applied, which the optimizer and its schedules read too.

The guard refuses a step, on the device and without a host sync, when its targets are
invalid (class labels out of range on the device, negative or non-finite targets), when the
loss is not finite, when the update is not finite or so large (a norm above
``sqrt(dtype max) / 2``, ~1e19 in float32) that it could overflow a parameter — a
non-finite gradient always makes it so —, when the new optimizer state is not finite, or
when the loss exceeds ``divergence_factor`` times the first step's loss. Parameters are finite when they enter (the model checks them),
so an accepted step keeps them finite. A refused step changes nothing but the
guard, which records its number and why; from then on every step is refused, so the state
is that of the last good step until someone reads the guard (``Trainer.check``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from .._array import Array, Params, array_device, array_namespace, nested_leaves, nested_map
from ..nn.activations import Activation
from ..backends._base import dtype_name
from ..nn.losses import Loss
from ..nn.mlp import loss_grad_output
from ..optim import GradientTransformation, apply_updates

__all__ = ["TrainState", "GuardState", "StepMetrics", "train_step", "init_state",
           "guard_decision", "step_is_finite", "tree_sq_norm", "where_select",
           "GUARD_NONFINITE", "GUARD_GREW", "GUARD_TARGETS", "DEFAULT_DIVERGENCE_FACTOR"]

GUARD_NONFINITE, GUARD_GREW, GUARD_TARGETS = 1, 2, 3
DEFAULT_DIVERGENCE_FACTOR = 1e4


class GuardState(NamedTuple):
    bad_step: Array   # 0-d int32: the first refused step (1-based), or 0
    reason: Array     # 0-d int32: why (a GUARD_* code), or 0
    ref_loss: Array   # 0-d float: the first step's loss, what "grew" is measured against;
    #                   NaN until a step has run


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


def train_step(state: TrainState, batch: tuple[Array, Array], *,
               activations: Sequence[Activation], loss: Loss,
               optimizer: GradientTransformation, check_finite: bool = True,
               divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR,
               reduce: Any = None) -> tuple[TrainState, StepMetrics]:
    """One guarded step of gradient descent (any optimizer) on ``batch = (x, T)``.

    ``T`` is in the loss's canonical form (``Trainer.prepare_batch`` makes it). With
    ``check_finite=False`` there is no guard: every step is applied as computed.
    ``reduce(value, correct, targets_ok, grads) -> (value, correct, targets_ok, grads)``, for
    data-parallel training over MPI (:mod:`bpcore.parallel`), turns this worker's loss,
    counts and gradients into the global batch's before the update and the guard see them.
    """
    x, T = batch
    params = state.params
    value, grads, _, Y = loss_grad_output(params, activations, loss, x, T)
    correct, targets_ok = loss.correct(Y, T), loss.targets_valid(T)
    if reduce is not None:
        value, correct, targets_ok, grads = reduce(value, correct, targets_ok, grads)
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
    p, o, k = where_select(ok, applied, lambda: (params, state.opt_state, state.step))
    return state._replace(params=p, opt_state=o, step=k, guard=new_guard), metrics


def step_is_finite(value: Array, updates: Any, opt_state: Any) -> Array:
    """The guard's test of one computed step (0-d bool, on the device): the loss is finite,
    the update bounded (``Σu² <= dtype max / 4``, which proves every updated parameter
    finite: no finite parameter overflows by so little, and a non-finite gradient makes the
    sum NaN), and the new optimizer state finite. The last is not implied by the first two:
    Adam's update ``m / sqrt(v)`` is 0 when ``g²`` overflows to inf, while ``v`` becomes inf
    for good. The state's test is one sum per leaf (inf or NaN anywhere makes it non-finite;
    a sum that overflows means a state near overflow, refused too)."""
    xp = array_namespace(value)
    ok = xp.isfinite(value) & (tree_sq_norm(updates) <= _quarter_max(value))
    for leaf in nested_leaves(opt_state):
        ok = ok & xp.isfinite(xp.sum(leaf))
    return ok


def tree_sq_norm(tree: Any) -> Array:
    """Σ of the squares of every element of every leaf (0-d, on the device)."""
    leaves = nested_leaves(tree)
    xp = array_namespace(*leaves)
    total = xp.sum(leaves[0] * leaves[0])
    for leaf in leaves[1:]:
        total = total + xp.sum(leaf * leaf)
    return total


def _quarter_max(value: Array) -> float:
    return float(np.finfo(dtype_name(value.dtype)).max) / 4


def where_select(ok: Array, if_ok: Any, if_not: Any) -> Any:
    """``if_ok()`` where the 0-d boolean ``ok`` holds, else ``if_not()``: both computed, then
    an elementwise ``where`` on every leaf."""
    xp = array_namespace(ok)
    return nested_map(lambda a, b: xp.where(ok, a, b), if_ok(), if_not())


def guard_decision(state: TrainState, value: Array, T: Array, finite: Array, *, loss: Loss,
                   divergence_factor: float | None, targets_ok: Array | None = None
                   ) -> tuple[Array, GuardState]:
    """Whether the step that produced loss ``value`` on targets ``T`` may be applied, and
    the guard after it. ``finite``: the loss is finite and the update bounded (see
    :func:`train_step`). ``targets_ok``: whether the targets are valid, when known already
    (every worker's, in data-parallel training); by default ``loss.targets_valid(T)``.

    The guard's rule, on the device without a host read. The in-place step
    (:mod:`bpcore.training.inplace`) evaluates the same rule on the host, where reading is free.
    """
    xp = array_namespace(value)
    guard = state.guard
    ref = xp.where(xp.isnan(guard.ref_loss), value, guard.ref_loss)  # NaN: not yet set
    if targets_ok is None:
        targets_ok = loss.targets_valid(T)
    grew = ((value > divergence_factor * ref) & (ref > 0) if divergence_factor else
            xp.zeros((), dtype=xp.bool, device=array_device(value)))
    was_bad = guard.bad_step != 0
    ok = targets_ok & finite & ~grew & ~was_bad
    none = guard.reason * 0  # the codes as int32 arrays (where() takes one scalar at most)
    why = xp.where(~targets_ok, GUARD_TARGETS,
                   xp.where(~finite, GUARD_NONFINITE, xp.where(grew, GUARD_GREW, none)))
    new_guard = GuardState(bad_step=xp.where(ok | was_bad, guard.bad_step, state.step + 1),
                           reason=xp.where(was_bad, guard.reason, xp.where(ok, none, why)),
                           ref_loss=ref)
    return ok, new_guard
