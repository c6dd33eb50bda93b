"""The in-place step: the buffered step (:mod:`bpcore.training.buffered`) with its update
and the guard's *finite* test overridden by faster host-side forms, for backends whose values
the host reads without a device wait (NumPy; PyTorch on the CPU).

What it does differently from :class:`~bpcore.training.buffered.BufferedStep`, and nothing
else:

* The update is the optimizer's own in-place form, the object it carries beside its generic
  update (``optimizer.inplace``, :mod:`bpcore.optim.inplace`): fused kernels over the flat
  buffers (PyTorch's own fused optimizer kernels, or NumPy in chunks that stay in cache). An
  optimizer without one runs the buffered step, which runs the optimizer's ``update``.
  A penalty (scikit-learn's L2, :mod:`bpcore.sklearn`) runs its in-place form likewise.
* The guard's rule, :func:`bpcore.training.guard.guard_decision`, is evaluated on the host
  (:func:`~bpcore.training.guard.host_guard_decision`: the same function on host scalars)
  **before** anything is written. Its *finite* input is the loss's finiteness and a proof that
  the update is finite and no parameter overflows: the squared norm of the gradient (reused
  for ``clip_norm``) with the bound each in-place form states for its algebra. So a step the
  guard refuses has changed nothing, with no copy of the state to select from. When the
  proof does not go through (a gradient norm beyond ``dtype_max ** 0.25``, an update bound
  beyond ``sqrt(dtype_max) / 2``: absurd settings or a diverging run), the step runs the
  buffered step instead, which decides exactly as the generic step does.

So on every accepted and every refused step the state matches the generic step's to
round-off (``tests/test_inplace.py`` and ``tests/test_registry_kernels.py`` check it).
``Trainer(..., inplace=False)`` turns it off.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..optim.inplace import Norms
from .buffered import BufferedStep, buffered_unsupported_reason
from .guard import host_guard_decision
from .step import StepMetrics, TrainState

__all__ = ["InplaceStep", "BufferedStep", "unsupported_reason", "CHUNK"]

CHUNK = 1 << 16  # elements per chunk of an elementwise update with a temporary (fits L2)


def unsupported_reason(trainer: Any) -> str | None:
    """Why ``trainer`` cannot use the in-place step (None: it can)."""
    why = buffered_unsupported_reason(trainer)
    if why is not None:
        return why
    be = trainer.model.backend
    if not be.inplace_ops.host_reads:
        return (f"the {be.name} backend's values live on a device the host waits for: "
                "the buffered step runs there (its guard decided on the device)")
    if getattr(trainer.base_optimizer, "inplace", None) is None:
        return ("the optimizer carries no in-place form of its update (a setting its "
                "kernels do not implement, or an optimizer of your own): the buffered step "
                "runs its update")
    if getattr(trainer, "penalty", None) is not None and \
            getattr(trainer.penalty, "inplace_", None) is None:
        return "the penalty has no in-place form: the buffered step runs it"
    if trainer._workers.reduce is not None and trainer._workers.reduce_flat_ is None:
        return "the data-parallel workers reduce no flat buffer: the buffered step runs"
    return None


class InplaceStep(BufferedStep):
    """The in-place step for one Trainer; ``step(state, x, T) -> (state, metrics)``.

    ``base_optimizer`` (whose ``inplace`` form runs; a caller may set another with the same
    state layout before a step) is the optimizer without the Trainer's ``clip_norm``, which
    this step applies itself."""

    def __init__(self, trainer: Any):
        super().__init__(trainer)
        ops = self.ops
        self.base_optimizer = trainer.base_optimizer
        self.clip_norm = getattr(trainer, "clip_norm", None)
        self.reduce_flat_ = trainer._workers.reduce_flat_  # data parallel (MPI), or None
        form = self.base_optimizer.inplace
        if len(self.s_flat) != form.n_moments:
            raise RuntimeError("in-place step: the optimizer state does not have the layout "
                               f"of its in-place form {type(form).__name__} (a bpcore bug)")
        finfo = np.finfo(trainer.model.dtype_name)
        self.grad_sq_limit = math.sqrt(float(finfo.max))      # ||g||^2 allowed: max ** 1/2
        self.update_limit = math.sqrt(float(finfo.max)) / 2   # |u_i| with no overflow of p + u
        self.host_dtype = ops.host_dtype(self.p_flat)
        # Scratch for updates that need a temporary (chunked, so it stays in cache): the L2
        # weight-decay fold, and momentum/Adam where the backend has no fused kernel. (The
        # first form decides; a later one, of scikit-learn's next epoch, has the same needs.)
        scratch = ops.update_scratch and (form.l2 or form.scratch or self.penalty is not None)
        width = min(CHUNK, self.n) if scratch else 0
        self.tmp = ops.empty((width,), trainer.model.dtype)
        self.tmp2 = ops.empty((width,), trainer.model.dtype)
        self.norms = Norms()
        self.safe = False
        self.fallbacks = 0  # steps that ran the buffered step (for tests and benchmarks)

    def _scratch(self) -> list[Any]:
        return [self.tmp, self.tmp2]

    # -- the state --------------------------------------------------------------------------
    def _adopt(self, state: TrainState) -> TrainState:
        """Copy a state produced elsewhere into the buffers; measure what the proofs assume
        (unless it was this step's own buffers, already measured)."""
        mine = self._out is not None and self._holds_buffers(state)
        out = super()._adopt(state)
        if not mine:
            self._measure()
        return out

    def _measure(self) -> None:
        ops = self.ops
        with ops.quiet():
            p_sq = ops.dot(self.p_flat, self.p_flat)
            m_sq = ops.dot(self.s_flat[0], self.s_flat[0]) if self.s_flat else 0.0
            moments_ok = self.base_optimizer.inplace.moments_ok(ops, self.s_flat,
                                                                self.grad_sq_limit)
        self.norms.p = math.sqrt(p_sq) if math.isfinite(p_sq) else math.inf
        self.norms.m = math.sqrt(m_sq) if math.isfinite(m_sq) else math.inf
        self.safe = (self.norms.p < self.update_limit and self.norms.m < self.update_limit
                     and moments_ok)

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
        # (labels were range-checked at the boundary; T: the loss's rule, read on the host)
        targets_ok = T is None or self.loss.targets_valid(T, ops)
        if self.reduce_flat_ is not None:  # data parallel: the global batch's gradient
            value, correct, targets_ok = self.reduce_flat_(
                ops.host_view(self.g_flat), value, correct, targets_ok)
            value, correct = ops.scalar(value, self.p_flat), ops.scalar(correct, self.p_flat)
        if self.penalty is not None:  # its in-place form, on the global batch's gradient
            value = self.penalty.inplace_(ops, value, self.g_flat, self.p_flat, self.nW, T,
                                          (self.tmp, self.tmp2))
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
        """Apply the optimizer's in-place form; False (nothing written) when the update
        cannot be proved finite without overflow (only when the guard is on)."""
        ops, g, p = self.ops, self.g_flat, self.p_flat
        form = self.base_optimizer.inplace
        guarded = self.check_finite
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
        if form.l2:  # classic L2: add wd·W to the weights' gradient
            ops.axpy_(g[:self.nW], form.l2, p[:self.nW], (self.tmp, self.tmp2))
            g_sq = None  # the folded gradient's norm is measured below
        if g_sq is None:
            g_sq = ops.dot(g, g) if guarded else 0.0
        if guarded and not g_sq <= self.grad_sq_limit:
            return False
        return form.apply_(ops, p, g, self.s_flat, step, self.nW, math.sqrt(g_sq), self.norms,
                           self.update_limit, guarded, (self.tmp, self.tmp2))
