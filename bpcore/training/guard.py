"""The divergence guard: one rule, decided on the device without a host read.

A step is applied only when its targets are valid, its loss is finite, its update is finite
and bounded (which proves every updated parameter finite), its new optimizer state is finite,
and its loss has not grown past ``divergence_factor`` times the first step's. A refused step
changes nothing but the guard, which records its number and why; every later step is refused
too, until :func:`raise_if_refused` (``Trainer.check``) reports it. :func:`bpcore.training.
step.train_step`, both of its buffered executors and the estimators of :mod:`bpcore.sklearn`
decide by :func:`guard_decision`: on the device, or, where the host reads the step's values
for free (the in-place step on NumPy and CPU PyTorch), the same function on host scalars
(:func:`host_guard_decision`), which costs a few microseconds instead of a dozen array calls.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .._array import Array, array_device, array_namespace, nested_leaves, nested_map
from ..backends._base import dtype_name
from ..errors import ConfigError, DivergenceError, ShapeError
from ..nn.losses import Loss

__all__ = ["GuardState", "guard_decision", "host_guard_decision", "step_is_finite",
           "tree_sq_norm", "where_select", "raise_if_refused", "checked_divergence_factor",
           "GUARD_NONFINITE", "GUARD_GREW", "GUARD_TARGETS", "DEFAULT_DIVERGENCE_FACTOR"]

GUARD_NONFINITE, GUARD_GREW, GUARD_TARGETS = 1, 2, 3
DEFAULT_DIVERGENCE_FACTOR = 1e4


def checked_divergence_factor(factor: Any) -> float | None:
    """The guard's ``divergence_factor`` setting as a float (None: only non-finite values
    count); a ConfigError for anything but a number in (1, inf)."""
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating,
                                                           np.integer)) \
            or not 1.0 < float(factor) < math.inf:
        raise ConfigError(f"divergence_factor: expected a number > 1 (or None), got {factor!r}")
    return float(factor)


class GuardState(NamedTuple):
    bad_step: Array   # 0-d int32: the first refused step (1-based), or 0
    reason: Array     # 0-d int32: why (a GUARD_* code), or 0
    ref_loss: Array   # 0-d float: the first step's loss, what "grew" is measured against;
    #                   NaN until a step has run


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


def guard_decision(state: Any, value: Array, T: Array, finite: Array, *, loss: Loss,
                   divergence_factor: float | None, targets_ok: Array | None = None,
                   xp: Any = None) -> tuple[Array, GuardState]:
    """Whether the step that produced loss ``value`` on targets ``T`` may be applied, and
    the guard after it. ``finite``: the loss is finite and the update bounded (see
    :func:`train_step`). ``targets_ok``: whether the targets are valid, when known already
    (every worker's, in data-parallel training); by default ``loss.targets_valid(T)``.

    The guard's rule, on the device without a host read; ``xp``: the namespace it is
    evaluated in (by default ``value``'s; :func:`host_guard_decision` passes host scalars').
    """
    xp = xp or array_namespace(value)
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


class _HostScalars:
    """What :func:`guard_decision` asks of a namespace, for NumPy scalars on the host: its
    arithmetic rounds in the step's dtype as the device's does (a Python float is "weak")."""

    isnan = staticmethod(math.isnan)  # (a Python bool: faster than NumPy's on a scalar)
    bool = np.bool_

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def zeros(shape: tuple, dtype: Any = None, device: Any = None) -> Any:
        return np.False_


class _HostState(NamedTuple):
    step: Any
    guard: GuardState


def host_guard_decision(state: Any, value: Any, finite: bool, targets_ok: bool, *,
                        loss: Loss, divergence_factor: float | None, scalar: Any,
                        host_dtype: Any) -> tuple[bool, GuardState]:
    """:func:`guard_decision` evaluated on the host, for an executor whose values the host
    reads without a device wait: the same function, on NumPy scalars of the step's dtype
    (``host_dtype``). Returns ``(ok, guard)`` with ``ok`` a bool and ``guard`` made of the
    backend's 0-d arrays (``scalar(value, like)``; the old ones where nothing changed)."""
    g = state.guard
    ref = host_dtype(float(g.ref_loss))
    host = _HostState(np.int32(int(state.step)), GuardState(
        np.int32(int(g.bad_step)), np.int32(int(g.reason)), ref))
    ok, new = guard_decision(host, host_dtype(float(value)), None, np.bool_(finite),
                             loss=loss, divergence_factor=divergence_factor,
                             targets_ok=np.bool_(targets_ok), xp=_HostScalars)
    ok = bool(ok)
    if ok and not math.isnan(ref):  # (the usual step: nothing changed)
        return ok, g
    like = g.ref_loss
    return ok, GuardState(
        bad_step=g.bad_step if new.bad_step == host.guard.bad_step else
        scalar(int(new.bad_step), like),
        reason=g.reason if new.reason == host.guard.reason else scalar(int(new.reason), like),
        ref_loss=g.ref_loss if not math.isnan(ref) else scalar(float(new.ref_loss), like))


def raise_if_refused(guard: GuardState, n_classes: int, divergence_factor: float | None
                     ) -> None:
    """Raise if ``guard`` (read from the device) records a refused step:
    :class:`DivergenceError`, or :class:`ShapeError` for invalid targets."""
    bad = int(guard.bad_step)
    if not bad:
        return
    reason = int(guard.reason)
    kept = (f"The parameters and optimizer state are those after step {bad - 1}, the last "
            "good one (every later step was refused).")
    if reason == GUARD_TARGETS:
        raise ShapeError(
            f"training stopped at step {bad}: its targets were invalid (a class label "
            f"outside [0, {n_classes - 1}], a negative or non-finite target, or "
            f"a binary target outside [0, 1]). {kept} Check the labels; labels on the "
            "device are only checked inside the step.")
    if reason == GUARD_GREW:
        raise DivergenceError(
            f"training diverged at step {bad}: its loss grew past {divergence_factor:g}"
            f" times the first step's loss ({float(guard.ref_loss):.4g}). {kept}"
            " Lower the learning rate or clip gradients (clip_norm=...); "
            "divergence_factor=None turns this limit off.")
    raise DivergenceError(
        f"training diverged at step {bad}: the loss, a gradient or an updated parameter "
        f"was not finite. {kept} Lower the learning rate, clip gradients "
        "(clip_norm=...), or check the data for NaN/inf.")
