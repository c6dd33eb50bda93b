"""CuPy on the current NVIDIA GPU. Thin on purpose: it can only be exercised on a GPU."""

from __future__ import annotations

from ._base import Backend, unavailable
from ._ops import CupyOps


def make() -> Backend:
    try:
        import cupy
        import array_api_compat.cupy as xp
    except ImportError as e:
        raise unavailable("cupy", f"CuPy is not installed ({e})",
                          'Install it with: pip install "bpcore[cuda12]" or "bpcore[cuda13]" '
                          "to match your CUDA driver") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or the driver refuses
        raise unavailable("cupy", f"no CUDA device found ({type(e).__name__}: {e})",
                          "Run on a machine with an NVIDIA GPU and driver") from None
    if count < 1:
        raise unavailable("cupy", "no CUDA device found", "Run on a machine with an NVIDIA GPU")
    device = cupy.cuda.Device()

    def native_to_device(x):
        if x.device.id == device.id:
            return x
        from bpcore.errors import DeviceMismatchError
        raise DeviceMismatchError(
            f"asarray: the cupy array is on GPU {x.device.id}, but the cupy backend is on GPU "
            f"{device.id}; copy it with cupy.asarray(x) inside `with cupy.cuda.Device({device.id})`."
        )

    return Backend(
        name="cupy",
        xp=xp,
        device=device,
        is_native=lambda x: isinstance(x, cupy.ndarray),
        from_host=cupy.asarray,
        native_to_device=native_to_device,
        to_numpy=cupy.asnumpy,
        dlpack_device=(2, device.id),
        from_dlpack=cupy.from_dlpack,
        synchronize=lambda *arrays: cupy.cuda.get_current_stream().synchronize(),
        asynchronous=True,
        inplace_ops=CupyOps(cupy),  # (host_reads False: the buffered step, no host read)
        version=cupy.__version__,
    )
