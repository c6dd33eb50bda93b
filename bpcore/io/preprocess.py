"""Input preprocessing that travels with the model.

What ``bpcore train`` (or your code) does to the inputs before training must be done again,
identically, before every prediction. A :class:`Standardize` is plain data: it is saved in
the checkpoint (``bpcore.save(..., preprocessing=...)``) and comes back with it
(``bpcore.load_checkpoint(path).preprocess(X)``), so raw data in gives the right answer out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError, ShapeError

__all__ = ["Standardize", "from_spec"]


def _std_floor(mean: Any) -> np.ndarray:
    """The smallest std a feature keeps: below ``1e-8 · max(1, |mean|)`` it is constant up to
    round-off, and dividing by it would only blow round-off up (fit sets such a std to 1)."""
    return 1e-8 * np.maximum(1.0, np.abs(np.asarray(mean, dtype=np.float64)))


@dataclass(frozen=True)
class Standardize:
    """``(X - mean) / std`` per feature; features that are constant keep ``std = 1``.
    ``std`` is the population standard deviation (``ddof=0``, as scikit-learn's
    ``StandardScaler``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        if mean.shape != std.shape or mean.ndim != 1:
            raise ShapeError(f"Standardize: mean and std must be two lists of the same length, "
                             f"got {len(self.mean)} and {len(self.std)}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise ShapeError("Standardize: mean and std must be finite")
        low = np.flatnonzero(~(std > _std_floor(mean)))
        if low.size:
            raise ShapeError(f"Standardize: std of feature {int(low[0])} is {std[low[0]]:g}, at "
                             "or below 1e-8·max(1, |mean|): the feature is constant up to "
                             "round-off (Standardize.fit uses std = 1 for such a feature)")

    @classmethod
    def fit(cls, X: Any) -> "Standardize":
        X = np.asarray(X, dtype=np.float64)
        std = X.std(axis=0)  # ddof=0
        std = np.where(std > _std_floor(X.mean(axis=0)), std, 1.0)
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
                not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v)):
            raise CheckpointError(f"preprocessing: {name} must be {n_features} numbers "
                                  "(one per input feature)")
    try:
        return Standardize(tuple(float(a) for a in mean), tuple(float(a) for a in std))
    except ShapeError as e:
        raise CheckpointError(f"preprocessing: {e}") from None
