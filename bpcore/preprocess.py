"""Input preprocessing that travels with the model.

What ``bpcore train`` (or your code) does to the inputs before training must be done again,
identically, before every prediction. A :class:`Standardize` is plain data: it is saved in
the checkpoint (``bpcore.save(..., preprocessing=...)``) and comes back with it
(``bpcore.load_checkpoint(path).preprocess(X)``), so raw data in gives the right answer out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CheckpointError, ShapeError

__all__ = ["Standardize", "from_spec"]


@dataclass(frozen=True)
class Standardize:
    """``(X - mean) / std`` per feature; features that are constant keep ``std = 1``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, X: Any) -> "Standardize":
        X = np.asarray(X, dtype=np.float64)
        std = X.std(axis=0)
        std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(X.mean(axis=0))), std, 1.0)
        return cls(tuple(X.mean(axis=0).tolist()), tuple(std.tolist()))

    def __call__(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.mean):
            raise ShapeError(f"preprocess: expected {len(self.mean)} features per row, got "
                             f"shape {X.shape}")
        return (X - np.asarray(self.mean)) / np.asarray(self.std)

    def to_spec(self) -> dict:
        return {"kind": "standardize", "mean": list(self.mean), "std": list(self.std)}


def from_spec(spec: Any, n_features: int) -> Standardize | None:
    """The preprocessing a checkpoint describes (None for none); a bad description is a
    :class:`CheckpointError`."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("kind") != "standardize":
        raise CheckpointError(f"preprocessing: expected null or {{'kind': 'standardize', "
                              f"'mean': [...], 'std': [...]}}, got {str(spec)[:80]}")
    mean, std = spec.get("mean"), spec.get("std")
    for name, v in (("mean", mean), ("std", std)):
        if (not isinstance(v, list) or len(v) != n_features or
                not all(isinstance(a, (int, float)) and not isinstance(a, bool) and
                        math.isfinite(a) for a in v)):
            raise CheckpointError(f"preprocessing: {name} must be {n_features} finite numbers "
                                  "(one per input feature)")
    if not all(s > 0 for s in std):
        raise CheckpointError("preprocessing: every std must be > 0")
    return Standardize(tuple(float(a) for a in mean), tuple(float(a) for a in std))
