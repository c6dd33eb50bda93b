"""What machine a run is on: backends, devices, CPU, BLAS and thread settings, versions.

``bpcore info`` prints it, and the benchmarks record it beside every result.
"""

from __future__ import annotations

import os
import platform

__all__ = ["machine_info"]


def machine_info() -> dict:
    """Backends, devices, BLAS and library versions (also recorded by the benchmarks)."""
    from .. import __version__, backends

    info = {"bpcore": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "backends": {}, "unavailable": backends.reasons(), "blas": []}
    for name in backends.available():
        be = backends.get(name)
        info["backends"][name] = {"version": be.version, "device": str(be.device)}
        if be.inplace_ops is not None:  # whose in-place kernels the buffered steps run
            ops = be.inplace_ops
            info["backends"][name]["kernels"] = getattr(ops, "kernels", ops.name)
    from ..backends._numba import numba_unavailable_reason

    why = numba_unavailable_reason()
    info["numba"] = why if why is not None else _version("numba")
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "num_threads",
                                               "architecture", "filepath")}
                        for d in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    info["env"] = {k: os.environ[k] for k in sorted(os.environ)
                   if k.startswith(("OPENBLAS", "OMP_", "MKL_", "XLA_", "JAX_"))}
    return info


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
