"""The in-place training step: the same step as :func:`bpcore.training.step.train_step`, on
preallocated buffers, for backends with the ``inplace_ops`` capability (NumPy; PyTorch on
the CPU).

What it does differently from the generic step, and nothing else:

* The parameters, gradients and optimizer moments live in flat buffers (all ``W`` first, then
  all ``b``); ``state.params`` and the optimizer state's leaves are views into them. An update
  is a few vector operations over the whole buffer (in chunks that stay in cache where a
  temporary is needed), not a loop over leaves that allocates a new array for each.
* Activations, errors and masks live in buffers kept per batch size; each matrix product
  writes into its buffer (``out=``); relu runs in place and its derivative is one mask
  product. Activations without an in-place kernel run their generic ``forward``/``vjp``.
* The guard is decided **before** anything is written, from the loss, the targets and one
  reduction: the squared norm of the gradient (reused for ``clip_norm``). That, with bounds
  that follow from each optimizer's algebra, proves the update finite and small enough that
  no parameter can overflow, so a step the guard refuses has changed nothing. When the proof
  does not go through (a gradient norm beyond ``dtype_max ** 0.25``, an update bound beyond
  ``sqrt(dtype_max) / 2``: absurd settings or a diverging run), the step runs the generic
  path instead, which decides exactly as it always does.

So on every accepted and every refused step the state matches the generic step's to
round-off (``tests/test_inplace.py`` checks it), while the generic path stays the reference
(and runs on JAX, CUDA and array-api-strict). The Trainer uses this step when the backend
offers it and the optimizer is one of bpcore's own (``sgd``/``momentum``/``adam``/``adamw``
with a constant or built-in schedule); ``Trainer(..., inplace=False)`` turns it off.

One semantic difference follows from "in place": the arrays of ``trainer.state`` and
``model.params`` are updated by later steps (as PyTorch's are). Keep a snapshot with
``model.copy_params()`` or ``model.state_dict()``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .._array import nested_leaves, nested_unflatten
from .._layout import FlatLayout
from ..nn.activations import IDENTITY_KERNEL
from ..optim import built_by_name
from ..optim.schedules import schedule_from_spec
from ..nn.targets import labels_to_canonical
from .guard import GUARD_GREW, GUARD_NONFINITE, GUARD_TARGETS, GuardState
from .step import StepMetrics, TrainState

__all__ = ["InplaceStep", "unsupported_reason", "CHUNK"]

CHUNK = 1 << 16  # elements per chunk of an elementwise update with a temporary (fits L2)
# The settings of each named optimizer that the in-place update implements. An optimizer
# with any other setting (an option added to bpcore.optim later, say) runs the generic step:
# the in-place one must never ignore a setting it does not know.
_HANDLED = {"sgd": {"name", "lr", "momentum", "nesterov", "weight_decay"},
            "adam": {"name", "lr", "b1", "b2", "eps", "weight_decay"}}
_HANDLED["adamw"] = _HANDLED["adam"]


def unsupported_reason(trainer: Any) -> str | None:
    """Why ``trainer`` cannot use the in-place step (None: it can)."""
    be = trainer.model.backend
    if be.inplace_ops is None:
        return (f"the {be.name} backend has no in-place kernels (they need mutable arrays "
                "read without a device wait: numpy, torch on the CPU)")
    spec = trainer.base_optimizer_spec
    if not built_by_name(trainer.base_optimizer):
        spec = None  # (an Optimizer of your own, whatever its spec says: its own update)
    if spec is not None and spec.get("name") in _HANDLED and \
            set(spec) - _HANDLED[spec["name"]]:
        return (f"the in-place update does not implement the optimizer's setting(s) "
                f"{sorted(set(spec) - _HANDLED[spec['name']])}")
    if spec is None or spec.get("name") not in _HANDLED:
        return ("the optimizer is not one of bpcore's named optimizers (sgd, momentum, adam, "
                "adamw) with a constant or built-in schedule learning rate")
    return None


class InplaceStep:
    """The in-place step for one Trainer; ``step(state, x, T) -> (state, metrics)``."""

    def __init__(self, trainer: Any, generic_step: Callable[..., Any]):
        model = trainer.model
        self.ops = ops = model.backend.inplace_ops
        self.activations = model.activations
        self.loss = trainer.loss
        self.check_finite = trainer.check_finite
        self.divergence_factor = trainer.divergence_factor
        self.clip_norm = trainer.clip_norm
        self.generic_step = generic_step
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
        n_sets = 2 if self.kind in ("adam", "adamw") else (1 if self.beta else 0)

        self.layout = layout = FlatLayout(model.sizes)  # all W, then all b
        self.nW, self.n = layout.n_weights, layout.size
        dtype = model.dtype
        finfo = np.finfo(model.dtype_name)
        self.grad_sq_limit = math.sqrt(float(finfo.max))      # ||g||^2 allowed: max ** 1/2
        self.update_limit = math.sqrt(float(finfo.max)) / 2   # |u_i| with no overflow of p + u
        self.p_flat = ops.empty((self.n,), dtype)
        self.g_flat = ops.empty((self.n,), dtype)
        self.s_flat = [ops.empty((self.n,), dtype) for _ in range(n_sets)]
        self.params = layout.views(self.p_flat)
        self.grads = layout.views(self.g_flat)
        moments = [layout.views(f) for f in self.s_flat]
        self.opt_leaves = [leaf for m in moments for layer in m for leaf in layer]
        template = trainer.optimizer.init(model.params)
        if len(nested_leaves(template)) != len(self.opt_leaves):
            raise RuntimeError("in-place step: the optimizer state does not have the layout "
                               f"of {self.kind!r} (a bpcore bug)")
        self.opt_state = nested_unflatten(template, self.opt_leaves)
        # Scratch for updates that need a temporary (chunked, so it stays in cache): the L2
        # weight-decay fold, and momentum/Adam where the backend has no fused kernel.
        scratch = ops.update_scratch and ((self.wd and self.kind != "adamw") or self.beta or
                                          self.kind != "sgd")
        width = min(CHUNK, self.n) if scratch else 0
        self.tmp = ops.empty((width,), dtype)
        self.tmp2 = ops.empty((width,), dtype)
        self._batch_buffers: dict[Any, Any] = {}
        # Each layer's in-place kernel, from its registry entry (None: the generic form).
        self.kernels = [a.kernel for a in model.activations]
        # The loss's in-place kernel, from its registry entry (on the logits: identity output).
        self.loss_kernel = (self.loss.kernel if self.kernels[-1] is IDENTITY_KERNEL else None)
        self._fused_xent = self.loss_kernel is not None
        self._out: TrainState | None = None
        self.safe = False
        self.fallbacks = 0  # steps that ran the generic path (for tests and benchmarks)

    def buffer_bytes(self) -> int:
        """Bytes of every buffer this step keeps (state, gradients, scratch, per batch)."""
        arrays = [self.p_flat, self.g_flat, *self.s_flat, self.tmp, self.tmp2]
        arrays += [a for bufs in self._batch_buffers.values() for layer in bufs
                   for a in (layer if isinstance(layer, tuple) else (layer,)) if a is not None]
        return sum(int(a.nbytes) for a in arrays)

    # -- the state --------------------------------------------------------------------------
    def _adopt(self, state: TrainState) -> TrainState:
        """Copy a state produced elsewhere into the buffers; check what the proofs assume."""
        ops = self.ops
        for (W, b), (pW, pb) in zip(state.params, self.params):
            if W is not pW:
                ops.copy_(pW, W)
            if b is not pb:
                ops.copy_(pb, b)
        for leaf, view in zip(nested_leaves(state.opt_state), self.opt_leaves):
            if leaf is not view:
                ops.copy_(view, leaf)
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
        self._out = state._replace(params=self.params, opt_state=self.opt_state)
        return self._out

    def _generic(self, state: TrainState, x: Any, T: Any, labels: Any = None):
        self.fallbacks += 1
        if T is None:
            T = labels_to_canonical(labels, self.params[-1][0].shape[0], self.p_flat.dtype)
        new, metrics = self.generic_step(state, x, T)
        return self._adopt(new), metrics

    # -- buffers per batch size ---------------------------------------------------------------
    def _buffers(self, B: int, like: Any) -> list[tuple[Any, Any, Any]]:
        """Per layer ``(Z, mask, D_prev)`` for batch size ``B``: ``Z`` holds Z^k (and Y^k for
        relu and identity, which run in place); ``mask`` is relu's [Y^k > 0]; ``D_prev``
        receives D^{k-1} where layer k-1 needs its Z and Y for a generic ``vjp`` (after a relu
        or identity layer D^{k-1} overwrites that layer's Z buffer, no longer needed then)."""
        bufs = self._batch_buffers.get(B)
        if bufs is None:
            if len(self._batch_buffers) >= 4:  # a full batch and a last, smaller one
                self._batch_buffers.clear()
            ops = self.ops
            bufs = []
            kernels = self.kernels
            for k, (W, _) in enumerate(self.params):
                n_out, n_in = W.shape
                Z = ops.empty((B, n_out), like.dtype)
                mask = (ops.bool_empty((B, n_out)) if kernels[k] is not None and
                        kernels[k].masked else None)
                D_prev = (ops.empty((B, n_in), like.dtype)
                          if k > 0 and kernels[k - 1] is None else None)
                bufs.append((Z, mask, D_prev))
            self._batch_buffers[B] = bufs
        return bufs

    # -- the step -----------------------------------------------------------------------------
    def step(self, state: TrainState, x: Any, T: Any) -> tuple[TrainState, StepMetrics]:
        """The step on canonical targets ``T`` (``(batch, n_out)``, as the generic step)."""
        with self.ops.quiet():
            return self._step(state, x, T, None)

    def step_labels(self, state: TrainState, x: Any, labels: Any
                    ) -> tuple[TrainState, StepMetrics]:
        """The step on integer class labels already checked to lie in ``[0, n_out)``
        (:func:`bpcore.nn.targets.label_targets` on a backend whose values the host reads). The
        fused softmax cross-entropy uses them directly, with no one-hot rows."""
        if not self._fused_xent:
            T = labels_to_canonical(labels, self.params[-1][0].shape[0], self.p_flat.dtype)
            return self.step(state, x, T)
        with self.ops.quiet():
            return self._step(state, x, None, labels)

    def _step(self, state, x, T, labels):
        if state is not self._out:
            state = self._adopt(state)
        if not self.safe and self.check_finite:
            return self._generic(state, x, T, labels)
        ops = self.ops
        bufs = self._buffers(x.shape[0], self.p_flat)
        # forward: Z^k = Y^{k-1} W^{kT} + b^k, Y^k = f^k(Z^k)
        Ys, Y = [], x
        for (W, b), act, kernel, (Z, _, _) in zip(self.params, self.activations, self.kernels,
                                                  bufs):
            ops.linear(Y, W, b, Z)                  # Z = Y W^T + b
            if kernel is not None:                  # the entry's kernel: Y^k in Z's buffer
                if kernel.forward_ is not None:
                    kernel.forward_(ops, Z)
                Y = Z
            else:  # no in-place kernel: the generic forward (allocates)
                Y = act.forward(Z)
            Ys.append((Z, Y))
        if labels is not None:
            scratch = self._loss_buffers(Y)
            fused = getattr(ops, "softmax_xent_labels", None)  # a backend's own kernel
            value, D = (fused(Y, labels, scratch[0]) if fused is not None else
                        self.loss_kernel.labels(ops, Y, labels, scratch))
            metrics = StepMetrics(value, ops.count(ops.argmax_rows(Y) == labels, Y))
        elif self._fused_xent:
            value, D = self.loss_kernel(ops, Y, T, self._loss_buffers(Y))
            hit = ops.argmax_rows(Y) == ops.argmax_rows(T)
            metrics = StepMetrics(value, ops.count(hit, Y))
        else:
            value, D = self.loss.forward(Y, T)
            metrics = StepMetrics(value, self.loss.correct(Y, T))
        # backward: G^k = f'^k ⊙ D^k, ∇W^k = G^kT Y^{k-1}, ∇b^k = Σ G^k, D^{k-1} = G^k W^k
        for k in range(len(self.params) - 1, -1, -1):
            W, _ = self.params[k]
            gW, gb = self.grads[k]
            act, (Z, Yk), (_, mask, D_prev) = self.activations[k], Ys[k], bufs[k]
            kernel = self.kernels[k]
            if kernel is not None and kernel.masked:  # G = f'(Z) ⊙ D, in D's buffer
                if k == len(self.params) - 1:  # (inner layers took their mask below)
                    kernel.mask_(ops, Yk, mask)
                kernel.backward_(ops, D, mask)  # D is a buffer of ours, or the loss's new array
                G = D
            elif kernel is not None:  # f' = 1
                G = D
            else:
                G = act.vjp(Z, Yk, D)
            Y_prev = Ys[k - 1][1] if k > 0 else x
            ops.matmul(G.T, Y_prev, gW)
            ops.sum_rows(G, gb)
            if k > 0:
                if D_prev is None:  # layer k-1 ran in place: its Z/Y buffer takes D^{k-1}
                    if bufs[k - 1][1] is not None:  # its mask, while its Y is intact
                        self.kernels[k - 1].mask_(ops, Y_prev, bufs[k - 1][1])
                    D_prev = Ys[k - 1][0]
                ops.matmul(G, W, D_prev)
                D = D_prev

        targets_ok = None
        if self.reduce_flat_ is not None:  # data parallel: the global batch's gradient
            targets_ok = T is None or self._targets_ok(T)
            value, correct, targets_ok = self.reduce_flat_(
                self.ops.host_view(self.g_flat), value, metrics.correct, targets_ok)
            metrics = StepMetrics(self.ops.scalar(value, self.p_flat),
                                  self.ops.scalar(correct, self.p_flat))
        step = state.step
        if self.check_finite:
            # T None: labels, checked at the boundary
            ok, guard = self._guard(state, value, T, targets_ok)
            if not ok:  # refused before anything was written
                self._out = state._replace(guard=guard)
                return self._out, metrics
        else:
            guard = state.guard
        if not self._update(int(step)) and self.check_finite:
            return self._generic(state, x, T, labels)  # no proof the update is safe
        self._out = TrainState(self.params, self.opt_state, step + 1, guard, state.epoch)
        return self._out, metrics

    def _loss_buffers(self, Z: Any) -> tuple:
        key = ("loss", Z.shape[0])
        bufs = self._batch_buffers.get(key)
        if bufs is None:
            bufs = self._batch_buffers[key] = self.loss_kernel.buffers(self.ops, Z)
        return bufs

    def _targets_ok(self, T: Any) -> bool:
        lo, hi = float(T.min()), float(T.max())  # NaN compares False: invalid
        kind = self.loss.targets
        return (lo >= 0 and hi < math.inf if kind == "classes" else
                lo >= 0 and hi <= 1 if kind == "binary" else
                lo > -math.inf and hi < math.inf)

    def _guard(self, state: TrainState, value: Any, T: Any, targets_ok: bool | None = None
               ) -> tuple[bool, Any]:
        """:func:`bpcore.training.guard.guard_decision`'s rule, evaluated on the host: here the values
        cost nothing to read, and the device version's dozen 0-d array operations cost more
        than the small case's whole update. Same dtype arithmetic, same codes;
        ``tests/test_inplace.py`` holds the two to the same refusals. ``finite`` is the loss
        alone: the update is proved bounded separately. Returns ``(ok, guard)``."""
        ops, g = self.ops, state.guard
        f = ops.host_dtype(self.p_flat)
        v, ref = f(float(value)), f(float(g.ref_loss))
        new_ref = np.isnan(ref)
        if new_ref:
            ref = v
        if targets_ok is None:  # T None: labels, range-checked on the host at the boundary
            targets_ok = T is None or self._targets_ok(T)
        factor = self.divergence_factor
        grew = bool(factor) and bool(v > factor * ref) and bool(ref > 0)
        bad = int(g.bad_step)
        ok = targets_ok and bool(np.isfinite(v)) and not grew and not bad
        if ok and not new_ref:
            return True, g
        why = (GUARD_TARGETS if not targets_ok else GUARD_NONFINITE if not np.isfinite(v) else
               GUARD_GREW if grew else 0)
        guard = GuardState(
            bad_step=g.bad_step if ok or bad else ops.scalar(int(state.step) + 1, 0),
            reason=g.reason if bad else ops.scalar(0 if ok else why, 0),
            ref_loss=ops.scalar(float(ref), self.p_flat) if new_ref else g.ref_loss)
        return ok, guard

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
