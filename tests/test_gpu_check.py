"""The GPU check's own logic, on the CPU: `benchmarks/gpu_check.sh --dry-run` and the benchmark
runner it drives. A GPU machine is rare and its time short; what can go wrong in the script
(refusals, time limits, interrupts, partial reports, exit codes) is tested here instead.

Each run is narrowed (one or two tests of one file, one case, one backend, `--smoke` timing
where nothing is interrupted) to keep CI short; what is checked is the script's behaviour,
not the figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks import report, suite
from benchmarks.cases import CASES
from benchmarks.suite import plan, run_suite

from .conftest import sigint_not_ignored

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
NARROW = {"GPU_CHECK_TEST_K": "cross_backend_agreement and sgd",
          "GPU_CHECK_TEST_PATHS": "tests/test_training.py",
          "GPU_CHECK_BENCH_ARGS": "--cases small --no-sweep --backends numpy --smoke"}


def _env(tmp_path, smi_answers=False, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPU_CHECK_", "BPCORE_", "PYTEST_"))}
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    # A stand-in nvidia-smi, so that a real one on this machine changes nothing: by default it
    # fails as it does without a GPU; smi_answers makes it list a (fake) GPU.
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n" if smi_answers else
                   "#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices' >&2\nexit 9\n")
    smi.chmod(0o755)
    env.update(PATH=f"{fake_bin}{os.pathsep}{os.path.dirname(sys.executable)}"
                    f"{os.pathsep}{env.get('PATH', '')}",
               PYTHON=sys.executable, OUT=str(tmp_path / "out"), **extra)
    return env


@pytest.fixture(autouse=True)
def _children_can_be_interrupted():
    """A test run started as a background job of a shell has SIGINT ignored, every child
    inherits that, and a shell cannot trap a signal ignored at its start: the script's
    limits and Ctrl-C, which these tests check, would never reach their phases. So SIGINT
    has Python's handler here meanwhile (a child starts with the default: handlers are reset
    on exec, an ignored signal is not). (Not a preexec_fn: it forks, and JAX warns of that.)"""
    with sigint_not_ignored():
        yield


def _run(tmp_path, *args, smi_answers=False, **extra):
    proc = subprocess.run(["bash", str(SCRIPT), *args],
                          env=_env(tmp_path, smi_answers, **extra),
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, tmp_path / "out"


def _xml_counts(path):
    s = ET.parse(path).getroot().find("testsuite").attrib
    return {k: int(s[k]) for k in ("tests", "failures", "errors", "skipped")}


def test_refuses_at_once_without_a_gpu(tmp_path):
    rc, out, outdir = _run(tmp_path)
    assert rc == 4, out
    assert "PREFLIGHT REFUSED: no NVIDIA GPU here" in out and "--dry-run" in out
    assert "versions:" not in out and "== tests" not in out  # refused before starting Python
    assert "PREFLIGHT REFUSED" in (outdir / "gpu_check.log").read_text()


def test_preflight_refuses_a_gpu_that_the_libraries_do_not_use(tmp_path):
    """nvidia-smi answers, but JAX and torch are on the CPU and CuPy is missing: refused."""
    rc, out, _ = _run(tmp_path, smi_answers=True, GPU_CHECK_SKIP_INSTALL="1")
    assert rc == 4, out
    assert "GPU 0: Stand-in" in out
    assert "PREFLIGHT REFUSED: this machine cannot run the GPU check" in out
    assert "backend 'cupy' is not available" in out
    assert "== tests" not in out
    from benchmarks.preflight import check

    assert any("cupy" in p for p in check())
    assert not any("cupy" in p for p in check("cpu"))  # the dry run does without CuPy


def test_dry_run_passes_and_writes_every_report(tmp_path):
    rc, out, outdir = _run(tmp_path, "--dry-run", **NARROW)
    assert rc == 0, out
    assert "DRY RUN" in out and "preflight: ok (CPU stand-in, dry run)" in out
    assert "== tests: PASSED" in out and "== benchmark: COMPLETE" in out
    counts = _xml_counts(outdir / "gpu_tests.xml")
    assert counts["tests"] >= 1 and counts["failures"] == counts["errors"] == 0
    data = json.loads((outdir / "bench" / "results.json").read_text())
    assert data["status"] == "complete" and data["missing"] == [] and data["rows"]
    assert data["machine"]["matmul_precision"]["mode"] == "highest"
    md = (outdir / "bench" / "results.md").read_text()
    assert "Partial report" not in md and "| small | numpy |" in md
    assert (outdir / "gpu_check.log").read_text().rstrip().endswith(
        out.rstrip().splitlines()[-1])


# (The script's partial benchmark report is checked in the default run by the limit test
# below, a stop by its 2 s limit; a stop by Ctrl-C at the bench level by
# test_bpcore_bench_interrupted_writes_a_partial_report. This is the same path, by SIGINT.)
@pytest.mark.extended
def test_sigint_mid_benchmark_leaves_a_partial_report(tmp_path):
    env = _env(tmp_path, GPU_CHECK_TEST_K=NARROW["GPU_CHECK_TEST_K"],
               GPU_CHECK_TEST_PATHS=NARROW["GPU_CHECK_TEST_PATHS"],
               GPU_CHECK_BENCH_ARGS="--cases small,mnist --backends numpy")
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "out" / "gpu_check.log"
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
    while "floor    numpy" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, \
            log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out  # tests passed; benchmark incomplete
    assert "SIGINT received" in out and "== benchmark: PARTIAL" in out
    data = json.loads((tmp_path / "out" / "bench" / "results.json").read_text())
    assert data["status"] == "interrupted" and data["missing"]
    assert len(data["rows"]) + len(data["missing"]) + len(data["skipped"]) == data["planned"]
    md = (tmp_path / "out" / "bench" / "results.md").read_text()
    assert "**Partial report (interrupted)**" in md and data["missing"][-1] in md


SLEEPER = "BPCORE_TEST_SLEEP_UNTIL_STOPPED"


@pytest.mark.gpu
def test_sleeps_until_stopped():
    """A stand-in for a test that outlasts the GPU check's test limit (only when the limit's
    own test below asks for it): the limit is then reached whatever the machine's speed."""
    if os.environ.get(SLEEPER) != "1":
        pytest.skip(f"runs only inside the test-limit check ({SLEEPER}=1)")
    time.sleep(3600)


def test_test_phase_stopped_at_its_limit_keeps_its_reports(tmp_path):
    # Independent of the machine's speed: the phase's limit is derived from how long
    # collecting the same selection takes here now (a busy machine gets a longer limit), and
    # the selection holds a test that sleeps until it is stopped, so the limit is always hit
    # after collection, never before it. The benchmark phase is stopped by its own limit
    # (2 s: while it starts), so both phases' limits are checked in one run.
    k = "sleeps_until_stopped or two_spirals"
    paths = "tests/test_gpu_check.py tests/test_training.py"
    env = _env(tmp_path, BPCORE_TESTS="gpu", **{SLEEPER: "1"})
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pytest", *paths.split(), "--collect-only", "-q",
                    "-p", "no:cacheprovider", "-k", k], cwd=ROOT, env=env,
                   capture_output=True, text=True)
    limit = int(max(10.0, 3 * (time.monotonic() - t0) + 5))
    rc, out, outdir = _run(tmp_path, "--dry-run", GPU_CHECK_TEST_LIMIT=str(limit),
                           GPU_CHECK_TEST_K=k, GPU_CHECK_TEST_PATHS=paths,
                           GPU_CHECK_BENCH_ARGS=NARROW["GPU_CHECK_BENCH_ARGS"],
                           GPU_CHECK_BENCH_LIMIT="2", **{SLEEPER: "1"})
    assert rc == 3, out  # tests incomplete; benchmark incomplete
    assert f"== tests: STOPPED at the {limit}s limit" in out and "KeyboardInterrupt" in out
    assert "== benchmark: PARTIAL, stopped by a signal or the 2s limit" in out
    # pytest wrote its XML on the way out (the sleeper, stopped, is not among the tests it
    # counts: none may have finished, but a missing or torn XML is a failure)
    counts = _xml_counts(outdir / "gpu_tests.xml")
    assert counts["failures"] + counts["errors"] <= counts["tests"]
    assert "== tests ran:" in out and "selected)" in out


def test_bad_argument_is_refused(tmp_path):
    rc, out, _ = _run(tmp_path, "--gpu-please")
    assert rc == 64 and "usage:" in out


# ---- the benchmark runner under the script ---------------------------------------------------
def _bench(tmp_path, *args, entry=("benchmarks",)):
    return subprocess.Popen([sys.executable, "-m", *entry, "--no-sweep", "--backends",
                             "numpy", "--out", str(tmp_path), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# `bpcore bench` (the installed command) and `python -m benchmarks` are the same code path.
@pytest.mark.extended(cases=["15-entry1"])
@pytest.mark.parametrize("sig,entry", [(signal.SIGINT, ("bpcore", "bench")),
                                       (signal.SIGTERM, ("benchmarks",))])
def test_bpcore_bench_interrupted_writes_a_partial_report(tmp_path, sig, entry):
    proc = _bench(tmp_path, "--cases", "small,mnist", entry=entry)
    seen = ""
    for line in proc.stdout:  # wait for the first measurement, then interrupt
        seen += line
        if "floor    numpy" in line:
            break
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "interrupted" and data["missing"] and data["rows"]
    assert "Partial report (interrupted)" in (tmp_path / "results.md").read_text()


def test_bpcore_bench_time_budget(tmp_path):
    proc = _bench(tmp_path, "--cases", "small,mnist", "--max-seconds", "0.001", "--smoke")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "out of time" and len(data["rows"]) == 1 and data["missing"]
    assert "Partial report (out of time)" in (tmp_path / "results.md").read_text()


def test_a_failing_measurement_is_recorded_and_the_run_goes_on(monkeypatch):
    real = suite.bpcore_runner

    def flaky(backend, kind, case, dtype, path="prepared"):
        if kind == "adam" and path == "prepared":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(backend, kind, case, dtype, path=path)

    monkeypatch.setattr(suite, "bpcore_runner", flaky)
    result = run_suite(["numpy"], cases=["small"], sweep=False, smoke=True)
    assert result["status"] == "complete" and result["missing"] == []
    assert list(result["failed"]) == ["small/float32/bpcore/numpy/adam"]
    assert "illegal memory access" in result["failed"]["small/float32/bpcore/numpy/adam"]
    kinds = {r["kind"] for r in result["rows"] if r["impl"] == "bpcore"}
    assert kinds == {"sgd", "forward", "value_and_grad", "fit"}
    assert "measurements failed" in report.status_section(result)


def test_gpu_profile_plan():
    tasks = plan(["cupy", "jax", "torch"], "gpu", gpu=True)
    keys = [t.key for t in tasks]
    assert keys[0] == "small/float32/floor/cupy/floor"
    assert {t.case.name for t in tasks if "@" not in t.case.name} == {"small", "mnist", "wide",
                                                                      "large"}
    assert {t.kind for t in tasks} == {"floor", "sgd", "adam"}
    assert not any(t.backend == "sklearn" for t in tasks)
    first_sweep = next(i for i, t in enumerate(tasks) if "@" in t.case.name)
    assert all("@" in t.case.name for t in tasks[first_sweep:])  # the sweep comes last
    assert len(keys) == len(set(keys))
    assert "wide" not in {t.case.name for t in plan(["numpy"], "quick")}
    assert CASES["wide"].gpu_only


# ---- the GPU test selection --------------------------------------------------------------------
def _collect(env_value, *args, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPCORE_")}
    env["BPCORE_TESTS"] = env_value
    if tmp_path is not None:  # and a plugin that lists each selected test with its markers
        (tmp_path / "list_marks.py").write_text(
            "import os\n"
            "def pytest_collection_finish(session):\n"
            "    with open(os.environ['LIST_MARKS_TO'], 'w') as f:\n"
            "        for it in session.items:\n"
            "            marks = {m.name for m in it.iter_markers()}\n"
            "            f.write(f\"{it.nodeid}\\t{'cross_backend' in marks}\\t{'gpu' in marks}\\n\")\n")
        env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
        env["LIST_MARKS_TO"] = str(tmp_path / "items.tsv")
        args = ("-p", "list_marks", *args)
    return subprocess.run([sys.executable, "-m", "pytest", "tests", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_selection_keeps_every_gpu_test_cross_backend_first(tmp_path):
    proc = _collect("gpu", tmp_path=tmp_path)  # one collection: ids with their markers
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deselected" in proc.stdout
    rows = [line.split("\t") for line in (tmp_path / "items.tsv").read_text().splitlines()]
    ids = [r[0] for r in rows]
    assert ids == [line for line in proc.stdout.splitlines() if "::" in line]
    cross_ids = [i for i, cross, _ in rows if cross == "True"]
    assert any("test_cross_backend_agreement" in t for t in cross_ids)
    assert ids[:len(cross_ids)] == cross_ids  # the cross-backend tests come first
    for gpu_backend in ("cupy", "jax", "torch"):
        assert any(f"[{gpu_backend}" in t for t in ids)
    # every case on those backends: none of the default run's thinning of JAX cases
    assert sum("test_sklearn_estimator_checks" in t and "-jax]" in t for t in ids) > 100
    # Nothing that runs on numpy or array_api_strict alone: apart from the cross_backend and
    # gpu tests, each one names a GPU-capable backend.
    rest_ids = [i for i, cross, gpu in rows if cross == gpu == "False"]
    assert rest_ids and len(rest_ids) < len(ids)
    assert all(any(b in t for b in ("cupy", "jax", "torch")) for t in rest_ids), [
        t for t in rest_ids if not any(b in t for b in ("cupy", "jax", "torch"))]
    assert not any("test_docs" in t or "test_gpu_check" in t for t in ids
                   if "test_sleeps_until_stopped" not in t)  # (it skips itself there)
    # scikit-learn's estimator checks (hundreds of small fits) come after everything else,
    # CuPy's first: a test limit that cuts them short costs nothing else
    checks = [i for i, t in enumerate(ids) if "test_sklearn_estimator_checks" in t]
    assert checks and checks == list(range(len(ids) - len(checks), len(ids)))
    sk = [i for i, t in enumerate(ids) if "test_sklearn.py" in t]  # and bpcore.sklearn's own
    assert sk == list(range(len(ids) - len(sk), len(ids)))          # tests just before them
    order = [next(b for b in ("cupy", "jax", "torch") if f"-{b}]" in ids[i]) for i in checks]
    assert order == sorted(order, key=("cupy", "jax", "torch").index)


def test_default_run_leaves_out_the_extended_tier():
    """The default run thins JAX's parameter grids (evenly, first and last kept) and leaves
    out ``extended`` cases; every test function still runs on JAX; other backends keep every
    case. (On stand-ins for collected tests: the rule itself, with no collection to wait for.)"""
    from types import SimpleNamespace

    from .conftest import JAX_CASES, _default_tier, _spread

    def item(fn, case, marks=()):
        marks = {m.name: m for m in marks}
        spec = SimpleNamespace(id=case, params={"backend": case.split("-")[0]})
        return SimpleNamespace(nodeid=f"tests/t.py::{fn}[{case}]", callspec=spec,
                               get_closest_marker=marks.get)

    ext = pytest.mark.extended(cases=["torch-b"]).mark
    thin = pytest.mark.extended(thin=["torch"]).mark
    items = ([item("test_grid", f"jax-{i}") for i in range(20)] +
             [item("test_grid", f"numpy-{i}") for i in range(20)] +
             [item("test_small", f"jax-{i}") for i in range(3)] +
             [item("test_marked", c, [ext]) for c in ("torch-a", "torch-b")] +
             [item("test_all_extended", "numpy", [pytest.mark.extended.mark])] +
             [item("test_thin", f"{b}-{i}", [thin]) for b in ("torch", "numpy")
              for i in range(9)])
    kept, left = _default_tier(items)
    names = lambda pool: [it.nodeid.split("::")[1] for it in pool]  # noqa: E731
    jax_kept = [n for n in names(kept) if n.startswith("test_grid[jax")]
    assert len(jax_kept) == JAX_CASES and jax_kept[0] == "test_grid[jax-0]" and \
        jax_kept[-1] == "test_grid[jax-19]"
    assert sum(n.startswith("test_grid[numpy") for n in names(kept)) == 20
    assert sum(n.startswith("test_small") for n in names(kept)) == 3
    assert "test_marked[torch-a]" in names(kept) and "test_marked[torch-b]" in names(left)
    assert "test_all_extended[numpy]" in names(left)
    assert sum(n.startswith("test_thin[torch") for n in names(kept)) == JAX_CASES
    assert sum(n.startswith("test_thin[numpy") for n in names(kept)) == 9
    assert len(kept) + len(left) == len(items)
    assert _spread(3, 4) == {0, 1, 2} and _spread(11, 4) == {0, 3, 7, 10}


def test_unknown_selection_is_a_usage_error():
    proc = _collect("gpus")
    assert proc.returncode != 0 and "BPCORE_TESTS='gpus'" in proc.stdout + proc.stderr


def test_a_noisy_machine_is_reported():
    from benchmarks.report import noise_warning

    quiet = [{"spread": 0.05}] * 9 + [{"spread": 0.6}]
    assert noise_warning(quiet) == ""
    busy = [{"spread": 0.05}] * 6 + [{"spread": 0.6}] * 4
    assert "noisy" in noise_warning(busy) and "4 of 10" in noise_warning(busy)


def test_a_stop_request_survives_a_swallowed_interrupt():
    """Python drops an exception raised in a finalizer (JAX's GC callback ate a SIGTERM's
    KeyboardInterrupt once); the handler's flag still stops the run at the next measurement."""
    suite.STOP.set()
    try:
        result = run_suite(["numpy"], cases=["small"], sweep=False)
    finally:
        suite.STOP.clear()
    assert result["status"] == "interrupted" and not result["rows"] and result["missing"]
