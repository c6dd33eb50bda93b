"""Run the suite: plan the measurements, time each (bpcore, its GEMM floor, the peers), and
add the ratios. Writing the results is :mod:`benchmarks.report`'s."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .cases import CASES, SWEEP_BATCHES_FULL, SWEEP_BATCHES_GPU, SWEEP_BATCHES_QUICK, Case
from .impls import KINDS, PEERS, Unavailable, bpcore_runner, floor_parts, peer_runner
from .timing import measure

PROFILES = {
    "quick": {"cases": ("small", "mnist", "large"), "dtypes": ("float32",), "kinds": KINDS,
              "fit": True,
              "peers": PEERS, "sweep": SWEEP_BATCHES_QUICK, "blocks": 5, "block_s": 0.06},
    "full": {"cases": ("small", "mnist", "large"), "dtypes": ("float32", "float64"),
             "kinds": KINDS, "fit": True, "peers": PEERS, "sweep": SWEEP_BATCHES_FULL, "blocks": 5,
             "block_s": 0.25},
    # One GPU run is rare and short: training steps only, the cases in the order of what they
    # decide (launch-bound small and mnist, GEMM-bound wide), the batch sweep last.
    "gpu": {"cases": ("small", "mnist", "wide", "large"), "dtypes": ("float32",),
            "kinds": ("sgd", "adam"), "peers": ("torch", "jax"), "sweep": SWEEP_BATCHES_GPU,
            "blocks": 5, "block_s": 0.05},
}


# Set by the CLI's signal handler: a stop request that survives a KeyboardInterrupt
# swallowed inside a finalizer.
STOP = threading.Event()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# bpcore's rows: "step" (Trainer.step), "bpcore" (step_prepared, or forward/fit/...) and
# "generic" (step_prepared of Trainer(inplace=False), with --generic).
BPCORE_IMPLS = ("bpcore", "step", "generic")
# Backends with a buffered executor, where the generic step is a different path.
BUFFERED_BACKENDS = ("numpy", "torch", "cupy")


@dataclass(frozen=True)
class Task:
    """One measurement: ``impl`` (bpcore, floor or peer) on ``backend`` doing ``kind``."""

    case: Case
    dtype: str
    impl: str
    backend: str
    kind: str

    @property
    def key(self) -> str:
        return f"{self.case.name}/{self.dtype}/{self.impl}/{self.backend}/{self.kind}"

    def build(self, gpu: bool):
        if self.impl == "floor":
            return floor_parts(self.backend, self.case, self.dtype)
        if self.impl in BPCORE_IMPLS:
            return bpcore_runner(self.backend, self.kind, self.case, self.dtype,
                                 path={"step": "step", "generic": "generic"}.get(
                                     self.impl, "prepared"))
        return peer_runner(self.backend, self.kind, self.case, self.dtype, gpu)


def plan(backends: Iterable[str], profile: str = "quick", gpu: bool = False,
         cases: Iterable[str] | None = None, sweep: bool = True,
         dtypes: Iterable[str] | None = None, generic: bool = False) -> list[Task]:
    """Every measurement of a run, in the order they are taken (most telling first)."""
    prof = PROFILES[profile]
    case_names = list(cases or prof["cases"])
    if gpu and cases is None and "wide" not in case_names:
        case_names.append("wide")
    dtypes = tuple(dtypes) if dtypes else ("float32",) if gpu else prof["dtypes"]
    backends = list(backends)
    tasks = []
    for name in case_names:
        case = CASES[name]
        if case.gpu_only and not gpu:
            continue
        for dtype in dtypes:
            for be in backends:
                tasks.append(Task(case, dtype, "floor", be, "floor"))
                tasks += [Task(case, dtype, "step", be, kind) for kind in prof["kinds"]
                          if kind in ("sgd", "adam")]
                tasks += [Task(case, dtype, "bpcore", be, kind) for kind in prof["kinds"]]
                if generic and be in BUFFERED_BACKENDS:
                    tasks += [Task(case, dtype, "generic", be, kind) for kind in prof["kinds"]
                              if kind in ("sgd", "adam")]
                if prof.get("fit"):
                    tasks.append(Task(case, dtype, "bpcore", be, "fit"))
                # the floor again, after the steps: on a shared machine the load can change
                # within a case, and the faster of the two is the floor used (a GPU is not
                # shared, and its run is short)
                if not gpu:
                    tasks.append(Task(case, dtype, "floor", be, "floor-again"))
            tasks += [Task(case, dtype, "peer", peer, kind)
                      for peer in prof["peers"] for kind in prof["kinds"]]
    if sweep:
        for batch in prof["sweep"]:
            case = CASES["mnist"].with_batch(batch)
            for be in backends:
                tasks += [Task(case, "float32", "floor", be, "floor"),
                          Task(case, "float32", "bpcore", be, "sgd")]
            tasks += [Task(case, "float32", "peer", peer, "sgd")
                      for peer in ("torch", "jax") if peer in prof["peers"]]
    return tasks


def run_suite(backends: Iterable[str], profile: str = "quick", gpu: bool = False,
              cases: Iterable[str] | None = None, sweep: bool = True, *,
              max_seconds: float | None = None,
              on_progress: Callable[[dict], None] | None = None,
              dtypes: Iterable[str] | None = None, generic: bool = False,
              smoke: bool = False) -> dict:
    """Take every measurement of :func:`plan`, as many as time and the user allow.

    ``smoke``: each measurement in two blocks of a few calls (:data:`SMOKE_TIMING`): the run
    proves the suite and its report work end to end (the tests, the GPU check's dry run);
    its figures are not for reading, and the report says so.

    Stops early, keeping what it measured, on ``KeyboardInterrupt`` (Ctrl-C, or SIGINT /
    SIGTERM from a time limit: ``status`` "interrupted") or once ``max_seconds`` have passed
    (``status`` "out of time"); ``missing`` then lists what was not measured. A measurement
    that raises is recorded under ``failed`` and the run goes on. ``on_progress`` receives the
    partial result after every measurement (the CLI saves it, so even a hard kill leaves data).
    """
    prof = PROFILES[profile]
    timing = (SMOKE_TIMING if smoke else
              {"blocks": prof["blocks"], "block_s": prof["block_s"]})
    tasks = plan(backends, profile, gpu, cases, sweep, dtypes, generic)
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    t_start = time.perf_counter()
    status, done = "complete", 0

    def result() -> dict:
        return {"rows": add_ratios([dict(r) for r in rows]), "skipped": skipped,
                "failed": failed, "missing": [t.key for t in tasks[done:]], "status": status,
                "planned": len(tasks), "wall_s": time.perf_counter() - t_start,
                "profile": profile, "gpu": gpu, "smoke": smoke}

    try:
        for task in tasks:
            if STOP.is_set():
                raise KeyboardInterrupt("stop requested")
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                status = "out of time"
                _log(f"time budget of {max_seconds:.0f}s spent: {len(tasks) - done} of "
                     f"{len(tasks)} measurements not taken")
                break
            _measure_one(task, gpu, timing, rows, skipped, failed, floor_rounds=1 if smoke else 2)
            done += 1
            if on_progress is not None:
                on_progress(result())
    except KeyboardInterrupt:
        status = "interrupted"
        _log(f"interrupted: {len(tasks) - done} of {len(tasks)} measurements not taken")
    return result()


def _measure_one(task: Task, gpu: bool, timing: dict, rows: list, skipped: dict,
                 failed: dict, floor_rounds: int = 2) -> None:
    t0 = time.perf_counter()
    try:
        runner = task.build(gpu)
        build_s = time.perf_counter() - t0
        if task.impl == "floor":
            from .impls import _backend

            m = measure_floor(*runner, timing, rounds=floor_rounds,
                              flops=task.case.gemm_flops(),
                              compiles=_backend(task.backend, task.dtype).compiles)
        else:
            m = measure(runner, **timing)
        if getattr(runner, "memory", None) is not None:
            m.update(runner.memory())
    except Unavailable as e:
        skipped[task.key] = str(e)
        return
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # a broken case must not cost the rest of a rare GPU run
        failed[task.key] = f"{type(e).__name__}: {e}"
        _log(f"  FAILED {task.key}: {failed[task.key]}")
        return
    case = task.case
    rows.append({"case": case.name, "sizes": list(case.sizes), "batch": case.batch,
                 "dtype": task.dtype, "impl": task.impl, "backend": task.backend,
                 "kind": task.kind, "gemm_flops": case.gemm_flops(), **m,
                 "build_s": build_s, "total_s": time.perf_counter() - t0})
    _log(f"  {case.name:<12} {task.dtype:<8} {task.impl:<8} {task.backend:<10} "
         f"{task.kind:<15} {m['time_s'] * 1e3:9.3f} ms   (built in {build_s:.1f}s, "
         f"{time.perf_counter() - t0:.1f}s in all)")

# --smoke: two blocks of a few calls each, no settling time (figures not for reading).
SMOKE_TIMING = {"blocks": 2, "block_s": 0.002, "warmup": 1, "warmup_s": 0.0}


def measure_floor(parts: list, peak: Any, sequence: Any, timing: dict, rounds: int = 2, *,
                  compiles: bool = False, flops: int = 0) -> dict:
    """The floor from :func:`~benchmarks.impls.floor_parts`: the products' best times summed
    (a step that runs them one by one), or, where the backend compiles the step
    (``compiles``), the step's ``flops`` at the best rate measured on the backend.

    Each part is timed in ``rounds`` separate rounds and its fastest block kept: a floor must
    not be inflated by a moment of noise (it would stop being a lower bound). ``sequence``
    (or None): the same products back to back, timed alike and reported beside the floor
    (``floor_sequence_s``), not as it.
    """
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, r, _ in [*parts, *([("sequence", sequence, 0)] if sequence else [])]:
            t = measure(r, **timing)
            if name not in best or t["time_s"] < best[name]["time_s"]:
                best[name] = t
    sequence_t = best.pop("sequence", None)
    part_flops = {name: f for name, _, f in parts}
    peak_s = _peak_time(peak, timing)
    from .impls import PEAK_N

    peak_gflops = 2 * PEAK_N ** 3 / peak_s / 1e9
    best_rate = max([peak_gflops] + [part_flops[n] / t["time_s"] / 1e9 for n, t in best.items()])
    sum_s = sum(t["time_s"] for t in best.values())
    at_peak_s = flops / (best_rate * 1e9)
    total = at_peak_s if compiles else sum_s
    fwd = [n for n in best if n.endswith("Y@W.T")]
    forward_s = (sum(part_flops[n] for n in fwd) / (best_rate * 1e9) if compiles else
                 sum(best[n]["time_s"] for n in fwd))
    return {"time_s": total, "median_s": total,
            "spread": max(t["spread"] for t in best.values()),
            "floor_method": "FLOPs at the best rate" if compiles else "sum of products",
            "floor_sum_products_s": sum_s, "floor_at_peak_s": at_peak_s,
            "floor_forward_s": forward_s,
            "floor_sequence_s": sequence_t["time_s"] if sequence_t else None,
            "calls_per_block": min(t["calls_per_block"] for t in best.values()),
            "blocks": timing["blocks"],
            "products_s": {name: t["time_s"] for name, t in best.items()},
            "peak_gflops": peak_gflops, "best_gemm_gflops": best_rate}


_PEAKS: dict[str, float] = {}


def _peak_time(peak: Any, timing: dict) -> float:
    """The peak product's best time, measured once per backend and dtype in a process."""
    key = peak.label  # "peak/<backend>/<dtype>" (an id() could be reused by a new runner)
    if key not in _PEAKS:
        _PEAKS[key] = min(measure(peak, warmup=1, blocks=3, block_s=0.05,
                                  warmup_s=0.05)["time_s"] for _ in range(2))
    return _PEAKS[key]


def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio_to_floor (same backend, case, dtype) and ratio_to_best_peer (same kind)."""
    floor: dict = {}
    for r in rows:  # the faster of a case's two floor measurements
        if r["impl"] == "floor":
            k = (r["case"], r["dtype"], r["backend"])
            if k not in floor or r["time_s"] < floor[k]["time_s"]:
                floor[k] = r
    best_peer: dict = {}
    for r in rows:
        if r["impl"] == "peer":
            k = (r["case"], r["dtype"], r["kind"])
            if k not in best_peer or r["time_s"] < best_peer[k][0]:
                best_peer[k] = (r["time_s"], r["backend"])
    peer_times = {(r["case"], r["dtype"], r["kind"], r["backend"]): r["time_s"]
                  for r in rows if r["impl"] == "peer"}
    for r in rows:
        if r["impl"] == "floor":
            r["gflops"] = r["gemm_flops"] / r["time_s"] / 1e9
            continue
        fr = floor.get((r["case"], r["dtype"], r["backend"]))
        if r["impl"] in BPCORE_IMPLS and fr:
            # the forward pass has its own floor: the forward products alone
            f = fr["floor_forward_s"] if r["kind"] == "forward" else fr["time_s"]
            r["ratio_to_floor"] = r["time_s"] / f
            r["gflops"] = r["gemm_flops"] / r["time_s"] / 1e9
        bp = best_peer.get((r["case"], r["dtype"], r["kind"]))
        if bp:
            r["ratio_to_best_peer"] = r["time_s"] / bp[0]
            r["best_peer"] = bp[1]
        if r["kind"] == "fit":  # fit per batch over the user's own SGD step
            st = [q["time_s"] for q in rows if q["impl"] == "step" and q["kind"] == "sgd" and
                  (q["case"], q["dtype"], q["backend"]) == (r["case"], r["dtype"], r["backend"])]
            if st:
                r["ratio_to_step"] = r["time_s"] / st[0]
        if r["impl"] != "peer":
            r["ratio_to_peers"] = {peer: r["time_s"] / t for (c, d, k, peer), t in
                                   peer_times.items()
                                   if (c, d, k) == (r["case"], r["dtype"], r["kind"])}
    return rows
