"""The in-place step: the buffered step (:mod:`bpcore.training.buffered`) with its update
and the guard's *finite* test overridden by faster host-side forms, for backends whose values
the host reads without a device wait (NumPy; PyTorch on the CPU).

What it does differently from :class:`~bpcore.training.buffered.BufferedStep`, and nothing
else:

* The update runs as fused in-place kernels over the flat buffers (``ops.adam_update_``,
  ``ops.momentum_update_``: PyTorch's own fused optimizer kernels, or NumPy in chunks that
  stay in cache), implementing bpcore's named optimizers (:data:`_HANDLED` lists the
  settings it implements; an optimizer with any other setting runs the buffered step, which
  runs the optimizer's own update).
* The guard's rule, :func:`bpcore.training.guard.guard_decision`, is evaluated on the host
  (:func:`~bpcore.training.guard.host_guard_decision`: the same function on host scalars)
  **before** anything is written. Its *finite* input is the loss's finiteness and a proof that
  the update is finite and no parameter overflows: the squared norm of the gradient (reused
  for ``clip_norm``) with bounds that follow from each optimizer's algebra. So a step the
  guard refuses has changed nothing, with no copy of the state to select from. When the
  proof does not go through (a gradient norm beyond ``dtype_max ** 0.25``, an update bound
  beyond ``sqrt(dtype_max) / 2``: absurd settings or a diverging run), the step runs the
  buffered step instead, which decides exactly as the generic step does.

So on every accepted and every refused step the state matches the generic step's to
round-off (``tests/test_inplace.py`` and ``tests/test_registry_kernels.py`` check it). The
Trainer uses this step when the backend offers it and the optimizer is one of bpcore's own
with settings listed in :data:`_HANDLED`; ``Trainer(..., inplace=False)`` turns it off.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..optim.schedules import schedule_from_spec
from .buffered import BufferedStep, buffered_unsupported_reason
from .guard import host_guard_decision
from .step import StepMetrics, TrainState

__all__ = ["InplaceStep", "BufferedStep", "executor_for", "unsupported_reason", "CHUNK"]

CHUNK = 1 << 16  # elements per chunk of an elementwise update with a temporary (fits L2)
# The settings of each named optimizer that the in-place update implements. An optimizer
# with any other setting (an option added to bpcore.optim later, say) runs the buffered step,
# which runs the optimizer's own update: the in-place one must never ignore a setting.
_HANDLED = {"sgd": {"name", "lr", "momentum", "nesterov", "weight_decay"},
            "adam": {"name", "lr", "b1", "b2", "eps", "weight_decay"}}
_HANDLED["adamw"] = _HANDLED["adam"]


def unsupported_reason(trainer: Any) -> str | None:
    """Why ``trainer`` cannot use the in-place step (None: it can)."""
    why = buffered_unsupported_reason(trainer)
    if why is not None:
        return why
    be = trainer.model.backend
    if not be.inplace_ops.host_reads:
        return (f"the {be.name} backend's values live on a device the host waits for: "
                "the buffered step runs there (its guard decided on the device)")
    spec = trainer.base_optimizer_spec
    if set(spec) - _HANDLED.get(spec["name"], set()):
        return (f"the in-place update does not implement the optimizer's setting(s) "
                f"{sorted(set(spec) - _HANDLED.get(spec['name'], set()))}: the buffered "
                "step runs it")
    return None


def executor_for(trainer: Any) -> tuple[BufferedStep | None, str | None]:
    """The fastest buffered executor ``trainer`` can use (the in-place step, else the
    buffered step), or ``(None, why)`` when neither can run."""
    why = buffered_unsupported_reason(trainer)
    if why is not None:
        return None, why
    if unsupported_reason(trainer) is None:
        return InplaceStep(trainer), None
    return BufferedStep(trainer), None


class InplaceStep(BufferedStep):
    """The in-place step for one Trainer; ``step(state, x, T) -> (state, metrics)``."""

    def __init__(self, trainer: Any):
        super().__init__(trainer)
        ops = self.ops
        self.clip_norm = trainer.clip_norm
        self.reduce_flat_ = trainer._workers.reduce_flat_  # data parallel (MPI), or None
        spec = dict(trainer.base_optimizer_spec)
        self.kind = spec["name"]
        lr = spec["lr"]
        self.lr: Callable[[float], float] | float = (schedule_from_spec(lr) if isinstance(lr, dict)
                                                     else float(lr))
        self.wd = float(spec.get("weight_decay", 0.0))
        self.beta = float(spec.get("momentum", 0.0))
        self.nesterov = bool(spec.get("nesterov", False))
        self.b1, self.b2 = float(spec.get("b1", 0.9)), float(spec.get("b2", 0.999))
        self.eps = float(spec.get("eps", 1e-8))
        if len(self.s_flat) != (2 if self.kind in ("adam", "adamw") else
                                (1 if self.beta else 0)):
            raise RuntimeError("in-place step: the optimizer state does not have the layout "
                               f"of {self.kind!r} (a bpcore bug)")
        dtype = trainer.model.dtype
        finfo = np.finfo(trainer.model.dtype_name)
        self.grad_sq_limit = math.sqrt(float(finfo.max))      # ||g||^2 allowed: max ** 1/2
        self.update_limit = math.sqrt(float(finfo.max)) / 2   # |u_i| with no overflow of p + u
        self.host_dtype = ops.host_dtype(self.p_flat)
        # Scratch for updates that need a temporary (chunked, so it stays in cache): the L2
        # weight-decay fold, and momentum/Adam where the backend has no fused kernel.
        scratch = ops.update_scratch and ((self.wd and self.kind != "adamw") or self.beta or
                                          self.kind != "sgd")
        width = min(CHUNK, self.n) if scratch else 0
        self.tmp = ops.empty((width,), dtype)
        self.tmp2 = ops.empty((width,), dtype)
        self.safe = False
        self.fallbacks = 0  # steps that ran the buffered step (for tests and benchmarks)

    def _scratch(self) -> list[Any]:
        return [self.tmp, self.tmp2]

    # -- the state --------------------------------------------------------------------------
    def _adopt(self, state: TrainState) -> TrainState:
        """Copy a state produced elsewhere into the buffers; measure what the proofs assume."""
        out = super()._adopt(state)
        self._measure()
        return out

    def _measure(self) -> None:
        ops = self.ops
        with ops.quiet():
            p_sq = ops.dot(self.p_flat, self.p_flat)
            m_sq = ops.dot(self.s_flat[0], self.s_flat[0]) if self.s_flat else 0.0
            nu_ok = True
            if len(self.s_flat) == 2:  # Adam's second moment: finite, small, never negative
                nu = self.s_flat[1]
                nu_ok = (ops.dot(nu, nu) <= self.grad_sq_limit and
                         float(nu.min()) >= 0.0)
        self.p_norm = math.sqrt(p_sq) if math.isfinite(p_sq) else math.inf
        self.m_norm = math.sqrt(m_sq) if math.isfinite(m_sq) else math.inf
        self.safe = (self.p_norm < self.update_limit and self.m_norm < self.update_limit
                     and nu_ok)

    def _fallback(self, state: TrainState, x: Any, T: Any, labels: Any):
        """The buffered step, from the start (the update may have scaled the gradient)."""
        self.fallbacks += 1
        out = super()._step(state, x, T, labels)
        self._measure()
        return out

    # -- the step -----------------------------------------------------------------------------
    def _step(self, state, x, T, labels):
        if state is not self._out:
            state = self._adopt(state)
        if not self.safe and self.check_finite:
            return self._fallback(state, x, T, labels)
        ops = self.ops
        value, correct = self._gradient(x, T, labels)
        # (labels were range-checked at the boundary; T: the loss's rule on host floats)
        targets_ok = T is None or bool(self.loss.targets_in_range(float(T.min()),
                                                                  float(T.max())))
        if self.reduce_flat_ is not None:  # data parallel: the global batch's gradient
            value, correct, targets_ok = self.reduce_flat_(
                ops.host_view(self.g_flat), value, correct, targets_ok)
            value, correct = ops.scalar(value, self.p_flat), ops.scalar(correct, self.p_flat)
        metrics = StepMetrics(value, correct)
        step = state.step
        if self.check_finite:
            # finite: the loss; the update is proved bounded before it is written (_update)
            ok, guard = host_guard_decision(
                state, value, math.isfinite(float(value)), targets_ok, loss=self.loss,
                divergence_factor=self.divergence_factor, scalar=ops.scalar,
                host_dtype=self.host_dtype)
            if not ok:  # refused before anything was written
                self._out = state._replace(guard=guard)
                return self._out, metrics
        else:
            guard = state.guard
        if not self._update(int(step)) and self.check_finite:
            return self._fallback(state, x, T, labels)  # no proof the update is safe
        self._out = TrainState(self.params, self.opt_state, step + 1, guard, state.epoch)
        return self._out, metrics

    # -- the update -----------------------------------------------------------------------------
    def _update(self, step: int) -> bool:
        """Apply the optimizer's update in place; False (nothing written) when the update
        cannot be proved finite without overflow (only when the guard is on)."""
        ops, g, p = self.ops, self.g_flat, self.p_flat
        guarded = self.check_finite
        lr = self.lr(float(step)) if callable(self.lr) else self.lr
        lr = float(lr)
        g_sq = None
        if self.clip_norm is not None:
            g_sq = ops.dot(g, g)
            if not math.isfinite(g_sq) and guarded:
                return False
            norm = math.sqrt(g_sq) if math.isfinite(g_sq) else math.nan
            scale = min(self.clip_norm / max(norm, 1e-30), 1.0) if not math.isnan(norm) else math.nan
            if scale != 1.0:
                ops.mul(g, scale, g)
                g_sq *= scale * scale
        if self.wd and self.kind != "adamw":  # L2: add wd·W to the weights' gradient
            ops.axpy_(g[:self.nW], self.wd, p[:self.nW], (self.tmp, self.tmp2))
            g_sq = None  # the folded gradient's norm is measured below
        if g_sq is None:
            g_sq = ops.dot(g, g) if guarded else 0.0
        if guarded and not g_sq <= self.grad_sq_limit:
            return False
        g_norm = math.sqrt(g_sq)
        if self.kind == "sgd":
            return self._sgd(lr, g_norm, guarded)
        return self._adam(lr, step, g_norm, guarded)

    def _sgd(self, lr: float, g_norm: float, guarded: bool) -> bool:
        ops, g, p = self.ops, self.g_flat, self.p_flat
        if not self.beta:  # u = -lr g, ||u|| = lr ||g||
            if guarded and not lr * g_norm <= self.update_limit:
                return False
            ops.add_scaled_(p, g, -lr)              # θ ← θ - lr g
            self.p_norm += lr * g_norm
            return True
        beta, v = self.beta, self.s_flat[0]
        v_norm = beta * self.m_norm + g_norm                 # ||β v + g|| <= β||v|| + ||g||
        bound = lr * (g_norm + beta * v_norm if self.nesterov else v_norm)
        if guarded and not (v_norm <= self.update_limit and bound <= self.update_limit):
            return False
        ops.momentum_update_(p, g, v, lr, beta, self.nesterov, (self.tmp, self.tmp2))
        self.m_norm, self.p_norm = v_norm, self.p_norm + bound
        return True

    def _adam(self, lr: float, step: int, g_norm: float, guarded: bool) -> bool:
        ops, g, p = self.ops, self.g_flat, self.p_flat
        b1, b2, eps, m, v = self.b1, self.b2, self.eps, self.s_flat[0], self.s_flat[1]
        t = float(step) + 1.0
        c1 = 1.0 - math.exp(t * math.log(b1)) if b1 > 0 else 1.0
        m_norm = b1 * self.m_norm + (1.0 - b1) * g_norm
        # |m̂ / (sqrt(v̂) + eps)| <= |m̂| / eps, and AdamW adds wd·W.
        decoupled = self.wd if self.kind == "adamw" else 0.0
        bound = lr * (m_norm / (c1 * eps) + decoupled * self.p_norm)
        if guarded and not bound <= self.update_limit and decoupled:
            # self.p_norm is a bound that only grows: measure the parameters' norm afresh.
            p_sq = ops.dot(p, p)
            self.p_norm = math.sqrt(p_sq) if math.isfinite(p_sq) else math.inf
            bound = lr * (m_norm / (c1 * eps) + decoupled * self.p_norm)
        if guarded and not bound <= self.update_limit:
            return False
        ops.adam_update_(p, g, m, v, t, lr, b1, b2, eps, decoupled, self.nW,
                         (self.tmp, self.tmp2))
        self.m_norm, self.p_norm = m_norm, self.p_norm + bound  # 2-norm bounds
        return True
