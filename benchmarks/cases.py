"""The benchmark cases: architectures, batch sizes, and the data they run on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTIVATION = "relu"          # hidden layers; the output is identity + softmax cross-entropy
LR_SGD, LR_ADAM = 0.01, 1e-3
N_ROTATE = 4                 # distinct batches cycled through, so caches don't flatter


@dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple[int, ...]
    batch: int
    gpu_only: bool = False

    def with_batch(self, batch: int) -> "Case":
        return Case(f"{self.name}@{batch}", self.sizes, batch, self.gpu_only)

    def gemm_flops(self) -> int:
        """FLOPs of the step's matrix products: 3 per layer, 2 for the first (no δ^0)."""
        total = 0
        for k, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            total += (2 if k == 0 else 3) * 2 * self.batch * n_in * n_out
        return total


CASES = {
    "small": Case("small", (40, 100, 100, 10), 100),
    "mnist": Case("mnist", (784, 256, 256, 10), 128),
    "large": Case("large", (784, 1024, 1024, 10), 256),
    "wide": Case("wide", (4096, 4096, 4096, 4096, 10), 1024, gpu_only=True),
}
SWEEP_BATCHES_QUICK = (32, 256, 2048)
SWEEP_BATCHES_FULL = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SWEEP_BATCHES_GPU = (64, 1024, 16384)


def make_batches(case: Case, dtype: str, n: int = N_ROTATE, seed: int = 0):
    """``n`` host batches ``(X (batch, n_in), y (batch,) int64)`` for ``case``."""
    rng = np.random.default_rng(seed)
    n_in, n_out = case.sizes[0], case.sizes[-1]
    return [(rng.standard_normal((case.batch, n_in)).astype(dtype),
             rng.integers(0, n_out, size=case.batch).astype(np.int64)) for _ in range(n)]


def host_params(case: Case, dtype: str, seed: int = 0):
    """The same initial parameters for bpcore and every peer."""
    from bpcore.nn.init import init_params

    return init_params(case.sizes, ["he"] * (len(case.sizes) - 1), seed, dtype)
