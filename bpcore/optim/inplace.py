"""Optimizers' updates in place: the fast form an optimizer carries beside its generic one.

An :class:`~bpcore.optim.Optimizer` (or any :class:`~bpcore.optim.GradientTransformation`)
may carry ``inplace``: an :class:`InplaceUpdate` that applies *the same* update to flat
buffers (all ``W``, then all ``b``; :class:`bpcore._layout.FlatLayout`) through a backend's
fused kernels (``Backend.inplace_ops``), and states a bound on it. The in-place step
(:mod:`bpcore.training.inplace`) runs it; an optimizer without one runs its own ``update``
in the buffered step. The executor dispatches on this object, never on a name: an optimizer
of your own whose spec says ``"adam"`` carries no in-place form and keeps its own update.

The bound is what lets the in-place step decide its guard before writing anything: given
bounds on the 2-norms of the gradient, the parameters and the first moment (``Norms``), an
update returns False (and writes nothing) unless every updated value provably stays finite,
``|u_i| <= limit = sqrt(dtype_max) / 2``. Each form states its optimizer's algebra for that
bound (``bounds``) beside its kernel call (``write_``); :meth:`InplaceUpdate.apply_`, the
decision between them, is written once.

:func:`inplace_form` builds the form of a named optimizer from its settings, and builds none
when a setting is one it does not implement: a new option added to an optimizer in
:mod:`bpcore.optim` then runs the generic update until its kernel learns it, never ignored.
``tests/test_registry_kernels.py`` holds every form to its generic update to 1e-12.
"""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["InplaceUpdate", "Norms", "SGDUpdate", "AdamUpdate", "inplace_form"]


class Norms:
    """Upper bounds on 2-norms that the in-place step carries from step to step: of the
    parameters (``p``) and of the first optimizer moment (``m``; the velocity for SGD)."""

    __slots__ = ("p", "m")

    def __init__(self, p: float = math.inf, m: float = math.inf):
        self.p, self.m = p, m


def _rate(lr: Any) -> Callable[[int], float] | float:
    return lr if callable(lr) else float(lr)


class InplaceUpdate:
    """An optimizer's update, in place on flat buffers.

    ``n_moments``: the flat moment buffers its state holds (0, 1 or 2; the first is the one
    ``Norms.m`` bounds). ``l2``: a weight decay the in-place step folds into the weights'
    gradient (``g_W += l2·W``) before calling :meth:`apply_`, as the generic chain adds it
    before the other transformations (0: none). ``scratch``: whether the kernels need the
    backend's chunk scratch (``ops.update_scratch`` decides whether it exists at all)."""

    n_moments = 0
    l2 = 0.0
    scratch = False

    def rate(self, step: int) -> float:
        """The learning rate of the update that follows ``step`` updates."""
        lr = self.lr
        return float(lr(float(step))) if callable(lr) else lr

    def moments_ok(self, ops: Any, moments: list[Any], g_sq_limit: float) -> bool:
        """Whether moments made elsewhere (a checkpoint, another executor) satisfy what
        :meth:`bounds` assumes beyond ``Norms.m`` (measured by the step)."""
        return True

    def bounds(self, lr: float, step: int, g_norm: float, norms: Norms, ops: Any, p: Any,
               limit: float) -> tuple[float, float]:
        """``(m, u)``: bounds on the 2-norms of the new first moment and of the update, from
        the gradient's norm and ``norms`` (this optimizer's algebra)."""
        raise NotImplementedError

    def write_(self, ops: Any, p: Any, g: Any, moments: list[Any], lr: float, step: int,
               n_weights: int, tmp: Any) -> None:
        """The update itself, in place (``g`` may be overwritten)."""
        raise NotImplementedError

    def apply_(self, ops: Any, p: Any, g: Any, moments: list[Any], step: int, n_weights: int,
               g_norm: float, norms: Norms, limit: float, guarded: bool, tmp: Any) -> bool:
        """Apply the update for the gradient ``g`` and update ``norms``. With ``guarded``,
        return False and write nothing unless the bounds prove every ``|u_i| <= limit``
        (and the new moment's norm within it)."""
        lr = self.rate(step)
        m_norm, bound = self.bounds(lr, step, g_norm, norms, ops, p, limit)
        if guarded and not (m_norm <= limit and bound <= limit):
            return False
        self.write_(ops, p, g, moments, lr, step, n_weights, tmp)
        norms.m, norms.p = m_norm, norms.p + bound
        return True


class SGDUpdate(InplaceUpdate):
    """bpcore's :func:`~bpcore.optim.sgd`: ``v ← β v + g``, ``θ ← θ - lr (v, or g + β v
    with Nesterov)``; plain descent without momentum. L2 ``weight_decay`` is folded first."""

    def __init__(self, lr: Any, momentum: float, nesterov: bool, weight_decay: float):
        self.lr = _rate(lr)
        self.beta, self.nesterov, self.l2 = float(momentum), bool(nesterov), float(weight_decay)
        self.n_moments = 1 if self.beta else 0
        self.scratch = bool(self.beta)

    def bounds(self, lr, step, g_norm, norms, ops, p, limit):
        if not self.beta:  # u = -lr g
            return 0.0, lr * g_norm
        v_norm = self.beta * norms.m + g_norm                # ||β v + g|| <= β||v|| + ||g||
        return v_norm, lr * (g_norm + self.beta * v_norm if self.nesterov else v_norm)

    def write_(self, ops, p, g, moments, lr, step, n_weights, tmp):
        if not self.beta:
            ops.add_scaled_(p, g, -lr)                       # θ ← θ - lr g
        else:
            ops.momentum_update_(p, g, moments[0], lr, self.beta, self.nesterov, tmp)


class AdamUpdate(InplaceUpdate):
    """bpcore's :func:`~bpcore.optim.adam` (L2 ``weight_decay`` folded first) and
    :func:`~bpcore.optim.adamw` (``decoupled``: ``u -= lr·wd·W`` after the Adam direction),
    with Kingma & Ba's bias correction."""

    n_moments = 2
    scratch = True

    def __init__(self, lr: Any, b1: float, b2: float, eps: float, weight_decay: float,
                 decoupled: bool):
        self.lr = _rate(lr)
        self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)
        self.decoupled = float(weight_decay) if decoupled else 0.0
        self.l2 = 0.0 if decoupled else float(weight_decay)

    def moments_ok(self, ops, moments, g_sq_limit):
        nu = moments[1]  # the second moment: finite, small, never negative
        return ops.dot(nu, nu) <= g_sq_limit and float(nu.min()) >= 0.0

    def _corrections(self, step: int) -> tuple[float, float]:
        t = float(step) + 1.0  # this is update number t (1-based): 1 - b^t
        return tuple(1.0 - math.exp(t * math.log(b)) if b > 0 else 1.0
                     for b in (self.b1, self.b2))

    def bounds(self, lr, step, g_norm, norms, ops, p, limit):
        c1, _ = self._corrections(step)
        m_norm = self.b1 * norms.m + (1.0 - self.b1) * g_norm
        # |m̂ / (sqrt(v̂) + eps)| <= |m̂| / eps, and AdamW adds wd·W.
        decay = self.decoupled
        bound = lr * (m_norm / (c1 * self.eps) + decay * norms.p)
        if not bound <= limit and decay:
            # norms.p is a bound that only grows: measure the parameters' norm afresh.
            p_sq = ops.dot(p, p)
            norms.p = math.sqrt(p_sq) if math.isfinite(p_sq) else math.inf
            bound = lr * (m_norm / (c1 * self.eps) + decay * norms.p)
        return m_norm, bound

    def write_(self, ops, p, g, moments, lr, step, n_weights, tmp):
        # Adam's "efficient form" (Kingma & Ba, sec. 2): lr (m/c1) / (sqrt(v/c2) + eps) =
        # alpha m / (sqrt(v) + eps sqrt(c2)), alpha = lr sqrt(c2) / c1.
        c1, c2 = self._corrections(step)
        ops.adam_update_(p, g, moments[0], moments[1], lr * math.sqrt(c2) / c1,
                         self.eps * math.sqrt(c2), self.b1, self.b2, lr * self.decoupled,
                         n_weights, tmp)


# The settings of each named optimizer that its in-place form implements.
_FORMS: dict[str, tuple[Callable[..., InplaceUpdate], frozenset]] = {
    "sgd": (lambda s: SGDUpdate(s["lr"], s["momentum"], s["nesterov"], s["weight_decay"]),
            frozenset({"lr", "momentum", "nesterov", "weight_decay"})),
    "adam": (lambda s: AdamUpdate(s["lr"], s["b1"], s["b2"], s["eps"], s["weight_decay"], False),
             frozenset({"lr", "b1", "b2", "eps", "weight_decay"})),
    "adamw": (lambda s: AdamUpdate(s["lr"], s["b1"], s["b2"], s["eps"], s["weight_decay"], True),
              frozenset({"lr", "b1", "b2", "eps", "weight_decay"})),
}


def inplace_form(name: str, settings: dict) -> InplaceUpdate | None:
    """The in-place form of the named optimizer ``name`` built with ``settings`` (its
    arguments, the learning rate as given), or None when a setting is one the form does not
    implement (the optimizer then runs its own update)."""
    form = _FORMS.get(name)
    if form is None or set(settings) != form[1]:
        return None
    return form[0](settings)
