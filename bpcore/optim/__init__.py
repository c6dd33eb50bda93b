"""Optimizers as ``init``/``update`` pairs of pure functions (the optax pattern).

``opt.init(params) -> state`` and ``opt.update(grads, state, params, step=k) -> (updates,
state)``, where ``k`` is the number of updates applied so far (the training state's one step
counter; a Python int or a 0-d array). :func:`apply_updates` adds the updates to the
parameters. State is a NamedTuple of arrays and parameter-shaped lists, so on JAX it is a
pytree and the whole step jit-compiles. Every optimizer is a :func:`chain` of small
transformations; plain SGD is the derivation's ``θ ← θ − η ∂g/∂θ``.

The optimizers users pick by name (:data:`OPTIMIZERS`) return an :class:`Optimizer`, whose
``spec`` is a JSON-able description that :func:`from_spec` builds back (checkpoints store
it). Learning rates are numbers or schedules (:mod:`bpcore.optim.schedules`). Weight decay touches
the weights ``W`` only, never the biases (as scikit-learn's ``alpha``).
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Callable, NamedTuple, Union

from .._array import (Array, Params, array_namespace, clip_above, clip_below, nested_leaves,
                     nested_map)
from .._registry import lookup
from ..errors import ConfigError
from .inplace import inplace_form
from .schedules import (SCHEDULES, Schedule, check_rate, constant, cosine_decay,
                        schedule_from_spec, step_decay)

__all__ = [
    "GradientTransformation", "Optimizer", "chain", "apply_updates",
    "sgd", "momentum", "adam", "adamw", "OPTIMIZERS", "get_optimizer", "from_spec",
    "scale_by_learning_rate", "add_decayed_weights", "trace", "scale_by_adam",
    "clip_by_global_norm", "global_norm",
    "constant", "step_decay", "cosine_decay", "SCHEDULES",
]

LearningRate = Union[float, Callable[[Any], Any]]


class GradientTransformation(NamedTuple):
    """A pair of pure functions: ``init(params)`` and ``update(updates, state, params, *,
    step)``; optionally ``inplace``, the same update in place on flat buffers
    (:class:`bpcore.optim.inplace.InplaceUpdate`, which the in-place step runs)."""

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]
    inplace: Any = None


class Optimizer(NamedTuple):
    """A :class:`GradientTransformation` built by name, with its ``spec`` (None when a part
    of it, such as a custom learning-rate function, has no description) and its in-place
    form ``inplace`` (:mod:`bpcore.optim.inplace`; None: the executors run ``update``)."""

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]
    spec: dict | None
    inplace: Any = None


class EmptyState(NamedTuple):
    pass


class TraceState(NamedTuple):
    velocity: Params


class AdamState(NamedTuple):
    mu: Params
    nu: Params


def _zeros_like_tree(params: Params) -> Params:
    return nested_map(lambda a: array_namespace(a).zeros_like(a), params)


def _step_as_float(step: Any, like: Array) -> Any:
    """The 0-based step count as a float in the parameters' dtype (an array stays one)."""
    if step is None:
        raise ConfigError("update: this optimizer needs the step count; call "
                          "opt.update(grads, state, params, step=number_of_updates_so_far)")
    if isinstance(step, (int, float)):
        return float(step)
    return array_namespace(step).astype(step, like.dtype)


def _check_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{name}: expected a number in [0, 1), got {value!r}")
    return float(value)


def _check_lr(lr: Any) -> LearningRate:
    return lr if callable(lr) else check_rate("lr", lr)


# ---- transformations --------------------------------------------------------------------
def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params, *, step=None):
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, step=step)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: LearningRate) -> GradientTransformation:
    """``u ← -lr(step) · u``: the descent step itself (a schedule reads the step count)."""
    lr = _check_lr(lr)

    def update(u, state, params, *, step=None):
        rate = -lr(_step_as_float(step, params[0][0])) if callable(lr) else -lr
        return nested_map(lambda g: rate * g, u), state

    return GradientTransformation(lambda p: EmptyState(), update)


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """``u_W ← u_W + wd · W`` (weights only): L2 before a scaling, decoupled after it."""
    wd = check_rate("weight_decay", weight_decay, allow_zero=True)

    def update(u, state, params, *, step=None):
        return [(gW + wd * W, gb) for (gW, gb), (W, _) in zip(u, params)], state

    return GradientTransformation(lambda p: EmptyState(), update)


def trace(beta: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum ``v ← β v + g`` (PyTorch's convention); Nesterov: ``g + β v``."""
    beta = _check_unit("momentum", beta)

    def update(u, state, params, *, step=None):
        v = nested_map(lambda vel, g: beta * vel + g, state.velocity, u)
        out = nested_map(lambda vel, g: g + beta * vel, v, u) if nesterov else v
        return out, TraceState(v)

    return GradientTransformation(lambda p: TraceState(_zeros_like_tree(p)), update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                  ) -> GradientTransformation:
    """Adam's ``m̂ / (sqrt(v̂) + eps)`` with bias correction (Kingma & Ba, alg. 1)."""
    b1, b2 = _check_unit("b1", b1), _check_unit("b2", b2)
    eps = check_rate("eps", eps)
    lb1, lb2 = math.log(b1) if b1 > 0 else -math.inf, math.log(b2) if b2 > 0 else -math.inf

    def init(params):
        return AdamState(_zeros_like_tree(params), _zeros_like_tree(params))

    def update(u, state, params, *, step=None):
        xp = array_namespace(params[0][0])
        mu = nested_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, u)
        nu = nested_map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state.nu, u)
        t = _step_as_float(step, params[0][0]) + 1.0  # this is update number t (1-based)
        exp = math.exp if isinstance(t, float) else xp.exp
        c1 = 1.0 - exp(t * lb1)  # 1 - b1^t
        c2 = 1.0 - exp(t * lb2)
        out = nested_map(lambda m, v: (m / c1) / (xp.sqrt(v / c2) + eps), mu, nu)
        return out, AdamState(mu, nu)

    return GradientTransformation(init, update)


def global_norm(tree: Params) -> Array:
    """sqrt of the sum of squares of every leaf (a 0-d array on the device)."""
    leaves = nested_leaves(tree)
    xp = array_namespace(*leaves)
    return xp.sqrt(sum(xp.sum(leaf * leaf) for leaf in leaves))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all gradients by ``min(1, max_norm / ||g||)``, computed on the device."""
    max_norm = check_rate("clip_norm", max_norm)

    def update(u, state, params, *, step=None):
        scale = clip_above(max_norm / clip_below(global_norm(u), 1e-30), 1.0)
        return nested_map(lambda g: g * scale, u), state

    return GradientTransformation(lambda p: EmptyState(), update)


def apply_updates(params: Params, updates: Params) -> Params:
    """``θ + u`` leaf by leaf (new arrays; the inputs are not modified)."""
    return nested_map(lambda p, u: p + u, params, updates)


# ---- the optimizers users pick by name ------------------------------------------------------
def _named(name: str, parts: list[GradientTransformation], **settings: Any) -> Optimizer:
    lr, inplace, spec = settings["lr"], None, None
    if isinstance(lr, Schedule) or not callable(lr):  # (not a function of the user's own,
        inplace = inplace_form(name, settings)          # which cannot be described)
        spec = {"name": name, **settings, "lr": lr.spec if isinstance(lr, Schedule) else lr}
    t = chain(*parts)
    if spec is not None:
        _BUILT_BY_NAME.add(t.update)
    return Optimizer(t.init, t.update, spec, inplace)


# The update functions of the optimizers built here by name: elementwise, so the buffered
# step (bpcore.training.buffered) may run them on the flat parameter vector. An Optimizer of
# your own whose spec says "adam" keeps its own update, run by the generic step.
_BUILT_BY_NAME: "weakref.WeakSet[Callable]" = weakref.WeakSet()


def built_by_name(opt: Any) -> bool:
    """Whether ``opt`` is one of bpcore's named optimizers as built here (by the object)."""
    return isinstance(opt, Optimizer) and opt.spec is not None and opt.update in _BUILT_BY_NAME


def sgd(lr: LearningRate = 0.01, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0) -> Optimizer:
    """Gradient descent ``θ ← θ − η (∂g/∂θ + wd·W)``, optionally with (Nesterov) momentum."""
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, bool(nesterov)))
    elif nesterov:
        raise ConfigError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0")
    parts.append(scale_by_learning_rate(lr))
    return _named("sgd", parts, lr=lr, momentum=float(momentum), nesterov=bool(nesterov),
                  weight_decay=float(weight_decay))


def momentum(lr: LearningRate = 0.01, beta: float = 0.9, nesterov: bool = False,
             weight_decay: float = 0.0) -> Optimizer:
    """SGD with heavy-ball (or Nesterov) momentum ``beta`` (the same as ``sgd(momentum=)``)."""
    if not beta:
        raise ConfigError("beta: momentum needs beta > 0; use sgd() for plain descent")
    return sgd(lr, momentum=beta, nesterov=nesterov, weight_decay=weight_decay)


def adam(lr: LearningRate = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0) -> Optimizer:
    """Adam; ``weight_decay`` is classic L2 (added to the gradient before the moments)."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    parts += [scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr)]
    return _named("adam", parts, lr=lr, b1=float(b1), b2=float(b2), eps=float(eps),
                  weight_decay=float(weight_decay))


def adamw(lr: LearningRate = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Optimizer:
    """AdamW (Loshchilov & Hutter): decay decoupled from the moments, scaled by ``lr``."""
    parts = [scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay),
             scale_by_learning_rate(lr)]
    return _named("adamw", parts, lr=lr, b1=float(b1), b2=float(b2), eps=float(eps),
                  weight_decay=float(weight_decay))


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": sgd, "momentum": momentum, "adam": adam, "adamw": adamw,
}


def get_optimizer(name: Any, **kwargs: Any) -> Any:
    """An optimizer by name (``OPTIMIZERS``), built with ``kwargs``; instances pass through."""
    if isinstance(name, (GradientTransformation, Optimizer)):
        return name
    factory = lookup(OPTIMIZERS, name, kind="optimizer", argument="optimizer",
                     passthrough=type(None))
    return factory(**kwargs)


def from_spec(spec: Any) -> Optimizer:
    """Inverse of ``Optimizer.spec``: the same optimizer, built through :data:`OPTIMIZERS`.

    A spec that names no optimizer of the registry, or carries settings it does not take,
    is a ConfigError; nothing but the registry is ever looked up.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"optimizer: expected a spec {{'name': ..., settings}}, got "
                          f"{str(spec)[:80]}")
    if spec["name"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer: {spec['name']!r} is not one of bpcore's "
                          f"{sorted(OPTIMIZERS)}")
    settings = {k: v for k, v in spec.items() if k != "name"}
    if isinstance(settings.get("lr"), dict):
        settings["lr"] = schedule_from_spec(settings["lr"])
    try:
        return OPTIMIZERS[spec["name"]](**settings)
    except TypeError as e:
        raise ConfigError(f"optimizer: bad settings {settings} for {spec['name']!r}: {e}") \
            from None
