"""In-place array operations: the capability behind bpcore's buffered training steps.

A backend whose arrays are mutable (NumPy; PyTorch on the CPU or a CUDA device; CuPy) offers
an ``ops`` object (``Backend.inplace_ops``). Each method writes into a buffer the caller owns,
so a training step runs on preallocated memory (:mod:`bpcore.training.buffered`). ``host_reads``
says whether the host reads the arrays' values without waiting for a device: where it does,
the in-place step (:mod:`bpcore.training.inplace`) decides its guard on the host and updates
with fused kernels (``dot``, ``momentum_update_``, ``adam_update_``, ``host_view`` serve it
only); on a device, the buffered step runs with no host read. The generic, allocating
array-API path stays the reference, and the tests check the paths against each other.

:class:`NumpyOps` is written against NumPy's ufunc interface (``out=``) and takes the module
as a parameter; :class:`CupyOps` is the same on CuPy; :class:`~backends._ops_torch.TorchOps`
(``_ops_torch.py``) overrides what PyTorch spells differently, and :class:`~backends._numba.
NumbaOps` (``_numba.py``) NumPy's optimizer updates with single compiled passes. Every method keeps NaN where NumPy and the generic path keep it.
"""

from __future__ import annotations

import contextlib
from typing import Any


class NumpyOps:
    """NumPy-style in-place kernels on ``module`` (``numpy``)."""

    name = "numpy"
    update_scratch = True  # axpy_/momentum_update_/adam_update_ need the two scratch buffers
    host_reads = True      # values read with no device wait (the in-place step may run)

    def __init__(self, module: Any):
        self.np = module

    def quiet(self) -> Any:
        """A context without overflow/invalid-value warnings (the step's guard reports them)."""
        return self.np.errstate(over="ignore", invalid="ignore", divide="ignore",
                                under="ignore")

    # -- buffers ----------------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.np.empty(shape, dtype=dtype)

    def copy_(self, dst: Any, src: Any) -> None:
        self.np.copyto(dst, src)

    def select_(self, ok: Any, src: Any, dst: Any) -> None:
        """``dst ← src`` where the 0-d boolean ``ok`` holds, else unchanged (on the device:
        the buffered step's commit)."""
        self.np.copyto(dst, src, where=ok)

    def where(self, ok: Any, a: Any, b: Any) -> Any:
        return self.np.where(ok, a, b)

    # -- elementwise, written into ``out`` ----------------------------------------------------
    def mul(self, a: Any, b: Any, out: Any) -> None:
        self.np.multiply(a, b, out=out)

    def add(self, a: Any, b: Any, out: Any) -> None:
        self.np.add(a, b, out=out)

    def div(self, a: Any, b: Any, out: Any) -> None:
        self.np.divide(a, b, out=out)

    def sqrt(self, a: Any, out: Any) -> None:
        self.np.sqrt(a, out=out)

    def relu_(self, Z: Any) -> None:
        """``Z ← max(Z, 0)``; NaN stays NaN (as the generic ``where(Z < 0, 0, Z)``). Against
        an array of zeros, not the scalar 0: NumPy's vectorised loop takes two arrays (on
        a 100-square float32 block 3.4 µs against 15 µs, measured). (``less`` +
        ``copyto(where=)`` is 2.5x slower on real pre-activations: measured.)"""
        self.np.maximum(Z, self._zeros(Z.shape, Z.dtype), out=Z)

    def relu_backward_(self, D: Any, Y: Any) -> None:
        """``D ← D ⊙ [Y > 0]`` (relu's ``G`` from its output; NaN in ``Y`` gives 0): the
        product with the mask, equal to the generic ``where(Z > 0, D, 0)`` for every finite
        ``D`` (an infinite one gives NaN here, 0 there: either way the step's gradient is not
        finite, and the guard refuses it). The product, not a select: 8x faster (measured).
        (The mask is a new array: a scratch one shared by the backend's steps would race
        between threads.)"""
        self.np.multiply(D, self.np.greater(Y, 0), out=D)

    def _zeros(self, shape: tuple, dtype: Any) -> Any:
        """A read-only array of zeros, kept per shape and dtype."""
        cache = self.__dict__.setdefault("_zeros_cache", {})
        key = (tuple(shape), dtype)
        a = cache.get(key)
        if a is None:
            if len(cache) > 32:  # (batch sizes come and go: keep it bounded)
                cache.clear()
            a = self.np.zeros(shape, dtype=dtype)
            if hasattr(a.flags, "writeable"):  # (NumPy: a write would raise, not corrupt)
                a.flags.writeable = False
            cache[key] = a
        return a

    def rsub(self, a: float, b: Any, out: Any) -> None:
        """``out ← a - b`` for a scalar ``a``."""
        self.np.subtract(a, b, out=out)

    def clip(self, a: Any, lo: float, hi: float, out: Any) -> None:
        """``out ← min(max(a, lo), hi)``; NaN stays NaN (as ``where(a < lo, lo, where(a >
        hi, hi, a))``)."""
        self.np.clip(a, lo, hi, out=out)

    def sigmoid(self, Z: Any, out: Any, work: Any) -> None:
        """``out ← sigmoid(Z)`` as :func:`bpcore.nn.activations.sigmoid` computes it: ``e =
        exp(-|Z|)``, then ``1/(1 + e)`` where ``Z >= 0``, else ``e/(1 + e)`` (``work``:
        scratch shaped like ``Z``)."""
        np = self.np
        np.abs(Z, out=work)
        np.negative(work, out=work)
        np.exp(work, out=work)                 # e
        np.add(work, 1.0, out=out)             # 1 + e
        np.divide(work, out, out=work)         # e / (1 + e)
        np.divide(1.0, out, out=out)           # 1 / (1 + e)
        np.copyto(out, work, where=Z < 0)      # (NaN: Z < 0 is false, and both are NaN)

    def add_scaled_(self, p: Any, g: Any, a: float) -> None:
        """``p ← p + a·g``; ``g`` may be overwritten (it is scratch)."""
        self.np.multiply(g, a, out=g)
        self.np.add(p, g, out=p)

    # -- optimizer updates, in place on flat buffers -------------------------------------------
    # ``tmp`` is a pair of 1-d scratch buffers; the updates run in chunks of their length, so
    # each temporary stays in cache. The same arithmetic as bpcore.optim's transformations.
    @staticmethod
    def _chunks(lo: int, hi: int, tmp: tuple[Any, Any]):
        width = tmp[0].shape[0]
        for a in range(lo, hi, width):
            b = min(a + width, hi)
            yield a, b, tmp[0][:b - a], tmp[1][:b - a]

    def axpy_(self, y: Any, a: float, x: Any, tmp: tuple[Any, Any]) -> None:
        """``y ← y + a·x`` (``x`` unchanged), e.g. the L2 fold ``g_W += wd·W``."""
        for lo, hi, t, _ in self._chunks(0, y.shape[0], tmp):
            self.mul(x[lo:hi], a, t)
            self.add(y[lo:hi], t, y[lo:hi])

    def momentum_update_(self, p: Any, g: Any, v: Any, lr: float, beta: float,
                         nesterov: bool, tmp: tuple[Any, Any]) -> None:
        """``v ← β v + g``; ``θ ← θ - lr (g + β v if nesterov else v)``."""
        for a, b, t, _ in self._chunks(0, p.shape[0], tmp):
            va, ga = v[a:b], g[a:b]
            self.mul(va, beta, va)
            self.add(va, ga, va)
            if nesterov:
                self.mul(va, beta, t)
                self.add(ga, t, t)
                self.mul(t, -lr, t)
            else:
                self.mul(va, -lr, t)
            self.add(p[a:b], t, p[a:b])

    def velocity_update_(self, p: Any, g: Any, v: Any, lr: float, mu: float,
                         nesterov: bool, tmp: tuple[Any, Any]) -> None:
        """The velocity form (scikit-learn's): ``v ← μ v - lr g``; ``θ ← θ + (μ v - lr g if
        nesterov else v)``, with the new ``v``."""
        for a, b, t1, t2 in self._chunks(0, p.shape[0], tmp):
            va, ga = v[a:b], g[a:b]
            self.mul(ga, lr, t2)
            self.mul(va, mu, va)
            self.sub(va, t2, va)
            if nesterov:
                self.mul(va, mu, t1)
                self.sub(t1, t2, t1)
                self.add(p[a:b], t1, p[a:b])
            else:
                self.add(p[a:b], va, p[a:b])

    def adam_update_(self, p: Any, g: Any, m: Any, v: Any, alpha: float, eps: float,
                     b1: float, b2: float, decay: float, n_weights: int,
                     tmp: tuple[Any, Any]) -> None:
        """``m ← b1 m + (1 - b1) g``, ``v ← b2 v + (1 - b2) g²``, ``θ ← θ - alpha m /
        (sqrt(v) + eps)``, and ``θ_W -= decay·θ_W`` on the first ``n_weights`` entries (the
        weights, not the biases: AdamW's decoupled decay, ``lr·wd``). Bias corrections are
        the caller's, folded into ``alpha`` and ``eps`` (:class:`bpcore.optim.inplace.
        AdamUpdate`), or already in ``alpha`` (scikit-learn's Adam)."""
        for lo, hi, decayed in ((0, n_weights, True), (n_weights, p.shape[0], False)):
            for a, b, t1, t2 in self._chunks(lo, hi, tmp):
                ma, va, ga, pa = m[a:b], v[a:b], g[a:b], p[a:b]
                self.mul(ma, b1, ma)                          # m ← b1 m + (1 - b1) g
                self.mul(ga, 1.0 - b1, t1)
                self.add(ma, t1, ma)
                self.mul(ga, ga, t1)                          # v ← b2 v + (1 - b2) g²
                self.mul(t1, 1.0 - b2, t1)
                self.mul(va, b2, va)
                self.add(va, t1, va)
                self.sqrt(va, t1)                             # u = -alpha m / (sqrt(v) + eps)
                self.add(t1, eps, t1)
                self.div(ma, t1, t2)
                self.mul(t2, -alpha, t2)
                if decay and decayed:                         # AdamW: u - lr wd W
                    self.mul(pa, -decay, t1)
                    self.add(t2, t1, t2)
                self.add(pa, t2, pa)

    def l2_fold_(self, g: Any, p: Any, n_weights: int, alpha: float, S: Any,
                 tmp: tuple[Any, Any]) -> float:
        """scikit-learn's L2 penalty on the flat gradient: ``g_W ← g_W + α·W`` (none where
        ``α`` is 0), then ``g ← g / S``; returns ``Σ W²``, ``W = p[:n_weights]``."""
        W = p[:n_weights]
        sq = self.dot(W, W)
        self.fold_div_(g, W, alpha, S, tmp)
        return sq

    def fold_div_(self, g: Any, W: Any, alpha: float, S: Any, tmp: tuple[Any, Any]) -> None:
        """``g_W ← g_W + α·W`` (none where ``α`` is 0; ``g_W = g[:len(W)]``), then
        ``g ← g / S`` (:meth:`l2_fold_`'s update)."""
        if alpha:
            self.axpy_(g[:W.shape[0]], alpha, W, tmp)
        self.div(g, S, g)

    # -- products and reductions --------------------------------------------------------------
    def matmul(self, a: Any, b: Any, out: Any) -> None:
        self.np.matmul(a, b, out=out)

    def linear(self, Y: Any, W: Any, b: Any, out: Any) -> None:
        """``out ← Y Wᵀ + b`` (a layer's pre-activation)."""
        self.np.matmul(Y, W.T, out=out)
        self.np.add(out, b, out=out)

    def sum_rows(self, G: Any, out: Any) -> None:
        """``out ← Σ_rows G`` (the bias gradient), as the product ``1ᵀ G``: BLAS's GEMV,
        2.7x faster than ``add.reduce(axis=0)`` on a 100-square float32 block (measured);
        the same sum to round-off, NaN and inf propagated alike."""
        self.np.matmul(self._ones(G.shape[0], G.dtype), G, out=out)

    def _ones(self, n: int, dtype: Any) -> Any:
        ones = getattr(self, "_ones_cache", None)
        if ones is None or ones.shape[0] < n or ones.dtype != dtype:
            ones = self._ones_cache = self.np.ones(max(n, 1024), dtype=dtype)
        return ones[:n]

    def min_max(self, a: Any) -> tuple[float, float]:
        """``(min a, max a)`` as Python floats (``host_reads`` only; ``a`` not empty)."""
        return float(a.min()), float(a.max())

    def row_max(self, Z: Any, out: Any) -> None:
        """``out (B, 1) ← max of each row of Z``."""
        self.np.maximum.reduce(Z, axis=1, keepdims=True, out=out)

    def row_sum(self, Z: Any, out: Any) -> None:
        """``out (B, 1) ← Σ of each row of Z``."""
        self.np.add.reduce(Z, axis=1, keepdims=True, out=out)

    def total(self, a: Any) -> Any:
        """``Σ a`` as a 0-d value of ``a``'s dtype (as ``xp.sum(a)``)."""
        return self.np.sum(a)

    def sub(self, a: Any, b: Any, out: Any) -> None:
        self.np.subtract(a, b, out=out)

    def exp(self, a: Any, out: Any) -> None:
        self.np.exp(a, out=out)

    def log(self, a: Any, out: Any) -> None:
        self.np.log(a, out=out)

    def argmax_rows(self, a: Any) -> Any:
        return a.argmax(axis=1)

    def _rows(self, n: int) -> Any:
        r = getattr(self, "_row_index", None)
        if r is None or r.shape[0] < n:
            r = self._row_index = self.np.arange(max(n, 1024))
        return r[:n]

    def pick(self, Z: Any, labels: Any) -> Any:
        """``Z[b, labels[b]]`` for every row ``b`` (a new ``(B,)`` array)."""
        return Z[self._rows(Z.shape[0]), labels]

    def sub_at(self, D: Any, labels: Any, value: float) -> None:
        """``D[b, labels[b]] -= value`` for every row ``b``."""
        D[self._rows(D.shape[0]), labels] -= value

    def count(self, hit: Any, like: Any) -> Any:
        """How many of the booleans ``hit`` are true, as a 0-d value of ``like``'s dtype."""
        return like.dtype.type(self.np.count_nonzero(hit))

    def count_argmax_hits(self, Z: Any, labels: Any) -> Any:
        """How many rows of ``Z`` have their (first) maximum at their label, as a 0-d value
        of ``Z``'s dtype (a step's correct predictions)."""
        return self.count(self.argmax_rows(Z) == labels, Z)

    def host_view(self, a: Any) -> Any:
        """``a`` as a NumPy array sharing its memory (for MPI, which takes host buffers)."""
        return a

    def scalar(self, value: Any, like: Any) -> Any:
        """A 0-d array holding ``value``, of ``like``'s dtype (or int32 for an int)."""
        if isinstance(value, int):
            return self.np.asarray(value, dtype=self.np.int32)
        return self.np.asarray(value, dtype=like.dtype)

    def host_dtype(self, like: Any) -> Any:
        """The NumPy scalar type of ``like``'s dtype (host arithmetic rounded as on the
        device)."""
        return like.dtype.type

    def dot(self, a: Any, b: Any) -> float:
        """``Σ a·b`` over two 1-d buffers, as a Python float (one pass, no temporary)."""
        return float(self.np.dot(a, b))


class CupyOps(NumpyOps):
    """The same kernels on CuPy arrays, on the GPU: nothing here reads a value on the host."""

    name = "cupy"
    host_reads = False

    def quiet(self):
        return contextlib.nullcontext()  # CuPy does not warn on overflow

    def sum_rows(self, G, out):
        self.np.sum(G, axis=0, out=out)

    def min_max(self, a):
        raise RuntimeError("CupyOps.min_max: a CuPy array's values are on the GPU")

    def row_max(self, Z, out):
        self.np.amax(Z, axis=1, keepdims=True, out=out)

    def row_sum(self, Z, out):
        self.np.sum(Z, axis=1, keepdims=True, out=out)

    def count(self, hit, like):
        return self.np.count_nonzero(hit).astype(like.dtype)

    def host_view(self, a):
        raise RuntimeError("CupyOps.host_view: a CuPy array's memory is on the GPU")
