"""The one flat parameter layout: every place that needs the parameters as one vector uses it.

The in-place step keeps parameters, gradients and moments in flat buffers; data-parallel MPI
sums every gradient with one ``Allreduce`` of one buffer; :func:`bpcore.gradcheck` perturbs
one vector. All three lay the vector out the same way: every ``W^k`` (row-major, bpcore's
``(n_out, n_in)``), then every ``b^k``. The weights first, so weight decay (which touches
``W`` only) is one operation on the prefix ``[:n_weights]``.

(scikit-learn's L-BFGS vector, in :mod:`bpcore.sklearn`, is scikit-learn's own packing —
its ``(n_in, n_out)`` coefficients — because matching its optimizer to round-off needs the
same vector; it is a format of scikit-learn's, not a second layout of bpcore's.)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ._array import Params, array_namespace

__all__ = ["FlatLayout"]


class FlatLayout:
    """The flat layout of the parameters of an MLP with layer ``sizes``."""

    def __init__(self, sizes: Sequence[int]):
        sizes = [int(s) for s in sizes]
        self.n_layers = len(sizes) - 1
        self.shapes = ([(o, i) for i, o in zip(sizes[:-1], sizes[1:])] +
                       [(o,) for o in sizes[1:]])
        self.names = ([f"W{k}" for k in range(1, self.n_layers + 1)] +
                      [f"b{k}" for k in range(1, self.n_layers + 1)])
        self.offsets, at = [], 0
        for s in self.shapes:
            self.offsets.append(at)
            at += math.prod(s)
        self.size = at
        self.n_weights = self.offsets[self.n_layers] if self.n_layers else 0

    @classmethod
    def of(cls, params: Params) -> "FlatLayout":
        return cls([params[0][0].shape[1]] + [W.shape[0] for W, _ in params])

    def leaves(self, params: Params) -> list[Any]:
        """The arrays of ``params`` in layout order."""
        return [W for W, _ in params] + [b for _, b in params]

    def params(self, leaves: Sequence[Any]) -> Params:
        """``[(W1, b1), ...]`` from arrays in layout order."""
        K = self.n_layers
        return [(leaves[k], leaves[K + k]) for k in range(K)]

    def views(self, flat: Any) -> Params:
        """``[(W1, b1), ...]`` as views into the 1-d ``flat`` (NumPy, PyTorch: writing a view
        writes the buffer)."""
        return self.params([flat[a:a + math.prod(s)].reshape(s)
                            for a, s in zip(self.offsets, self.shapes)])

    def flatten(self, params: Params, scale: Any = None) -> Any:
        """One new 1-d array of ``params`` (times ``scale``, if given), on their device."""
        leaves = self.leaves(params)
        xp = array_namespace(*leaves)
        parts = [xp.reshape(a, (-1,)) for a in leaves]
        if scale is not None:
            parts = [p * scale for p in parts]
        return xp.concat(parts)

    def unflatten(self, flat: Any) -> Params:
        """``[(W1, b1), ...]`` from the first :attr:`size` entries of the 1-d ``flat``."""
        xp = array_namespace(flat)
        return self.params([xp.reshape(flat[a:a + math.prod(s)], s)
                            for a, s in zip(self.offsets, self.shapes)])

    def locate(self, i: int) -> str:
        """The parameter entry at flat index ``i``, as ``"W2[3, 0]"``."""
        for name, a, s in zip(self.names, self.offsets, self.shapes):
            n = math.prod(s)
            if i < a + n:
                j, idx = i - a, []
                for d in reversed(s):
                    idx.append(j % d)
                    j //= d
                return f"{name}{idx[::-1]}"
        return "?"
