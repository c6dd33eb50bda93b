"""``python -m benchmarks`` / ``bpcore bench``: run the suite and write the report.

Exit status: 0 every planned measurement was taken; 1 some measurements failed (listed in the
report); 2 the ``--max-seconds`` budget ran out first; 130 interrupted (Ctrl-C, SIGINT or
SIGTERM). In every case the report is written with what was measured, and says what is
missing; ``results.json`` is also rewritten after every measurement, so even a hard kill
leaves the figures taken so far.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

PRECISIONS = ("highest", "tf32")


def set_matmul_precision(mode: str) -> dict:
    """float32 matrix products at the same precision in every library; returns what is set.

    ``highest``: full FP32 everywhere (JAX's default on recent NVIDIA GPUs is TF32, while
    CuPy and PyTorch default to FP32, so without this the floors and peer ratios would
    compare unlike arithmetic). ``tf32``: TensorFloat-32 everywhere, as a labelled option.
    Must run before CuPy is imported (CuPy reads ``CUPY_TF32`` once, at import).
    """
    tf32 = mode == "tf32"
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"
    out = {"mode": mode, "cupy": "TF32" if tf32 else "FP32 (CUPY_TF32=0)"}
    if "cupy" in sys.modules:
        out["cupy"] += " [cupy was imported first: CuPy's own setting applies]"
    try:
        import jax

        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
        out["jax"] = jax.config.jax_default_matmul_precision
    except ImportError:
        pass
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        out["torch"] = "TF32" if torch.backends.cuda.matmul.allow_tf32 else "FP32"
    except ImportError:
        pass
    return out


def source() -> dict:
    """Which code is measured: the git commit and whether the tree was clean. Where the
    checkout has no ``.git`` (a copy sent to a GPU machine), ``BPCORE_GIT_COMMIT`` says it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                 timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        given = os.environ.get("BPCORE_GIT_COMMIT")
        return {"commit": given or "unknown (no git checkout, no BPCORE_GIT_COMMIT)",
                "tree_clean": None, "commit_from": "BPCORE_GIT_COMMIT" if given else None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "tree_clean": status == "", "commit_from": "git"}


def machine(gpu: bool) -> dict:
    from bpcore.cli.machine import machine_info

    info = machine_info()
    info["source"] = source()
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


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``timeout``'s default signal) and SIGINT stop the run: report written.

    The handler raises KeyboardInterrupt, and also sets :data:`suite.STOP`: Python swallows
    an exception raised while a finalizer runs (JAX's GC callback, say: "Exception ignored
    in ..."), and the flag then stops the run at the next measurement instead.
    """
    from .suite import STOP

    STOP.clear()

    def handler(signum, frame):
        STOP.set()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


OPENBLAS_KERNEL_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bpcore bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="all cases in float32 and float64, the full batch sweep, longer timing")
    p.add_argument("--gpu", action="store_true",
                   help="GPU profile: training steps on small, mnist, wide and large, "
                        "float32, GPU peers (torch on CUDA, jax.grad), a short batch sweep")
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: every available except array_api_strict)")
    p.add_argument("--cases", default=None, help="comma-separated subset of small,mnist,large,wide")
    p.add_argument("--no-sweep", action="store_true", help="skip the batch-size sweep")
    p.add_argument("--smoke", action="store_true",
                   help="every measurement in two short blocks: checks that the suite and "
                        "its report run end to end (the figures are not for reading)")
    p.add_argument("--generic", action="store_true",
                   help="also time the generic step (Trainer(inplace=False)) beside the "
                        "buffered executors, on the backends that have them (numpy, torch, "
                        "cupy): the same step, the same run, before and after")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated subset of float32,float64 (default: the profile's)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="take no new measurement after this many seconds; the report then "
                        "lists what is missing (exit status 2)")
    p.add_argument("--matmul-precision", choices=PRECISIONS, default="highest",
                   help="float32 matrix products in every library: full FP32 (default) or "
                        "TF32 (NVIDIA GPUs only; labelled in the report)")
    p.add_argument("--openblas-env", choices=("keep", "unset", "both"), default="keep",
                   help="OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (which pick OpenBLAS's kernel): "
                        "keep this shell's (default), unset them for this run, or both: this "
                        "run as is, then a second one without them into OUT/openblas-env-unset")
    p.add_argument("--estimators", action="store_true",
                   help="instead of the step suite: fit time of bpcore.sklearn's MLPClassifier/"
                        "MLPRegressor against scikit-learn's, per backend (cases: "
                        "digits-adam, mnist-adam, regression-sgd, digits-lbfgs; dtypes "
                        "float32,float64 unless --dtypes)")
    p.add_argument("--scaling", action="store_true",
                   help="instead of the step suite: data-parallel scaling efficiency of "
                        "Trainer.step with data_parallel=True, JAX sharding over 1/2/4 devices "
                        "and numpy over mpiexec -n 1/2 (writes scaling.md/json)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--estimators: timed fits per implementation (the fastest counts)")
    p.add_argument("--out", default="results", help="folder for JSON, Markdown and PNGs")
    args = p.parse_args(argv)
    if args.openblas_env != "keep":
        # OpenBLAS reads these once, when it loads: the run without them is a new process.
        argv = list(sys.argv[1:] if argv is None else argv)
        env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_KERNEL_VARS}
        child = [sys.executable, "-m", __package__ or "benchmarks", *_without_option(argv, "--openblas-env")]
        if args.openblas_env == "unset":
            return subprocess.call(child, env=env)
        status = main(_without_option(argv, "--openblas-env"))
        out2 = os.path.join(args.out, "openblas-env-unset")
        print(f"\nsecond run, OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset, into {out2}",
              file=sys.stderr)
        status2 = subprocess.call(_without_option(child, "--out") + ["--out", out2], env=env)
        return max(status, status2)
    if args.max_seconds is not None and args.max_seconds <= 0:
        p.error(f"--max-seconds: expected a positive number, got {args.max_seconds}")

    precision = set_matmul_precision(args.matmul_precision)  # before anything imports CuPy
    try:
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 set; float32 stays float32
    except ImportError:
        pass
    import bpcore

    if args.backends:
        backends = args.backends.split(",")
        unknown = [b for b in backends if b not in bpcore.backends.names()]
        if unknown:
            p.error(f"unknown backends {unknown}; known: {bpcore.backends.names()}")
    else:  # array_api_strict is a correctness check, far too slow to time usefully
        backends = [b for b in bpcore.backends.available() if b != "array_api_strict"]
    if args.gpu:
        backends = [b for b in backends if b != "numpy"]
    if args.smoke and (args.scaling or args.estimators):
        p.error("--smoke shortens the step suite's timing; --estimators and --scaling time "
                "whole fits and runs (make them short with their own options: --rounds 1, "
                "--cases)")
    if args.scaling:
        from . import scaling

        return scaling.main(args, machine(args.gpu), gpu=args.gpu)
    if args.estimators:
        from . import estimators

        backends = [b for b in backends if b != "array_api_strict"]
        return estimators.main(args, backends, machine(args.gpu))
    cases = args.cases.split(",") if args.cases else None
    from .cases import CASES

    if cases and any(c not in CASES for c in cases):
        p.error(f"unknown cases {[c for c in cases if c not in CASES]}; known: {list(CASES)}")
    dtypes = args.dtypes.split(",") if args.dtypes else None
    if dtypes and any(d not in ("float32", "float64") for d in dtypes):
        p.error(f"--dtypes: expected float32 and/or float64, got {args.dtypes}")
    info = machine(args.gpu)
    info["matmul_precision"] = precision
    profile = "full" if args.full else ("gpu" if args.gpu else "quick")
    prev = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _interrupt_on_sigterm()
    try:
        return _run_and_report(args, backends, profile, cases, dtypes, info)
    finally:  # the caller's handlers back (main also runs in-process, under tests)
        signal.signal(signal.SIGINT, prev[0])
        signal.signal(signal.SIGTERM, prev[1])


def _run_and_report(args, backends, profile, cases, dtypes, info) -> int:
    from .report import below_floor, markdown_table, noise_warning, write_json, write_report
    from .suite import run_suite

    result = run_suite(backends, profile, gpu=args.gpu, cases=cases, sweep=not args.no_sweep,
                       max_seconds=args.max_seconds, dtypes=dtypes, generic=args.generic,
                       smoke=args.smoke,
                       on_progress=lambda partial: write_json(partial, info, args.out))
    # A second Ctrl-C while the report is written would lose it: hold signals until done.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM,
                                                                      signal.SIG_IGN)
    try:
        paths = write_report(result, info, args.out)
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
    print(markdown_table(result["rows"]))
    if noise_warning(result["rows"]):
        print("\n" + noise_warning(result["rows"]), file=sys.stderr)
    if below_floor(result["rows"]):
        print("\nWARNING: faster than the floor (not a result): "
              + "; ".join(below_floor(result["rows"])), file=sys.stderr)
    print(f"\n{len(result['rows'])} measurements in {result['wall_s']:.0f}s "
          f"({result['status']}; {len(result['missing'])} not taken, "
          f"{len(result['failed'])} failed); wrote " + ", ".join(paths))
    if result["status"] == "interrupted":
        return 130
    if result["status"] != "complete":
        return 2
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
