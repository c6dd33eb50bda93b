"""NumPy's in-place operations with the optimizer updates fused by Numba (optional).

:class:`NumbaOps` is :class:`~backends._ops.NumpyOps` with the updates overridden
(``add_scaled_``, ``axpy_``, ``fold_div_``, ``momentum_update_``, ``velocity_update_``,
``adam_update_``), relu's backward as one pass (``relu_backward_``), and one-pass losses
added: softmax cross-entropy on labels and on canonical targets (``softmax_xent_labels``,
``softmax_xent``: the executors' hooks, which PyTorch's operations also fill, on the CPU with
these same loops on the tensors' memory) and scikit-learn's two log losses
(``softmax_log_loss``, ``sigmoid_log_loss``, hooks of :mod:`bpcore.sklearn._rules`'s
kernels). NumPy runs each update as up to a dozen passes over the flat buffers (in chunks
that stay in cache); here each is one compiled loop that reads every element once: on an
84,000-parameter buffer, Adam 1.15 ms -> 0.25 ms (float64) and 0.83 -> 0.13 ms (float32),
momentum 6-10x faster (this 2-core CPU).

The updates' arithmetic is NumPy's, operation for operation and in the same order, with
every scalar rounded to the array's dtype first as NumPy rounds a Python float (NEP 50) and
no fused multiply-add (Numba's default, ``fastmath`` off): the results are bit for bit
NumPy's (``tests/test_registry_kernels.py`` holds them equal on hypothesis-drawn values,
NaN and infinities included). The losses take each exponential once (the softmax as
``exp(Z - max) / Σ``) and sum in another order: equal to their entries' kernels to round-off
(tested likewise). On a 100 x 10 float32 batch, softmax cross-entropy on canonical targets
with its count of correct rows: 11 µs against 30 for NumPy's sixteen operations.

The NumPy backend uses these where Numba imports (``pip install "bpcore[fast]"``) and
``BPCORE_NUMBA`` is not ``0``; else it runs :class:`~backends._ops.NumpyOps`, the same
numbers. The loops compile on first use, per dtype, and are cached on disk (Numba's
``cache=True``: next to this file, or in Numba's user cache where that is read-only; in
memory only where neither is writable).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from ._ops import NumpyOps

__all__ = ["NumbaOps", "numba_ops", "numba_unavailable_reason"]


def numba_unavailable_reason() -> str | None:
    """Why the NumPy backend runs without Numba's kernels (None: it runs with them)."""
    if os.environ.get("BPCORE_NUMBA", "1").strip() == "0":
        return "BPCORE_NUMBA=0"
    if importlib.util.find_spec("numba") is None:
        return 'numba is not installed (pip install "bpcore[fast]")'
    if _BROKEN:
        return _BROKEN[0]
    return None


_KERNELS: Any = None
_BROKEN: list[str] = []  # why Numba failed to import in this process (then NumPy's kernels)


def _kernels() -> Any:
    """The compiled loops, or None where Numba fails to import (a Numba built for another
    NumPy, say: NumPy's own kernels run). Numba is imported on the first update, not with
    the backend; each loop compiles per dtype on its first call (or loads from the cache)."""
    global _KERNELS
    if _KERNELS is not None or _BROKEN:
        return _KERNELS
    try:
        from numba import njit
    except Exception as e:
        _BROKEN.append(f"numba failed to import ({type(e).__name__}: {e})")
        return None
    try:
        _KERNELS = _build(njit, cache=True)
    except RuntimeError:  # no writable place for Numba's cache: compile in memory only
        _KERNELS = _build(njit, cache=False)
    return _KERNELS


def _build(njit: Any, cache: bool) -> Any:
    import numpy as np

    # error_model="numpy": a division by zero gives inf/NaN as NumPy's, no check per element
    # (which would also keep the loop from vectorising). boundscheck off; fastmath off.
    jit = njit(cache=cache, nogil=True, error_model="numpy", boundscheck=False)

    @jit
    def axpy(y, a, x):                       # y ← y + x·a
        for i in range(y.shape[0]):
            y[i] = y[i] + x[i] * a

    @jit
    def fold_div(g, w, alpha, S, fold):      # g_W ← (g_W + W·α) / S, or g / S; then g_b / S
        n = w.shape[0]
        if fold:
            for i in range(n):
                g[i] = (g[i] + w[i] * alpha) / S
        else:
            for i in range(n):
                g[i] = g[i] / S
        for i in range(n, g.shape[0]):
            g[i] = g[i] / S

    @jit
    def momentum(p, g, v, neg_lr, beta, nesterov):
        # v ← v·β + g; θ ← θ + (g + v·β)·(-lr) with Nesterov, else θ + v·(-lr)
        for i in range(p.shape[0]):
            vi = v[i] * beta + g[i]
            v[i] = vi
            if nesterov:
                p[i] = p[i] + (g[i] + vi * beta) * neg_lr
            else:
                p[i] = p[i] + vi * neg_lr

    @jit
    def velocity(p, g, v, lr, mu, nesterov):
        # t = g·lr; v ← v·μ - t; θ ← θ + (v·μ - t) with Nesterov, else θ + v
        for i in range(p.shape[0]):
            t = g[i] * lr
            vi = v[i] * mu - t
            v[i] = vi
            if nesterov:
                p[i] = p[i] + (vi * mu - t)
            else:
                p[i] = p[i] + vi

    @jit
    def adam(p, g, m, v, neg_alpha, eps, b1, c1, b2, c2, neg_decay, n_decayed):
        # m ← m·b1 + g·(1-b1); v ← v·b2 + (g·g)·(1-b2); u = m / (sqrt(v) + eps) · (-alpha);
        # on the first n_decayed entries u ← u + θ·(-decay); θ ← θ + u
        for i in range(p.shape[0]):
            gi = g[i]
            mi = m[i] * b1 + gi * c1
            vi = v[i] * b2 + (gi * gi) * c2
            m[i] = mi
            v[i] = vi
            u = (mi / (np.sqrt(vi) + eps)) * neg_alpha
            if i < n_decayed:
                u = u + p[i] * neg_decay
            p[i] = p[i] + u

    @jit
    def row_argmax(Z, b):
        # NumPy's argmax of row b: the first maximum, or the first NaN (whose max is NaN)
        top = 0
        m = Z[b, 0]
        for c in range(1, Z.shape[1]):
            v = Z[b, c]
            if m == m and (v > m or v != v):
                m = v
                top = c
        return top

    @jit
    def row_exp(Z, b, E, zero):
        # E_b ← exp(Z_b - m), m = Z_b's max (NumPy's argmax: the first maximum, or the first
        # NaN); returns (that argmax, Σ_c E_bc). The row's softmax is E_b / Σ, its
        # log-sum-exp m + log Σ.
        top = row_argmax(Z, b)
        m = Z[b, top]
        s = zero
        for c in range(Z.shape[1]):
            e = np.exp(Z[b, c] - m)
            E[b, c] = e
            s += e
        return top, s

    @jit
    def softmax_xent_labels(Z, labels, D, zero, one, B, nan):
        # per row b: P = softmax(Z_b), lse = m + log Σ (row_exp); returns (Σ_b (lse -
        # Z_{b,y_b}), the rows whose argmax is y_b); D ← (P - onehot(y)) / B. A label out of
        # range (checked at the boundary before; never read out of bounds here) gives NaN.
        total = 0.0
        correct = 0
        for b in range(Z.shape[0]):
            y = labels[b]
            if y < 0 or y >= Z.shape[1]:
                total = np.nan
                for c in range(Z.shape[1]):
                    D[b, c] = nan
                continue
            top, s = row_exp(Z, b, D, zero)
            if top == y:
                correct += 1
            total += (Z[b, top] + np.log(s)) - Z[b, y]
            for c in range(Z.shape[1]):
                D[b, c] = D[b, c] / s
            D[b, y] -= one
            for c in range(Z.shape[1]):
                D[b, c] = D[b, c] / B
        return total, correct

    @jit
    def softmax_xent(Z, T, D, zero, B):
        # the same on canonical targets T (rows of class weights; one-hot for labels):
        # returns (Σ_b Σ_c T_bc (lse_b - Z_bc), the rows where argmax Z_b is argmax T_b);
        # D ← (P Σ_c T_bc - T) / B
        total = 0.0
        correct = 0
        for b in range(Z.shape[0]):
            top, s = row_exp(Z, b, D, zero)
            if top == row_argmax(T, b):
                correct += 1
            lse = Z[b, top] + np.log(s)
            t_sum = zero
            for c in range(Z.shape[1]):
                total += T[b, c] * (lse - Z[b, c])
                t_sum += T[b, c]
            for c in range(Z.shape[1]):
                D[b, c] = (D[b, c] / s * t_sum - T[b, c]) / B
        return total, correct

    @jit
    def softmax_log_loss(Z, Y, sw, lo, hi, D, zero, one):
        # scikit-learn's multinomial log loss, row by row: P = exp(Z - max) / Σ (row_exp),
        # returns Σ sw (Y log clip(P, lo, hi)) (summed in float64; the caller negates it) and
        # D ← sw (P - Y) (one: unused; both log losses take the same arguments)
        # A term with Y = 0 is w (0 · log Pc) = ±0 where Pc is a number (clipped into
        # (0, 1): its log is finite) and w finite, and adding ±0 to the sum changes nothing:
        # those logs are skipped (9 in 10 with one-hot rows of 10 classes), the sum the same.
        total = 0.0
        for r in range(Z.shape[0]):
            _, s = row_exp(Z, r, D, zero)
            w = sw[r, 0]
            w_finite = w - w == zero
            for c in range(Z.shape[1]):
                p = D[r, c] / s
                pc = lo if p < lo else (hi if p > hi else p)  # (NaN stays NaN, as np.clip)
                y = Y[r, c]
                if y != zero or pc != pc or not w_finite:
                    total += w * (y * np.log(pc))
                D[r, c] = w * (p - y)
        return total

    @jit
    def sigmoid_log_loss(Z, Y, sw, lo, hi, D, zero, one):
        # scikit-learn's binary log loss, element by element: P = sigmoid(Z) as
        # ops.sigmoid computes it (e = exp(-|Z|); 1/(1 + e), or e/(1 + e) where Z < 0),
        # returns Σ sw (Y log Pc + (1 - Y) log(1 - Pc)), Pc = clip(P, lo, hi) (summed in
        # float64; the caller negates it) and D ← sw (P - Y)
        total = 0.0
        for r in range(Z.shape[0]):
            w = sw[r, 0]
            for c in range(Z.shape[1]):
                z = Z[r, c]
                e = np.exp(-np.abs(z))
                d = one + e
                p = e / d if z < zero else one / d
                pc = lo if p < lo else (hi if p > hi else p)
                y = Y[r, c]
                if y == zero:    # (y log Pc is -0 beside a log below 0 or NaN: the same sum)
                    t = (one - y) * np.log(one - pc)
                elif y == one:   # ((1 - y) log(1 - Pc) likewise)
                    t = y * np.log(pc)
                else:
                    t = y * np.log(pc) + (one - y) * np.log(one - pc)
                total += w * t
                D[r, c] = w * (p - y)
        return total

    @jit
    def relu_backward(D, Y, zero, one):
        # D ← D · [Y > 0] (NaN in Y: 0), row by row (D, Y: C-contiguous): NumPy's mask
        # product, bit for bit, in one pass. The product, not a select (D where Y > 0, else
        # 0): it vectorises, a select does not (200 x 256: 11 µs against 35 in float32, 21
        # against 42 in float64, measured)
        for b in range(D.shape[0]):
            for c in range(D.shape[1]):
                D[b, c] = D[b, c] * (one if Y[b, c] > zero else zero)

    class K:
        pass

    K.axpy, K.momentum, K.velocity, K.adam = axpy, momentum, velocity, adam
    K.softmax_xent_labels, K.fold_div = softmax_xent_labels, fold_div
    K.softmax_xent = softmax_xent
    K.relu_backward = relu_backward
    K.softmax_log_loss, K.sigmoid_log_loss = softmax_log_loss, sigmoid_log_loss
    return K


def _native(a: Any) -> Any:
    """``a`` in the machine's byte order (a copy where it is not: read from a big-endian
    file, say), the only one Numba types; the same values, so the same numbers."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


class NumbaOps(NumpyOps):
    """:class:`NumpyOps` with the optimizer updates as single compiled passes (bit for bit
    the same numbers). ``tmp`` (the chunk scratch) is not needed and left untouched."""

    kernels = "numpy+numba"  # (bpcore info)

    @staticmethod
    def _s(like: Any, value: float) -> Any:
        """``value`` rounded to ``like``'s dtype, as NumPy rounds a Python float scalar."""
        return like.dtype.type(value)

    def softmax_xent_labels(self, Z, labels, D):
        """Softmax cross-entropy on integer labels as one compiled pass per row (the
        executors' hook, as PyTorch's): ``(value, D, correct)``, the numbers of the loss
        entry's kernel (:meth:`bpcore.nn.losses.SoftmaxXentKernel.labels`) to round-off (the
        sums in another order; the value summed in float64), and the rows whose argmax is
        their label, counted in the same pass."""
        k = _kernels()
        if k is None:
            return None  # (the entry's kernel runs NumPy's own operations)
        labels = _native(labels)
        t = Z.dtype.type
        B = Z.shape[0]
        total, correct = k.softmax_xent_labels(Z, labels, D, t(0), t(1), t(B), t(float("nan")))
        return t(total) / B, D, t(correct)

    def softmax_xent(self, Z, T, D):
        """Softmax cross-entropy on canonical targets ``T`` as one compiled pass per row
        (the executors' hook beside :meth:`softmax_xent_labels`): ``(value, D, correct)``,
        the numbers of the loss entry's kernel (:meth:`bpcore.nn.losses.SoftmaxXentKernel.
        __call__`) to round-off, and the rows where ``argmax Z`` is ``argmax T`` (NumPy's
        argmax, as :meth:`bpcore.nn.losses.Loss.correct`); None: declined."""
        k = _kernels()
        T = _native(T)
        if k is None or T.dtype != Z.dtype:
            return None  # (the entry's kernel runs NumPy's own operations)
        t = Z.dtype.type
        B = Z.shape[0]
        total, correct = k.softmax_xent(Z, T, D, t(0), t(B))
        return t(total) / B, D, t(correct)

    def softmax_log_loss(self, Z, Y, sw, eps, D):
        """scikit-learn's multinomial log loss as one compiled pass (the hook its registry
        entry's kernel, :class:`bpcore.sklearn._rules._SoftmaxLogLossKernel`, calls): its
        ``-Σ sw (Y log clip(P))`` and ``D = sw (P - Y)``, the kernel's numbers to round-off
        (the sums in another order; the value summed in float64); None: declined."""
        k = _kernels()
        return None if k is None else self._log_loss(k.softmax_log_loss, Z, Y, sw, eps, D)

    def sigmoid_log_loss(self, Z, Y, sw, eps, D):
        """scikit-learn's binary log loss likewise (:class:`bpcore.sklearn._rules.
        _LogisticLossKernel`): each element's arithmetic is the kernel's, the sum's order
        alone differs."""
        k = _kernels()
        return None if k is None else self._log_loss(k.sigmoid_log_loss, Z, Y, sw, eps, D)

    @staticmethod
    def _log_loss(kernel, Z, Y, sw, eps, D):
        """``kernel``'s value, negated, in ``Z``'s dtype; None where a layout is not one
        Numba takes (then the registry entry's kernel runs NumPy's operations)."""
        if not all(a.flags.c_contiguous and a.dtype == Z.dtype and a.dtype.isnative
                   for a in (Z, Y, sw, D)):
            return None
        t = Z.dtype.type
        return t(-kernel(Z, Y, sw, t(eps), t(1.0 - eps), D, t(0), t(1)))

    def relu_backward_(self, D, Y):
        k = _kernels()
        if k is None or not (D.flags.c_contiguous and Y.flags.c_contiguous):
            return super().relu_backward_(D, Y)
        t = D.dtype.type
        k.relu_backward(D, Y, t(0), t(1))  # NumPy's mask product in one pass

    def fold_div_(self, g, W, alpha, S, tmp):
        k = _kernels()
        if k is None:
            return super().fold_div_(g, W, alpha, S, tmp)
        k.fold_div(g, W, self._s(g, alpha), g.dtype.type(S), bool(alpha))

    def add_scaled_(self, p, g, a):
        k = _kernels()
        if k is None:
            return super().add_scaled_(p, g, a)
        k.axpy(p, self._s(p, a), g)  # p + g·a: NumPy's g ← g·a, p ← p + g, without the write

    def axpy_(self, y, a, x, tmp):
        k = _kernels()
        if k is None:
            return super().axpy_(y, a, x, tmp)
        k.axpy(y, self._s(y, a), x)

    def momentum_update_(self, p, g, v, lr, beta, nesterov, tmp):
        k = _kernels()
        if k is None:
            return super().momentum_update_(p, g, v, lr, beta, nesterov, tmp)
        k.momentum(p, g, v, self._s(p, -lr), self._s(p, beta), bool(nesterov))

    def velocity_update_(self, p, g, v, lr, mu, nesterov, tmp):
        k = _kernels()
        if k is None:
            return super().velocity_update_(p, g, v, lr, mu, nesterov, tmp)
        k.velocity(p, g, v, self._s(p, lr), self._s(p, mu), bool(nesterov))

    def adam_update_(self, p, g, m, v, alpha, eps, b1, b2, decay, n_weights, tmp):
        k = _kernels()
        if k is None:
            return super().adam_update_(p, g, m, v, alpha, eps, b1, b2, decay, n_weights, tmp)
        s = self._s
        k.adam(p, g, m, v, s(p, -alpha), s(p, eps), s(p, b1), s(p, 1.0 - b1), s(p, b2),
               s(p, 1.0 - b2), s(p, -decay), int(n_weights) if decay else 0)


def numba_ops(module: Any) -> NumpyOps:
    """The NumPy backend's in-place operations: :class:`NumbaOps` where Numba runs, else
    :class:`NumpyOps` (:func:`numba_unavailable_reason` says why)."""
    return NumbaOps(module) if numba_unavailable_reason() is None else NumpyOps(module)
