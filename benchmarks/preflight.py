"""Preflight of ``benchmarks/gpu_check.sh``: refuse at once, saying why, unless this machine can
run the GPU check for real.

    python -m benchmarks.preflight               # exit 0: go; exit 4: refused (reasons printed)
    python -m benchmarks.preflight --standin cpu # dry run: CPU devices stand in for the GPU

It prints the library versions and devices, then checks that JAX's default device is a GPU,
that PyTorch sees CUDA, and that ``cupy``, ``jax`` and ``torch`` are all in
``bpcore.backends.available()`` with their bpcore backends on the GPU, and runs one small
matrix product on each to prove the device computes. A GPU run that silently fell back to the
CPU (a JAX CUDA plugin that failed to load, a CPU-only torch, a CuPy whose tests all skip)
would otherwise "pass" without testing anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys

REFUSED = 4
GPU_BACKENDS = ("cupy", "jax", "torch")


def versions() -> None:
    for mod in ("numpy", "cupy", "jax", "jaxlib", "torch", "array_api_compat", "pytest",
                "pytest_benchmark", "pytest_timeout", "optax", "sklearn", "bpcore"):
        try:
            v = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # a broken install must be reported, not crash the preflight
            v = f"missing ({type(e).__name__}: {e})"
        print(f"  {mod:18} {v}")


def _matmul_ok(be) -> str | None:
    """None if a small product on ``be`` matches NumPy's, else what went wrong."""
    import numpy as np

    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    try:
        got = be.to_numpy(be.asarray(a) @ be.asarray(a.T))
    except Exception as e:
        return f"a 3x4 matrix product failed on {be.name}: {type(e).__name__}: {e}"
    if not np.allclose(got, a @ a.T, rtol=1e-5):
        return f"a 3x4 matrix product on {be.name} gave a wrong result"
    return None


def check(standin: str | None = None) -> list[str]:
    """Problems that stop the GPU check (empty: go). ``standin="cpu"`` accepts CPU devices."""
    problems: list[str] = []
    try:
        import bpcore
    except Exception as e:
        return [f"bpcore does not import ({type(e).__name__}: {e}); install it with "
                "pip install --no-deps --no-build-isolation -e ."]
    avail = bpcore.backends.available()
    reasons = bpcore.backends.reasons()
    print(f"bpcore {bpcore.__version__}; backends available: {avail}")
    for name, why in reasons.items():
        print(f"  not available: {name}: {why}")
    wanted = [b for b in GPU_BACKENDS if not (standin and b == "cupy")]
    for name in wanted:
        if name not in avail:
            problems.append(f"backend {name!r} is not available: {reasons.get(name, '?')}")
    try:
        import jax

        devs = jax.devices()
        print(f"jax devices: {devs}")
        if devs[0].platform != "gpu" and not standin:
            problems.append(f"JAX's default device is {devs[0]} (platform {devs[0].platform!r}), "
                            "not a GPU: its CUDA plugin is missing or failed to load "
                            "(check jax-cuda*-plugin and the driver)")
    except Exception as e:
        problems.append(f"JAX does not start: {type(e).__name__}: {e}")
    try:
        import torch

        cuda = torch.cuda.is_available()
        print(f"torch {torch.__version__}: cuda available: {cuda}"
              + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
        if not cuda and not standin:
            problems.append(f"PyTorch {torch.__version__} sees no CUDA device (a CPU-only build, "
                            "or no driver)")
    except Exception as e:
        problems.append(f"PyTorch does not import: {type(e).__name__}: {e}")
    for name in wanted:
        if name not in avail:
            continue
        be = bpcore.backends.get(name)
        print(f"bpcore backend {name}: device {be.device}, DLPack device {be.dlpack_device}")
        if be.dlpack_device[0] == 1 and not standin:
            problems.append(f"bpcore's {name} backend is on the CPU ({be.device}), not a GPU")
        bad = _matmul_ok(be)
        if bad:
            problems.append(bad)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--standin", choices=["cpu"], default=None,
                   help="dry run: accept CPU devices in place of the GPU")
    args = p.parse_args(argv)
    print("versions:")
    versions()
    problems = check(args.standin)
    if problems:
        print(f"PREFLIGHT REFUSED: this machine cannot run the GPU check ({len(problems)} "
              "problems):")
        for msg in problems:
            print(f"  - {msg}")
        return REFUSED
    print("preflight: ok" + (" (CPU stand-in, dry run)" if args.standin else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
