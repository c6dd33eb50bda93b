"""Validation at the public API boundary: shapes and dtypes checked, data moved once."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DTypeError, ShapeError
from .losses import _dtype_kind


def prepare_input(be: Any, x: Any, n_in: int, dtype: Any, *, argument: str = "x") -> Any:
    """Return ``x`` as a ``(batch, n_in)`` array of ``dtype`` on backend ``be``.

    Real floating inputs of another precision are cast; integer, boolean and complex
    inputs are rejected (an integer image would otherwise be silently scaled wrong).
    """
    given = type(x).__name__
    if isinstance(x, (list, tuple)) or np.isscalar(x):
        x = np.asarray(x)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")) and hasattr(x, "__dlpack__"):
        x = be.asarray(x)  # a bare DLPack producer: import it first to see shape and dtype
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise DTypeError(f"{argument}: expected an array of shape (batch, {n_in}), "
                         f"got a {type(x).__name__}.")
    kind = _dtype_kind(x.dtype)
    if kind != "float":
        hint = (" Scale and convert it first, e.g. x.astype('float32') / 255 for 8-bit images."
                if kind in ("int", "uint", "bool") else "")
        raise DTypeError(f"{argument}: expected real floating-point data, got dtype "
                         f"{x.dtype} (a {given}).{hint}")
    shape = tuple(x.shape)
    if len(shape) != 2:
        fix = (f" For a single sample use x.reshape(1, {n_in})." if len(shape) == 1 else
               " Flatten each sample first: x.reshape(len(x), -1).")
        raise ShapeError(f"{argument}: expected a 2-d array of shape (batch, {n_in}), got "
                         f"shape {shape} ({len(shape)}-d).{fix}")
    if shape[1] != n_in:
        raise ShapeError(f"{argument}: expected {n_in} features per row (the first layer's "
                         f"width), got shape {shape}.")
    if shape[0] < 1:
        raise ShapeError(f"{argument}: expected at least one row, got shape {shape}.")
    return be.asarray(x, dtype=dtype)
