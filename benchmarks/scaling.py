"""``bpcore bench --scaling``: data-parallel scaling efficiency, JAX sharding and MPI.

Strong scaling: one global batch (``mnist`` sizes, 784-256-256-10, batch 1024, SGD) is split
over N workers, and ``Trainer.step`` is timed with ``data_parallel=True``. Efficiency is
throughput with N workers ÷ (N × throughput with one), measured in this one run. JAX: N
devices in one process (``--xla_force_host_platform_device_count=N`` on a CPU, the real
devices on a GPU machine); MPI: ``mpiexec -n N`` ranks of the numpy backend (N = 1 runs without
``mpiexec``). On a CPU the workers share its cores. ``mpi``: each rank gets ``cores / N`` BLAS
threads (``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``; the OpenBLAS kernel settings are left
alone), so the machine's whole compute is split, not multiplied; ``mpi-1thread``: one BLAS
thread per rank, which shows what the split and the Allreduce cost when each rank has a core
of its own. JAX's simulated devices share XLA's one CPU thread pool. A machine with few cores
cannot show a speed-up, only what splitting costs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

SIZES = (784, 256, 256, 10)
BATCH = 1024


def worker(engine: str, dtype: str, seconds: float) -> dict:
    """Time ``Trainer.step`` here (one process of the configuration); rank 0's dict."""
    backend = "jax" if engine == "jax" else "numpy"
    if backend == "jax" and dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    import bpcore

    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, SIZES[0])).astype(dtype)
    y = rng.integers(0, SIZES[-1], BATCH)
    model = bpcore.MLP(list(SIZES), "relu", backend=backend, dtype=dtype, seed=0)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", bpcore.optim.sgd(0.01),
                             data_parallel=True)
    par = trainer.parallel
    comm = getattr(par, "comm", None)  # (MPI's communicator, for its timing barrier)
    if backend == "jax":  # the global batch on the devices once, as a training loop has it
        X = bpcore.backends.get("jax").asarray(X)
        y = bpcore.backends.get("jax").asarray(y)
    for _ in range(3):  # compile, warm up
        float(trainer.step(X, y))
    best, block = float("inf"), 5
    t_end = time.perf_counter() + seconds
    while True:
        if comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(block):
            loss = trainer.step(X, y)
        float(loss)  # waits for the device
        dt = (time.perf_counter() - t0) / block
        if comm is not None:  # the step takes as long as its slowest rank
            dt = comm.allreduce(dt, op=par.MPI.MAX)
        best = min(best, dt)
        stop = time.perf_counter() > t_end
        if comm is not None:
            stop = comm.bcast(stop, root=0)
        if stop:
            break
    return {"engine": engine, "workers": par.size if comm is not None else
            (par.n_devices if par is not None else 1), "dtype": dtype,
            "step_s": best, "samples_per_s": BATCH / best,
            "parallel": par.describe() if par is not None else "one worker",
            "rank": par.rank if comm is not None else 0}


def _run(cmd: list[str], env: dict) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[-6:])} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout)[-800:]}")
    return json.loads(lines[0])


def run(engines: list[str], workers: dict[str, list[int]], dtype: str = "float32",
        seconds: float = 3.0, log=print) -> dict:
    cores = os.cpu_count() or 1
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("PMI_", "OMPI_", "PMIX_", "XLA_FLAGS"))}
    me = [sys.executable, "-m", __package__ + ".scaling" if __package__ else "benchmarks.scaling"]
    rows, skipped = [], {}
    for engine in engines:
        for n in workers[engine]:
            env = dict(base_env)
            if engine == "jax":
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
                cmd = [*me, "--worker", engine, "--dtype", dtype, "--seconds", str(seconds)]
            else:  # "mpi": the cores shared out; "mpi-1thread": one core per rank
                threads = str(1 if engine == "mpi-1thread" else max(1, cores // n))
                env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
                           MKL_NUM_THREADS=threads)
                cmd = [*me, "--worker", "mpi", "--dtype", dtype, "--seconds", str(seconds)]
                if n > 1:
                    mpiexec = (shutil.which("mpiexec", path=os.path.dirname(sys.executable))
                               or shutil.which("mpiexec"))
                    if mpiexec is None:
                        skipped[f"mpi/{n}"] = "no mpiexec (pip install \"bpcore[mpi]\")"
                        continue
                    cmd = [mpiexec, "-n", str(n), *cmd]
            try:
                row = _run(cmd, env)
            except RuntimeError as e:
                skipped[f"{engine}/{n}"] = str(e)
                continue
            row["engine"] = engine
            if engine != "jax":
                row["threads_per_worker"] = int(env["OMP_NUM_THREADS"])
            rows.append(row)
            log(f"{engine:4s} N={n}: {row['step_s'] * 1e3:8.2f} ms/step, "
                f"{row['samples_per_s']:10.0f} samples/s ({row['parallel']})")
    for r in rows:
        one = next((o for o in rows if o["engine"] == r["engine"] and o["workers"] == 1), None)
        if one is not None:
            r["efficiency"] = r["samples_per_s"] / (r["workers"] * one["samples_per_s"])
            r["speedup"] = r["samples_per_s"] / one["samples_per_s"]
    return {"rows": rows, "skipped": skipped, "cores": cores, "dtype": dtype,
            "case": {"sizes": SIZES, "batch": BATCH}}


def markdown(result: dict) -> str:
    lines = ["| engine | workers | ms / step | samples / s | speed-up | efficiency | how |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        how = r["parallel"] + (f", {r['threads_per_worker']} BLAS threads each"
                               if "threads_per_worker" in r else "")
        lines.append(f"| {r['engine']} | {r['workers']} | {r['step_s'] * 1e3:.2f} | "
                     f"{r['samples_per_s']:.0f} | {r.get('speedup', float('nan')):.2f} | "
                     f"{r.get('efficiency', float('nan')):.2f} | {how} |")
    return "\n".join(lines)


def write(result: dict, machine: dict, out: str) -> list[str]:
    from .report import write_side_report

    return write_side_report(result, machine, out, "scaling", "Data-parallel scaling",
                             (__doc__ or "").split("\n", 2)[2].strip(),
                             f"{result['cores']} cores seen.\n\n" + markdown(result))


def main(args: Any, info: dict, gpu: bool = False) -> int:
    dtype = (args.dtypes or "float32").split(",")[0]
    n_jax = [1, 2, 4]
    if gpu:
        try:
            import jax

            n_jax = sorted({1, len(jax.devices())})
        except ImportError:
            pass
    n_mpi = [n for n in (1, 2, 4) if n <= max(2, os.cpu_count() or 1)]
    result = run(["jax", "mpi", "mpi-1thread"],
                 {"jax": n_jax, "mpi": n_mpi, "mpi-1thread": n_mpi}, dtype=dtype)
    paths = write(result, info, args.out)
    print("\n" + markdown(result) + "\n\nwrote " + ", ".join(paths))
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=("jax", "mpi"), required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    out = worker(a.worker, a.dtype, a.seconds)
    if out["rank"] == 0:
        print(json.dumps(out), flush=True)
