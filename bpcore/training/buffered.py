"""The buffered step: :func:`bpcore.training.step.train_step` on preallocated flat buffers.

An executor of the one step for backends with in-place array operations
(``Backend.inplace_ops``: NumPy, PyTorch on the CPU or a CUDA device, CuPy). It runs the same
``train_step`` — the same optimizer transformations, the same guard, the same selection of
the new or the old state — and changes only where the arrays live:

* Parameters, gradients and optimizer moments live in flat buffers laid out by
  :class:`bpcore._layout.FlatLayout` (all ``W``, then all ``b``). ``state.params`` and the
  optimizer state's leaves are views into them.
* The forward and backward pass write into buffers kept per batch size, each matrix product
  with ``out=``. A layer whose activation entry carries an in-place kernel
  (:class:`bpcore.nn.activations.InplaceKernel`) runs it in its ``Z`` buffer; one without runs
  the entry's generic ``forward``/``vjp``. The loss likewise (``Loss.kernel``).
* The optimizer's update runs on the flat buffers seen as one layer, ``[(all W, all b)]``:
  a few operations over two long vectors instead of a dozen per layer. bpcore's named
  optimizers are elementwise (weight decay touches the ``W`` part only), so this is the same
  arithmetic; ``tests/test_registry_kernels.py`` holds the runs equal to 1e-12.
* The guard decides on the device (:func:`bpcore.training.guard.guard_decision`) and the step
  commits by selection: every buffer ← ``where(ok, new, old)``. There is no host read inside
  the step, so it runs on CUDA PyTorch and CuPy exactly as on the CPU (a step is a fixed
  sequence of kernels on fixed buffers), and a refused step changes nothing but the guard.

Where the host reads the step's values for free (NumPy; PyTorch on the CPU),
:class:`bpcore.training.inplace.InplaceStep` overrides the update with fused in-place
kernels and the guard's *finite* test with bounds proved on the host; it falls back to this
step wherever its proof does not go through.

One semantic difference follows from "in place": the arrays of ``trainer.state`` and
``model.params`` are updated by later steps (as PyTorch's are). Keep a snapshot with
``model.copy_params()`` or ``model.state_dict()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._array import nested_leaves, nested_unflatten
from .._layout import FlatLayout
from ..nn.activations import IDENTITY_KERNEL
from ..nn.targets import labels_to_canonical
from ..optim import built_by_name
from .step import StepMetrics, TrainState, train_step

__all__ = ["BufferedStep", "buffered_unsupported_reason"]


def buffered_unsupported_reason(trainer: Any) -> str | None:
    """Why ``trainer`` cannot use the buffered step (None: it can)."""
    be = trainer.model.backend
    if be.inplace_ops is None:
        return (f"the {be.name} backend has no in-place array operations (they need mutable "
                "arrays: numpy, torch, cupy)")
    if not built_by_name(trainer.base_optimizer):
        return ("the optimizer is not one of bpcore's named optimizers (sgd, momentum, adam, "
                "adamw, built by bpcore.optim): the buffered step runs an optimizer on the "
                "flat parameter vector, which only an elementwise one allows")
    return None


def _as_one_layer(template: Any, n_layers: int) -> Any:
    """``template`` (an optimizer state) with each parameter-shaped part ``[(W1, b1), ...,
    (WL, bL)]`` replaced by one layer ``[(W, b)]``: the structure of the same state over the
    flat buffers seen as one layer (the leaves are placeholders)."""
    if isinstance(template, list) and len(template) == n_layers and all(
            isinstance(layer, tuple) and len(layer) == 2 and
            not any(isinstance(a, (list, tuple)) for a in layer) for layer in template):
        return [(None, None)]
    if isinstance(template, (list, tuple)):
        parts = [_as_one_layer(t, n_layers) for t in template]
        if hasattr(template, "_fields"):
            return type(template)(*parts)
        return type(template)(parts)
    return template


class BufferedStep:
    """The buffered step for one Trainer; ``step(state, x, T) -> (state, metrics)``."""

    def __init__(self, trainer: Any):
        model = trainer.model
        self.ops = ops = model.backend.inplace_ops
        self.activations = model.activations
        self.loss = trainer.loss
        self.optimizer = trainer.optimizer  # (a caller may set another before a step)
        self.penalty = getattr(trainer, "penalty", None)  # train_step's penalty, or None
        self.check_finite = trainer.check_finite
        self.divergence_factor = trainer.divergence_factor
        self.workers = trainer._workers
        # data parallel: how the workers' gradients become the global batch's (None: one)
        self.reduce = getattr(trainer, "reduce", self.workers.reduce)

        self.layout = layout = FlatLayout(model.sizes)  # all W, then all b
        self.nW, self.n = layout.n_weights, layout.size
        dtype = model.dtype
        self.p_flat = ops.empty((self.n,), dtype)
        self.g_flat = ops.empty((self.n,), dtype)
        self.params = layout.views(self.p_flat)
        self.grads = layout.views(self.g_flat)
        # The optimizer state: sets of parameter-shaped moments, one flat buffer each.
        template = getattr(trainer, "opt_template", None)
        if template is None:
            template = self.optimizer.init(model.params)
        shapes = [tuple(a.shape) for a in nested_leaves(model.params)]
        leaves = nested_leaves(template)
        n_sets = len(leaves) // len(shapes)
        if [tuple(a.shape) for a in leaves] != shapes * n_sets:
            raise RuntimeError("buffered step: the optimizer state is not sets of parameter-"
                               "shaped moments (a bpcore bug: only named optimizers get here)")
        self.s_flat = [ops.empty((self.n,), dtype) for _ in range(n_sets)]
        self.opt_leaves = [leaf for s in self.s_flat for layer in layout.views(s)
                           for leaf in layer]
        self.opt_state = nested_unflatten(template, self.opt_leaves)
        # The same buffers as one layer, [(all W, all b)]: what the update runs on.
        halves = lambda f: [(f[:self.nW], f[self.nW:])]  # noqa: E731
        self.flat_params, self.flat_grads = halves(self.p_flat), halves(self.g_flat)
        self.flat_opt = nested_unflatten(_as_one_layer(template, len(model.params)),
                                         [h for s in self.s_flat for h in halves(s)[0]])
        self._flat_leaves = nested_leaves((self.flat_params, self.flat_opt))
        self._labels_ok = model.backend.asarray(np.bool_(True))
        self._batch_buffers: dict[Any, Any] = {}
        # Each layer's in-place kernel, from its registry entry (None: the generic form).
        self.kernels = [a.kernel for a in model.activations]
        # The loss's in-place kernel, from its registry entry (on the logits: identity output).
        self.loss_kernel = (self.loss.kernel if self.kernels[-1] is IDENTITY_KERNEL else None)
        # how it counts correct predictions (a kernel without its own count: the entry's)
        self._kernel_correct = getattr(self.loss_kernel, "correct", None)
        self._out: TrainState | None = None

    def buffer_bytes(self) -> int:
        """Bytes of every buffer this step keeps (state, gradients, scratch, per batch)."""
        arrays = [self.p_flat, self.g_flat, *self.s_flat, *self._scratch()]
        arrays += [a for bufs in self._batch_buffers.values() for layer in bufs
                   for a in (layer if isinstance(layer, tuple) else (layer,)) if a is not None]
        return sum(int(a.nbytes) for a in arrays)

    def _scratch(self) -> list[Any]:
        return []

    # -- the state --------------------------------------------------------------------------
    def _adopt(self, state: TrainState) -> TrainState:
        """Copy a state produced elsewhere into the buffers (nothing to copy when it holds
        this step's own buffers: a caller that rebuilds the TrainState around them)."""
        if self._holds_buffers(state):
            self._out = state
            return state
        dst = nested_leaves(self.params) + self.opt_leaves
        src = nested_leaves(state.params) + nested_leaves(state.opt_state)
        for d, s in zip(dst, src):
            if d is not s:
                self.ops.copy_(d, s)
        self._out = state._replace(params=self.params, opt_state=self.opt_state)
        return self._out

    def _holds_buffers(self, state: TrainState) -> bool:
        return state.params is self.params and state.opt_state is self.opt_state

    # -- buffers per batch size ---------------------------------------------------------------
    def _buffers(self, B: int, like: Any) -> list[tuple[Any, Any]]:
        """Per layer ``(Z, D_prev)`` for batch size ``B``: ``Z`` holds Z^k (and Y^k where the
        layer's kernel runs in place, kept intact for its backward); ``D_prev`` receives
        D^{k-1} (None for the first layer, which has no δ^0)."""
        bufs = self._batch_buffers.get(B)
        if bufs is None:
            if len(self._batch_buffers) >= 4:  # a full batch and a last, smaller one
                self._batch_buffers.clear()
            ops = self.ops
            bufs = [(ops.empty((B, W.shape[0]), like.dtype),
                     ops.empty((B, W.shape[1]), like.dtype) if k > 0 else None)
                    for k, (W, _) in enumerate(self.params)]
            self._batch_buffers[B] = bufs
        return bufs

    def _loss_buffers(self, Z: Any) -> tuple:
        key = ("loss", Z.shape[0])
        bufs = self._batch_buffers.get(key)
        if bufs is None:
            bufs = self._batch_buffers[key] = self.loss_kernel.buffers(self.ops, Z)
        return bufs

    # -- the gradient ---------------------------------------------------------------------------
    def _gradient(self, x: Any, T: Any, labels: Any) -> tuple[Any, Any]:
        """Forward and backward on buffers: writes ∇ into ``g_flat``; returns the batch's
        ``(loss, correct)``. Targets: canonical ``T``, or (``T`` None) class ``labels``."""
        ops = self.ops
        bufs = self._buffers(x.shape[0], self.p_flat)
        # forward: Z^k = Y^{k-1} W^{kT} + b^k, Y^k = f^k(Z^k)
        Ys, Y = [], x
        for (W, b), act, kernel, (Z, _) in zip(self.params, self.activations, self.kernels,
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
            value, D, correct = self.loss_kernel.labels(ops, Y, labels, self._loss_buffers(Y))
            if correct is None:  # (a kernel that does not count in its pass)
                correct = ops.count_argmax_hits(Y, labels)
        elif self.loss_kernel is not None:
            value, D, correct = self.loss_kernel(ops, Y, T, self._loss_buffers(Y))
            if correct is None:  # (a kernel that does not count in its pass)
                correct = (self._kernel_correct(ops, Y, T) if self._kernel_correct is not None
                           else self.loss.correct(Y, T))
        else:
            value, D = self.loss.forward(Y, T)
            correct = self.loss.correct(Y, T)
        # backward: G^k = f'^k ⊙ D^k, ∇W^k = G^kT Y^{k-1}, ∇b^k = Σ G^k, D^{k-1} = G^k W^k
        for k in range(len(self.params) - 1, -1, -1):
            W, _ = self.params[k]
            gW, gb = self.grads[k]
            kernel = self.kernels[k]
            if kernel is None:  # the entry's generic vjp (allocates)
                G = self.activations[k].vjp(*Ys[k], D)
            else:  # in D's buffer (ours, or the loss's): G = f'(Y) ⊙ D, or D where f' = 1
                if kernel.backward_ is not None:
                    kernel.backward_(ops, D, Ys[k][1])
                G = D
            Y_prev = Ys[k - 1][1] if k > 0 else x
            ops.matmul(G.T, Y_prev, gW)
            ops.sum_rows(G, gb)
            if k > 0:
                D = bufs[k][1]
                ops.matmul(G, W, D)
        return value, correct

    # -- the step -----------------------------------------------------------------------------
    def step(self, state: TrainState, x: Any, T: Any) -> tuple[TrainState, StepMetrics]:
        """The step on canonical targets ``T`` (``(batch, n_out)``, as the generic step)."""
        with self.ops.quiet():
            return self._step(state, x, T, None)

    @property
    def takes_labels(self) -> bool:
        """Whether :meth:`step_labels` uses class labels as they are (the loss's kernel has a
        form on labels, and the host has read them: range-checked at the boundary), rather
        than turning them into one-hot rows first."""
        return getattr(self.loss_kernel, "labels", None) is not None and self.ops.host_reads

    def step_labels(self, state: TrainState, x: Any, labels: Any
                    ) -> tuple[TrainState, StepMetrics]:
        """The step on integer class labels. Where the host reads values, they were checked
        to lie in ``[0, n_out)`` (:func:`bpcore.nn.targets.label_targets`) and the fused
        softmax cross-entropy uses them directly, with no one-hot rows. On a device they may
        not have been read: one-hot rows, where an invalid label is a row of NaN the guard
        refuses (an index out of range would stop the GPU instead)."""
        if not self.takes_labels:
            T = labels_to_canonical(labels, self.params[-1][0].shape[0], self.p_flat.dtype)
            return self.step(state, x, T)
        with self.ops.quiet():
            return self._step(state, x, None, labels)

    def _step(self, state: TrainState, x: Any, T: Any, labels: Any
              ) -> tuple[TrainState, StepMetrics]:
        if state is not self._out:
            state = self._adopt(state)
        value, correct = self._gradient(x, T, labels)
        # (labels were range-checked at the boundary)
        targets_ok = self._labels_ok if T is None else self.loss.targets_valid(T)
        if self.reduce is not None:  # data parallel: the global batch's gradient
            value, correct, targets_ok, grads = self.reduce(
                value, correct, targets_ok, self.grads)
            for d, s in zip(nested_leaves(self.grads), nested_leaves(grads)):
                self.ops.copy_(d, s)
        return self._apply(state, value, correct, targets_ok, T)

    def _apply(self, state: TrainState, value: Any, correct: Any, targets_ok: Any, T: Any
               ) -> tuple[TrainState, StepMetrics]:
        """The rest of :func:`train_step` on the gradient in ``g_flat``: the optimizer, the
        guard, and the commit by selection."""
        new, metrics = train_step(
            state._replace(params=self.flat_params, opt_state=self.flat_opt), (None, T),
            activations=self.activations, loss=self.loss, optimizer=self.optimizer,
            check_finite=self.check_finite, divergence_factor=self.divergence_factor,
            gradient=lambda *_: (value, self.flat_grads, correct, targets_ok),
            penalty=self.penalty, select=self._commit)
        if not self.check_finite:  # applied as computed: new arrays, into the buffers
            for d, s in zip(self._flat_leaves, nested_leaves((new.params, new.opt_state))):
                self.ops.copy_(d, s)
        self._out = TrainState(self.params, self.opt_state, new.step, new.guard, state.epoch)
        return self._out, metrics

    def _commit(self, ok: Any, applied: Any, kept: Any) -> tuple[Any, Any, Any]:
        """``select`` for :func:`train_step`: every buffer ← where(ok, new, old), on the
        device; the step count likewise."""
        params, opt_state, step = applied()
        for d, s in zip(self._flat_leaves, nested_leaves((params, opt_state))):
            self.ops.select_(ok, s, d)
        return self.flat_params, self.flat_opt, self.ops.where(ok, step, kept()[2])
