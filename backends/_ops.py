"""In-place array operations: the capability behind bpcore's in-place training step.

A backend whose arrays are mutable and whose values can be read without waiting for a device
(NumPy; PyTorch on the CPU) offers an ``ops`` object (``Backend.inplace_ops``). Each method
writes into a buffer the caller owns, so a training step can run on preallocated memory and
allocate nothing whose size grows with the model. The generic, allocating array-API path
stays the reference: :mod:`bpcore.inplace` falls back to it for anything ``ops`` lacks, and the
tests check the two against each other.

:class:`NumpyOps` is written against NumPy's ufunc interface (``out=``) and takes the module
as a parameter; :class:`TorchOps` overrides what PyTorch spells differently. Every method
keeps NaN where NumPy and the generic path keep it.
"""

from __future__ import annotations

import contextlib
from typing import Any


class NumpyOps:
    """NumPy-style in-place kernels on ``module`` (``numpy``)."""

    name = "numpy"

    def __init__(self, module: Any):
        self.np = module

    def quiet(self) -> Any:
        """A context without overflow/invalid-value warnings (the step's guard reports them)."""
        return self.np.errstate(over="ignore", invalid="ignore", divide="ignore",
                                under="ignore")

    # -- buffers ----------------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.np.empty(shape, dtype=dtype)

    def bool_empty(self, shape: tuple[int, ...]) -> Any:
        return self.np.empty(shape, dtype=bool)

    def copy_(self, dst: Any, src: Any) -> None:
        self.np.copyto(dst, src)

    def flat_views(self, flat: Any, shapes: list[tuple[int, ...]]) -> list[Any]:
        """Consecutive views of the 1-d ``flat`` with the given shapes."""
        out, at = [], 0
        for s in shapes:
            n = 1
            for d in s:
                n *= d
            out.append(flat[at:at + n].reshape(s))
            at += n
        return out

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
        """``Z ← max(Z, 0)``; NaN stays NaN."""
        self.np.maximum(Z, 0, out=Z)

    def gt0(self, Y: Any, mask: Any) -> None:
        """``mask ← [Y > 0]`` (relu's derivative, from its output; NaN gives False)."""
        self.np.greater(Y, 0, out=mask)

    # -- products and reductions --------------------------------------------------------------
    def matmul(self, a: Any, b: Any, out: Any) -> None:
        self.np.matmul(a, b, out=out)

    def sum_rows(self, G: Any, out: Any) -> None:
        """``out ← Σ_rows G`` (the bias gradient)."""
        self.np.add.reduce(G, axis=0, out=out)

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


class TorchOps(NumpyOps):
    """The same kernels on PyTorch CPU tensors (no autograd)."""

    name = "torch"

    def __init__(self, torch: Any):
        self.np = None
        self.torch = torch

    def quiet(self):
        return contextlib.nullcontext()  # PyTorch does not warn on overflow

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype)

    def bool_empty(self, shape):
        return self.torch.empty(shape, dtype=self.torch.bool)

    def copy_(self, dst, src):
        dst.copy_(src)

    def mul(self, a, b, out):
        self.torch.mul(a, b, out=out)

    def add(self, a, b, out):
        self.torch.add(a, b, out=out)

    def div(self, a, b, out):
        self.torch.div(a, b, out=out)

    def sqrt(self, a, out):
        self.torch.sqrt(a, out=out)

    def relu_(self, Z):
        self.torch.relu_(Z)  # NaN stays NaN, as numpy.maximum

    def gt0(self, Y, mask):
        self.torch.gt(Y, 0, out=mask)

    def matmul(self, a, b, out):
        self.torch.matmul(a, b, out=out)

    def sum_rows(self, G, out):
        self.torch.sum(G, dim=0, out=out)

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
            r = self._row_index = self.torch.arange(max(n, 1024))
        return r[:n]

    def count(self, hit, like):
        return self.torch.sum(hit).to(like.dtype)

    def scalar(self, value, like):
        dtype = self.torch.int32 if isinstance(value, int) else like.dtype
        return self.torch.tensor(value, dtype=dtype)

    def host_dtype(self, like):
        import numpy

        return {self.torch.float32: numpy.float32, self.torch.float64: numpy.float64}[like.dtype]
