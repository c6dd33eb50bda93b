"""NumPy on the CPU, through ``array_api_compat.numpy``."""

from __future__ import annotations

import numpy as np

from ._base import Backend, numpy_errstate_jit
from ._numba import numba_ops


def make() -> Backend:
    import array_api_compat.numpy as xp

    return Backend(
        name="numpy",
        xp=xp,
        device="cpu",
        is_native=lambda x: isinstance(x, (np.ndarray, np.generic)),  # reductions give scalars
        from_host=lambda a: a,
        native_to_device=lambda x: x,
        to_numpy=np.asarray,
        dlpack_device=(1, 0),
        from_dlpack=np.from_dlpack,
        jit=numpy_errstate_jit,
        inplace_ops=numba_ops(np),  # NumPy's, with Numba's fused updates where it runs
        version=np.__version__,
    )
