"""``array_api_strict``: the standard and nothing else, to prove the core needs nothing more."""

from __future__ import annotations

import numpy as np

from ._base import Backend, numpy_errstate_jit, unavailable


def make() -> Backend:
    try:
        import array_api_strict as xp
    except ImportError as e:
        raise unavailable("array_api_strict", f"array-api-strict is not installed ({e})",
                          'Install it with: pip install "bpcore[test]"') from None
    return Backend(
        name="array_api_strict",
        xp=xp,
        device=xp.Device("CPU_DEVICE"),
        is_native=lambda x: isinstance(x, xp._array_object.Array),
        from_host=xp.asarray,
        native_to_device=lambda x: x,
        to_numpy=lambda x: np.from_dlpack(x).copy(),
        dlpack_device=(1, 0),
        jit=numpy_errstate_jit,  # it computes with NumPy underneath
        version=getattr(xp, "__version__", ""),
    )
