"""``python -m benchmarks`` / ``bpcore bench``: run the suite and write the report."""

from __future__ import annotations

import argparse
import sys


def machine(gpu: bool) -> dict:
    from bpcore.cli import machine_info

    info = machine_info()
    libs = {}
    for mod in ("numpy", "jax", "jaxlib", "torch", "sklearn", "cupy", "array_api_compat",
                "optax"):
        try:
            libs[mod] = __import__(mod).__version__
        except Exception:
            pass
    info["libraries"] = libs
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if gpu and "gpu" not in info:
        try:
            import cupy

            info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception:
            pass
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bpcore bench", description=__doc__)
    p.add_argument("--full", action="store_true",
                   help="all cases in float32 and float64, the full batch sweep, longer timing")
    p.add_argument("--gpu", action="store_true",
                   help="GPU profile: the wide case too, float32, GPU peers")
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: every available except array_api_strict)")
    p.add_argument("--cases", default=None, help="comma-separated subset of small,mnist,large,wide")
    p.add_argument("--no-sweep", action="store_true", help="skip the batch-size sweep")
    p.add_argument("--out", default="results", help="folder for JSON, Markdown and PNGs")
    args = p.parse_args(argv)

    try:
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 set; float32 stays float32
    except ImportError:
        pass
    import bpcore

    from .report import markdown_table, run_suite, write_report

    if args.backends:
        backends = args.backends.split(",")
        unknown = [b for b in backends if b not in bpcore.backends.names()]
        if unknown:
            p.error(f"unknown backends {unknown}; known: {bpcore.backends.names()}")
    else:  # array_api_strict is a correctness check, far too slow to time usefully
        backends = [b for b in bpcore.backends.available() if b != "array_api_strict"]
    if args.gpu:
        backends = [b for b in backends if b != "numpy"]
    cases = args.cases.split(",") if args.cases else None
    from .cases import CASES

    if cases and any(c not in CASES for c in cases):
        p.error(f"unknown cases {[c for c in cases if c not in CASES]}; known: {list(CASES)}")
    result = run_suite(backends, "full" if args.full else "quick", gpu=args.gpu, cases=cases,
                       sweep=not args.no_sweep)
    info = machine(args.gpu)
    paths = write_report(result, info, args.out)
    print(markdown_table(result["rows"]))
    print(f"\n{len(result['rows'])} measurements in {result['wall_s']:.0f}s; wrote "
          + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
