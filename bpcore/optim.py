"""Optimizers as ``init``/``update`` pairs of pure functions (the optax pattern).

``opt.init(params) -> state`` and ``opt.update(grads, state, params) -> (updates, state)``;
:func:`apply_updates` adds the updates to the parameters. State is a NamedTuple of arrays
and parameter-shaped lists, so on JAX it is a pytree and the whole step jit-compiles.
Every optimizer is a :func:`chain` of small transformations; plain SGD is the
derivation's ``θ ← θ − η ∂g/∂θ``.

Learning rates are numbers or schedules: functions of the step count (a 0-d float array,
or a Python number) returning the rate. Weight decay touches the weights ``W`` only, never
the biases (as scikit-learn's ``alpha``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import numpy as np

from ._array import (Array, Params, array_device, array_namespace, clip_above, clip_below,
                     tree_leaves, tree_map)
from ._registry import lookup
from .errors import ConfigError

__all__ = [
    "GradientTransformation", "chain", "apply_updates",
    "sgd", "momentum", "adam", "adamw", "OPTIMIZERS", "get_optimizer",
    "scale_by_learning_rate", "add_decayed_weights", "trace", "scale_by_adam",
    "clip_by_global_norm", "global_norm",
    "constant", "step_decay", "cosine_decay", "SCHEDULES",
]

Schedule = Callable[[Any], Any]
LearningRate = Union[float, Schedule]


class GradientTransformation(NamedTuple):
    """A pair of pure functions; ``name`` and ``hyper`` describe it for checkpoints."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]
    name: str = "custom"
    hyper: dict = {}


class EmptyState(NamedTuple):
    pass


class CountState(NamedTuple):
    count: Array  # 0-d int32: the number of updates applied so far


class TraceState(NamedTuple):
    velocity: Params


class AdamState(NamedTuple):
    count: Array
    mu: Params
    nu: Params


def _zeros_like_tree(params: Params) -> Params:
    return tree_map(lambda a: array_namespace(a).zeros_like(a), params)


def _new_count(params: Params) -> Array:
    W = params[0][0]
    xp = array_namespace(W)
    return xp.zeros((), dtype=xp.int32, device=array_device(W))


def _count_as_float(count: Array, like: Array) -> Array:
    """The 1-based step number as a 0-d float in the parameters' dtype."""
    xp = array_namespace(count)
    return xp.astype(count + 1, like.dtype)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if callable(value):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}: expected a finite number {bound}, got {value!r}")


def _check_unit(name: str, value: float) -> None:
    if not (0.0 <= float(value) < 1.0):
        raise ConfigError(f"{name}: expected a number in [0, 1), got {value!r}")


# ---- transformations --------------------------------------------------------------------
def chain(*transforms: GradientTransformation, name: str = "chain",
          hyper: dict | None = None) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params):
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update, name, dict(hyper or {}))


def scale_by_learning_rate(lr: LearningRate) -> GradientTransformation:
    """``u ← -lr(step) · u``: the descent step itself."""
    _check_positive("lr", lr)
    if not callable(lr):
        rate = float(lr)
        return GradientTransformation(
            lambda p: EmptyState(),
            lambda u, s, p: (tree_map(lambda g: -rate * g, u), s))

    def update(u, state, params):
        step = _count_as_float(state.count, params[0][0]) - 1.0  # schedules start at 0
        rate = lr(step)
        return tree_map(lambda g: -rate * g, u), CountState(state.count + 1)

    return GradientTransformation(lambda p: CountState(_new_count(p)), update)


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """``u_W ← u_W + wd · W`` (weights only): L2 before a scaling, decoupled after it."""
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    wd = float(weight_decay)

    def update(u, state, params):
        return [(gW + wd * W, gb) for (gW, gb), (W, _) in zip(u, params)], state

    return GradientTransformation(lambda p: EmptyState(), update)


def trace(beta: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum ``v ← β v + g`` (PyTorch's convention); Nesterov: ``g + β v``."""
    _check_unit("momentum", beta)

    def update(u, state, params):
        v = tree_map(lambda vel, g: beta * vel + g, state.velocity, u)
        out = tree_map(lambda vel, g: g + beta * vel, v, u) if nesterov else v
        return out, TraceState(v)

    return GradientTransformation(lambda p: TraceState(_zeros_like_tree(p)), update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                  ) -> GradientTransformation:
    """Adam's ``m̂ / (sqrt(v̂) + eps)`` with bias correction (Kingma & Ba, alg. 1)."""
    _check_unit("b1", b1)
    _check_unit("b2", b2)
    _check_positive("eps", eps)
    lb1, lb2 = math.log(b1) if b1 > 0 else -math.inf, math.log(b2) if b2 > 0 else -math.inf

    def init(params):
        return AdamState(_new_count(params), _zeros_like_tree(params), _zeros_like_tree(params))

    def update(u, state, params):
        xp = array_namespace(params[0][0])
        mu = tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, u)
        nu = tree_map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state.nu, u)
        t = _count_as_float(state.count, params[0][0])
        c1 = 1.0 - xp.exp(t * lb1)  # 1 - b1^t, with t an array on the device
        c2 = 1.0 - xp.exp(t * lb2)
        out = tree_map(lambda m, v: (m / c1) / (xp.sqrt(v / c2) + eps), mu, nu)
        return out, AdamState(state.count + 1, mu, nu)

    return GradientTransformation(init, update)


def global_norm(tree: Params) -> Array:
    """sqrt of the sum of squares of every leaf (a 0-d array on the device)."""
    leaves = tree_leaves(tree)
    xp = array_namespace(*leaves)
    return xp.sqrt(sum(xp.sum(leaf * leaf) for leaf in leaves))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all gradients by ``min(1, max_norm / ||g||)``, computed on the device."""
    _check_positive("clip_norm", max_norm)
    max_norm = float(max_norm)

    def update(u, state, params):
        scale = clip_above(max_norm / clip_below(global_norm(u), 1e-30), 1.0)
        return tree_map(lambda g: g * scale, u), state

    return GradientTransformation(lambda p: EmptyState(), update)


def apply_updates(params: Params, updates: Params) -> Params:
    """``θ + u`` leaf by leaf (new arrays; the inputs are not modified)."""
    return tree_map(lambda p, u: p + u, params, updates)


# ---- the optimizers users pick by name ------------------------------------------------------
def sgd(lr: LearningRate = 0.01, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> GradientTransformation:
    """Gradient descent ``θ ← θ − η (∂g/∂θ + wd·W)``, optionally with (Nesterov) momentum."""
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, nesterov))
    elif nesterov:
        raise ConfigError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0")
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts, name="momentum" if momentum else "sgd",
                 hyper=_hyper(lr=lr, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay))


def momentum(lr: LearningRate = 0.01, beta: float = 0.9, nesterov: bool = False,
             weight_decay: float = 0.0) -> GradientTransformation:
    """SGD with heavy-ball (or Nesterov) momentum ``beta``."""
    if not beta:
        raise ConfigError("beta: momentum needs beta > 0; use sgd() for plain descent")
    return sgd(lr, momentum=beta, nesterov=nesterov, weight_decay=weight_decay)


def adam(lr: LearningRate = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0) -> GradientTransformation:
    """Adam; ``weight_decay`` is classic L2 (added to the gradient before the moments)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    parts += [scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr)]
    return chain(*parts, name="adam",
                 hyper=_hyper(lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def adamw(lr: LearningRate = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter): decay decoupled from the moments, scaled by ``lr``."""
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay),
                 scale_by_learning_rate(lr), name="adamw",
                 hyper=_hyper(lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def _hyper(**kw: Any) -> dict:
    return {k: (getattr(v, "spec", "schedule") if callable(v) else v) for k, v in kw.items()}


OPTIMIZERS: dict[str, Callable[..., GradientTransformation]] = {
    "sgd": sgd, "momentum": momentum, "adam": adam, "adamw": adamw,
}


def get_optimizer(name: str | GradientTransformation, **kwargs: Any) -> GradientTransformation:
    """An optimizer by name (``OPTIMIZERS``), built with ``kwargs``; instances pass through."""
    if isinstance(name, GradientTransformation):
        return name
    factory = lookup(OPTIMIZERS, name, kind="optimizer", argument="optimizer",
                     passthrough=type(None))
    return factory(**kwargs)


# ---- learning-rate schedules: plain functions of the step (0-based) -------------------------
def _ns(step: Any):
    return np if isinstance(step, (int, float, np.generic, np.ndarray)) else array_namespace(step)


def _spec(fn: Schedule, spec: dict) -> Schedule:
    fn.spec = spec  # type: ignore[attr-defined]  # recorded in checkpoints
    return fn


def constant(value: float) -> Schedule:
    """``lr(step) = value``."""
    _check_positive("lr", value)
    value = float(value)
    return _spec(lambda step: value + 0.0 * step, {"schedule": "constant", "value": value})


def step_decay(value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``lr(step) = value · gamma^floor(step / step_size)``."""
    _check_positive("lr", value)
    if int(step_size) < 1:
        raise ConfigError(f"step_size: expected a positive integer, got {step_size!r}")
    _check_positive("gamma", gamma)
    value, step_size, lg = float(value), int(step_size), math.log(gamma)

    def schedule(step):
        xp = _ns(step)
        return value * xp.exp(xp.floor(step / step_size) * lg)

    return _spec(schedule, {"schedule": "step", "value": value, "step_size": step_size,
                            "gamma": gamma})


def cosine_decay(value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine from ``value`` at step 0 to ``alpha · value`` at ``decay_steps``, then flat."""
    _check_positive("lr", value)
    if int(decay_steps) < 1:
        raise ConfigError(f"decay_steps: expected a positive integer, got {decay_steps!r}")
    value, decay_steps, alpha = float(value), int(decay_steps), float(alpha)

    def schedule(step):
        xp = _ns(step)
        frac = xp.where(step > decay_steps, float(decay_steps), step) / decay_steps
        return value * ((1.0 - alpha) * 0.5 * (1.0 + xp.cos(math.pi * frac)) + alpha)

    return _spec(schedule, {"schedule": "cosine", "value": value, "decay_steps": decay_steps,
                            "alpha": alpha})


SCHEDULES = {"constant": constant, "step": step_decay, "cosine": cosine_decay}
