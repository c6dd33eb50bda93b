"""Validation at the public API boundary: shapes and dtypes checked, data moved once."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends._base import cpu_array_to_numpy, on_cpu
from .errors import ConfigError, DTypeError, ShapeError


def whole_number(name: str, v: Any, lo: int = 1) -> int:
    """``v`` as an int >= ``lo`` (a bool, a float such as 2.5 or a string is a ConfigError)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ConfigError(f"{name}: expected a whole number >= {lo}, got {v!r}")
    return int(v)


def prepare_input(be: Any, x: Any, n_in: int, dtype: Any, *, argument: str = "x") -> Any:
    """Return ``x`` as a ``(batch, n_in)`` array of ``dtype`` on backend ``be``.

    Real floating inputs of another precision are cast; integer, boolean and complex
    inputs are rejected (an integer image would otherwise be silently scaled wrong).
    """
    if be.is_native(x) and x.dtype == dtype and len(x.shape) == 2 and x.shape[1] == n_in \
            and x.shape[0] >= 1:
        return be.native_to_device(x)  # already what the step takes: the device check only
    given = type(x).__name__
    if isinstance(x, (list, tuple)) or np.isscalar(x):
        x = np.asarray(x)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")) and hasattr(x, "__dlpack__"):
        x = be.asarray(x)  # a bare DLPack producer: import it first to see shape and dtype
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        # Anything NumPy turns into a numeric array (a pandas DataFrame, say), as
        # scikit-learn accepts it.
        try:
            x = np.asarray(x)
        except Exception:
            x = None
        if x is None or x.dtype == object:
            raise DTypeError(f"{argument}: expected an array of shape (batch, {n_in}) (NumPy, "
                             f"any array library, or anything numpy.asarray makes numeric), "
                             f"got a {given}.")
    kind = dtype_kind(x.dtype)
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


def host_view(be: Any, y: Any) -> np.ndarray | None:
    """A NumPy view of ``y`` when reading it costs no device sync, else None.

    None only for data on an asynchronous device (JAX, CUDA): host data of any library (a CPU
    torch tensor into a NumPy model, say) is always viewed, so its values can be checked.
    """
    if isinstance(y, np.ndarray):  # (first: a training loop's usual labels)
        return y
    if isinstance(y, (list, tuple)) or np.isscalar(y):
        return np.asarray(y)
    if be.is_native(y):
        return None if be.asynchronous else be.to_numpy(y)
    if on_cpu(y):
        return cpu_array_to_numpy(y)
    if not hasattr(y, "shape") or not hasattr(y, "__dlpack_device__"):
        return np.asarray(y)  # pandas and other array-likes
    return None


_KINDS = {"f": "float", "i": "int", "u": "uint", "b": "bool", "c": "complex"}


def dtype_kind(dt: Any) -> str:
    """'float', 'int', 'uint', 'bool', 'complex' or 'other', for any library's dtype."""
    try:
        return _KINDS.get((dt if isinstance(dt, np.dtype) else np.dtype(dt)).kind, "other")
    except TypeError:  # torch and array_api_strict dtypes: go by the name
        pass
    s = str(dt)
    for key, kind in (("complex", "complex"), ("float", "float"), ("uint", "uint"),
                      ("int", "int"), ("bool", "bool")):
        if key in s:
            return kind
    return "other"
