"""Parameter initialisation, drawn on the host so every backend starts bit-identical.

``W^k`` has shape ``(n_k, n_{k-1})`` (out, in), as in the derivation; ``b^k`` starts at 0.
Values are drawn in float64 with ``numpy.random.default_rng(seed)`` and then cast, so the
same seed gives the same bits on NumPy, JAX, PyTorch and CuPy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import ConfigError, UnknownNameError

__all__ = ["INITS", "init_params"]


def he_normal(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """He/Kaiming normal: std = sqrt(2 / fan_in), for relu-like activations."""
    return rng.standard_normal((n_out, n_in)) * math.sqrt(2.0 / n_in)


def glorot_uniform(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """Glorot/Xavier uniform: U(±sqrt(6 / (fan_in + fan_out))), for tanh/sigmoid."""
    limit = math.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-limit, limit, size=(n_out, n_in))


INITS = {"he": he_normal, "glorot": glorot_uniform}


def init_params(sizes: Sequence[int], schemes: Sequence[str], seed: int | None,
                dtype: str = "float32") -> list[tuple[np.ndarray, np.ndarray]]:
    """Host (NumPy) parameters ``[(W^1, b^1), ...]`` for layer ``sizes``.

    ``schemes[k]`` names the initialisation of layer ``k+1`` (``"he"`` or ``"glorot"``).
    """
    for s in schemes:
        if s not in INITS:
            raise UnknownNameError(f"init: unknown scheme {s!r}; expected one of {sorted(INITS)}")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ConfigError(f"seed: expected a non-negative integer or None, got {seed!r}")
    rng = np.random.default_rng(seed)
    params = []
    for (n_in, n_out), scheme in zip(zip(sizes[:-1], sizes[1:]), schemes):
        W = INITS[scheme](rng, n_out, n_in).astype(dtype)
        params.append((W, np.zeros(n_out, dtype=dtype)))
    return params
