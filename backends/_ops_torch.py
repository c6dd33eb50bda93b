"""PyTorch's in-place operations: :class:`~backends._ops.NumpyOps`'s interface, with what
PyTorch spells differently (and its fused optimizer kernels) overridden."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy

from ._ops import NumpyOps


class TorchOps(NumpyOps):
    """The same kernels on PyTorch tensors (no autograd), on ``device`` (CPU or CUDA)."""

    name = "torch"
    update_scratch = False  # its fused kernels and add_(alpha=) need none

    def __init__(self, torch: Any, device: Any = None):
        self.np = None
        self.torch = torch
        self.device = torch.device("cpu") if device is None else device
        self.host_reads = self.device.type == "cpu"

    def quiet(self):
        return contextlib.nullcontext()  # PyTorch does not warn on overflow

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, device=self.device)

    def copy_(self, dst, src):
        dst.copy_(src)

    def select_(self, ok, src, dst):
        self.torch.where(ok, src, dst, out=dst)

    def where(self, ok, a, b):
        return self.torch.where(ok, a, b)

    def mul(self, a, b, out):
        self.torch.mul(a, b, out=out)

    def add(self, a, b, out):
        self.torch.add(a, b, out=out)

    def div(self, a, b, out):
        self.torch.div(a, b, out=out)

    def sqrt(self, a, out):
        self.torch.sqrt(a, out=out)

    def relu_(self, Z):
        self.torch.relu_(Z)  # NaN stays NaN

    def relu_backward_(self, D, Y):
        # relu's own backward (autograd's): D where Y > 0, else 0, in one pass (a select:
        # 10 µs against 34 for a mask and a product on a 100-square block, measured). Where
        # Y is NaN it keeps D (the generic where() gives 0): relu' is undefined there, and
        # a NaN output makes its row's loss NaN, so the guard refuses the step either way.
        self.torch.ops.aten.threshold_backward.grad_input(D, Y, 0, grad_input=D)

    def rsub(self, a, b, out):
        self.torch.sub(b, a, out=out)  # -(b - a): the same rounding as a - b
        out.neg_()

    def clip(self, a, lo, hi, out):
        self.torch.clamp(a, lo, hi, out=out)

    def sigmoid(self, Z, out, work):
        torch = self.torch
        torch.abs(Z, out=work)
        work.neg_()
        work.exp_()                            # e
        torch.add(work, 1.0, out=out)          # 1 + e
        torch.div(work, out, out=work)         # e / (1 + e)
        torch.reciprocal(out, out=out)         # 1 / (1 + e)
        torch.where(Z < 0, work, out, out=out)

    def matmul(self, a, b, out):
        self.torch.matmul(a, b, out=out)

    def linear(self, Y, W, b, out):
        self.torch.addmm(b, Y, W.t(), out=out)  # one call: the bias rides on the product

    def add_scaled_(self, p, g, a):
        p.add_(g, alpha=a)

    def axpy_(self, y, a, x, tmp):
        y.add_(x, alpha=a)

    # PyTorch's fused optimizer kernels (what torch.optim runs with fused=True): one call
    # for the whole flat buffer instead of a dozen per chunk. Same arithmetic to round-off.
    def momentum_update_(self, p, g, v, lr, beta, nesterov, tmp):
        self.torch._fused_sgd_([p], [g], [v], weight_decay=0.0, momentum=beta, lr=lr,
                               dampening=0.0, nesterov=nesterov, maximize=False,
                               is_first_step=False)

    def velocity_update_(self, p, g, v, lr, mu, nesterov, tmp):
        v.mul_(mu).add_(g, alpha=-lr)
        if nesterov:
            p.add_(v, alpha=mu).add_(g, alpha=-lr)
        else:
            p.add_(v)

    def adam_update_(self, p, g, m, v, alpha, eps, b1, b2, decay, n_weights, tmp):
        # PyTorch's kernel corrects the bias itself, for a step count it is given: at step 1
        # (c1 = 1 - b1, c2 = 1 - b2) it computes lr/c1 · m / (sqrt(v)/sqrt(c2) + eps_f),
        # which is alpha m / (sqrt(v) + eps) for lr = alpha c1 / sqrt(c2), eps_f = eps /
        # sqrt(c2); its AdamW decay multiplies θ by 1 - lr·wd, so wd = decay / lr.
        torch = self.torch
        s2 = (1.0 - b2) ** 0.5
        lr = alpha * (1.0 - b1) / s2
        kw = dict(lr=lr, beta1=b1, beta2=b2, eps=eps / s2, amsgrad=False, maximize=False)
        parts = [(slice(0, n_weights), decay / lr if lr else 0.0),
                 (slice(n_weights, p.shape[0]), 0.0)]
        if not decay:  # one call for weights and biases alike
            parts = [(slice(0, p.shape[0]), 0.0)]
        for sl, wd in parts:
            fused = torch._fused_adamw_ if wd else torch._fused_adam_
            step = torch.ones((), dtype=p.dtype, device=p.device)
            fused([p[sl]], [g[sl]], [m[sl]], [v[sl]], [], [step], weight_decay=wd, **kw)

    def _host_kernel(self, name, *args):
        """The NumPy backend's one-pass kernel ``name`` (Numba's) run on NumPy views of the
        tensors among ``args``, where tensors are host memory and Numba runs; its output
        buffer is written through its view. None: it does not run here (a CUDA device, a
        tensor not contiguous, no Numba, or the kernel declined)."""
        tensors = [a for a in args if isinstance(a, self.torch.Tensor)]
        if not self.host_reads or not all(a.is_contiguous() for a in tensors):
            return None
        host = getattr(self, "_host_ops", None)
        if host is None:
            from ._numba import numba_ops

            host = self._host_ops = numba_ops(numpy)
        fused = getattr(host, name, None)
        if fused is None:
            return None
        return fused(*(a.numpy() if isinstance(a, self.torch.Tensor) else a for a in args))

    def _xent(self, name, Z, targets, D):
        """The softmax cross-entropy hooks' start: where :meth:`_host_kernel` runs Numba's
        pass ``name``, its ``(value, D, correct)`` as PyTorch's; else None, with ``D ←
        log-softmax(Z)`` in PyTorch's kernel (``Z - lse`` per row) for the hook to go on."""
        out = self._host_kernel(name, Z, targets, D)
        if out is not None:
            value, _, correct = out
            scalar = self.torch.scalar_tensor
            return scalar(float(value), dtype=Z.dtype), D, scalar(float(correct), dtype=Z.dtype)
        self.torch._log_softmax(Z, 1, False, out=D)
        return None

    def softmax_log_loss(self, Z, Y, sw, eps, D):
        """scikit-learn's multinomial log loss (the hook of its registry entry's kernel):
        on the CPU, Numba's one pass on the tensors' memory; else None (the kernel's own
        operations)."""
        value = self._host_kernel("softmax_log_loss", Z, Y, sw, eps, D)
        return None if value is None else self.torch.scalar_tensor(float(value), dtype=Z.dtype)

    def sigmoid_log_loss(self, Z, Y, sw, eps, D):
        """scikit-learn's binary log loss likewise."""
        value = self._host_kernel("sigmoid_log_loss", Z, Y, sw, eps, D)
        return None if value is None else self.torch.scalar_tensor(float(value), dtype=Z.dtype)

    def softmax_xent_labels(self, Z, labels, D):
        """Softmax cross-entropy on integer labels: on the CPU, Numba's one pass on the
        tensors' memory (:meth:`_xent`: 18 µs against 73 here on a 100 x 10 batch); else
        PyTorch's own kernels (five calls where the generic composition takes a dozen):
        ``(value, D, None)`` with D written in place."""
        out = self._xent("softmax_xent_labels", Z, labels, D)  # (else D = log-softmax)
        if out is not None:
            return out
        B = Z.shape[0]
        value = self.torch.nn.functional.nll_loss(D, labels)  # Σ_b (lse_b - Z_{b,y_b}) / B
        D.exp_()                                # softmax
        neg = getattr(self, "_neg_one", None)
        if neg is None or neg.dtype != D.dtype:
            neg = self._neg_one = self.torch.full((1, 1), -1.0, dtype=D.dtype,
                                                  device=D.device)
        D.scatter_add_(1, labels.view(-1, 1), neg.expand(B, 1))  # D[b, y_b] -= 1
        D.div_(B)
        return value, D, None

    def softmax_xent(self, Z, T, D):
        """Softmax cross-entropy on canonical targets: on the CPU, Numba's one pass
        (:meth:`_xent`: 18 µs against 47); else PyTorch's own kernels (eight calls where the
        entry's kernel takes sixteen): ``(value, D, None)`` with D written in place."""
        if T.dtype != Z.dtype:
            return None  # (the entry's kernel: its operations promote as they do)
        out = self._xent("softmax_xent", Z, T, D)  # (else D = log-softmax)
        if out is not None:
            return out
        B = Z.shape[0]
        value = self.torch.dot(T.reshape(-1), D.reshape(-1)).neg_().div_(B)  # Σ T (lse - Z) / B
        D.exp_()                                # softmax
        D.mul_(T.sum(1, keepdim=True))          # ... Σ_c T, then - T, / B
        D.sub_(T)
        D.div_(B)
        return value, D, None

    def sum_rows(self, G, out):
        self.torch.sum(G, dim=0, out=out)

    def min_max(self, a):
        lo, hi = self.torch.aminmax(a)
        return float(lo), float(hi)

    def dot(self, a, b):
        return float(self.torch.dot(a, b))

    def row_max(self, Z, out):
        self.torch.amax(Z, dim=1, keepdim=True, out=out)

    def row_sum(self, Z, out):
        self.torch.sum(Z, dim=1, keepdim=True, out=out)

    def total(self, a):
        return self.torch.sum(a)

    def sub(self, a, b, out):
        self.torch.sub(a, b, out=out)

    def exp(self, a, out):
        self.torch.exp(a, out=out)

    def log(self, a, out):
        self.torch.log(a, out=out)

    def argmax_rows(self, a):
        return self.torch.argmax(a, dim=1)

    def _rows(self, n):
        r = getattr(self, "_row_index", None)
        if r is None or r.shape[0] < n:
            r = self._row_index = self.torch.arange(max(n, 1024), device=self.device)
        return r[:n]

    def count(self, hit, like):
        return self.torch.sum(hit).to(like.dtype)

    def count_argmax_hits(self, Z, labels):
        if not self.host_reads:
            return super().count_argmax_hits(Z, labels)
        # On the CPU the tensors are host memory: NumPy's argmax and count on views of
        # them, 12 µs against 36 for PyTorch's three calls on a 100 x 10 batch (measured).
        # (The same first-maximum rule: NaN counts as the maximum in both.)
        hits = numpy.count_nonzero(Z.numpy().argmax(axis=1) == labels.numpy())
        return self.torch.scalar_tensor(hits, dtype=Z.dtype)

    def host_view(self, a):
        return a.numpy()  # a CPU tensor: the same memory (host_reads only)

    def scalar(self, value, like):
        dtype = self.torch.int32 if isinstance(value, int) else like.dtype
        # (scalar_tensor: 4 µs against 8 for torch.tensor, measured)
        return self.torch.scalar_tensor(value, dtype=dtype, device=self.device)

    def host_dtype(self, like):
        import numpy

        return {self.torch.float32: numpy.float32, self.torch.float64: numpy.float64}[like.dtype]
