"""The suite under pytest-benchmark: ``python -m pytest benchmarks --benchmark-enable``.

Every (backend, case, kind) pair of bpcore, the GEMM floor of each backend, and each peer.
Runners are built (and JAX-compiled) outside the timed function; each timed call ends with
a device synchronisation. With ``--benchmark-disable`` (the default in this project's
pytest settings) every function runs once: a smoke test, never a timing assertion.
"""

from __future__ import annotations

import numpy as np
import pytest

import bpcore

from .cases import CASES
from .impls import KINDS, PEERS, Unavailable, bpcore_runner, floor_runner, peer_runner

BACKENDS = [b for b in bpcore.backends.names() if b != "array_api_strict"]
CPU_CASES = ["small", "mnist", "large"]


def _gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return "cupy" in bpcore.backends.available()


def pytest_generate_tests(metafunc):
    """Only the combinations that run: the wide case with a GPU present, and (as smoke tests,
    under --benchmark-disable) float64 on the small case alone: the code path is the same."""
    timing = not metafunc.config.getoption("benchmark_disable", False)
    cases = CPU_CASES + (["wide"] if _gpu_present() else [])
    if "dtype" in metafunc.fixturenames:
        combos = [(c, d) for c in cases for d in ("float32", "float64")
                  if timing or d == "float32" or c == "small"]
        metafunc.parametrize("case,dtype", combos)
    elif "peer" in metafunc.fixturenames:  # the peers run on the CPU cases
        metafunc.parametrize("case", CPU_CASES)
        # scikit-learn's MLP has no separate forward or value-and-grad step
        metafunc.parametrize("peer,kind", [(p, k) for p in PEERS for k in KINDS
                                           if p != "sklearn" or k in ("sgd", "adam")])
    elif "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases)


def _time(benchmark, build, check):
    try:
        runner = build()
    except Unavailable as e:
        pytest.skip(str(e))
    first = runner.run(0)
    runner.sync([first])  # compile / warm up outside the timing
    check(first)

    state = {"i": 1}

    def one():
        out = runner.run(state["i"])
        state["i"] += 1
        runner.sync([out])
        return out

    last = (benchmark.pedantic(one, rounds=5, iterations=1, warmup_rounds=1)
            if benchmark.enabled else benchmark(one))
    check(last)


def _host(x):
    """Any runner output (an array, a 0-d loss, a list of arrays) as one flat NumPy array."""
    if isinstance(x, (list, tuple)):
        parts = [_host(v) for v in x]
        return np.concatenate(parts) if parts else np.zeros(0)
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    elif hasattr(x, "get"):  # CuPy
        x = x.get()
    return np.asarray(x, dtype=np.float64).ravel()


def _finite(out):
    v = _host(out)
    assert v.size and np.all(np.isfinite(v)), "non-finite or empty benchmark output"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bpcore(benchmark, backend, case, kind, dtype):
    c = CASES[case]
    benchmark.group = f"{case}-{dtype}-{kind}"
    be_params = {}

    def check(out):
        _finite(out)
        if kind in ("sgd", "adam"):  # the step returns the parameters: they must move
            now = _host(out)
            if "last" in be_params:
                assert not np.array_equal(now, be_params["last"]), "a step changed nothing"
            be_params["last"] = now
        elif kind == "forward":
            assert _host(out).size == c.batch * c.sizes[-1]

    _time(benchmark, lambda: bpcore_runner(backend, kind, c, dtype), check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_floor(benchmark, backend, case):
    c = CASES[case]
    benchmark.group = f"{case}-float32-floor"
    n_products = 3 * (len(c.sizes) - 1) - 1

    def check(out):
        assert len(out) == n_products
        _finite(out)

    _time(benchmark, lambda: floor_runner(backend, c, "float32"), check)


def test_peer(benchmark, peer, case, kind):
    benchmark.group = f"{case}-float32-{kind}"
    # sklearn's partial_fit returns nothing; the others return a loss, parameters or logits.
    _time(benchmark, lambda: peer_runner(peer, kind, CASES[case], "float32"),
          (lambda out: None) if peer == "sklearn" else _finite)


def test_report_end_to_end(tmp_path):
    """The report machinery: a tiny run writes the JSON, Markdown and charts."""
    import json

    from .__main__ import main

    assert main(["--cases", "small", "--no-sweep", "--backends", "numpy", "--smoke",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert {r["kind"] for r in rows if r["impl"] == "bpcore"} == set(KINDS) | {"fit"}
    assert {r["kind"] for r in rows if r["impl"] == "step"} == {"sgd", "adam"}
    floor = next(r for r in rows if r["impl"] == "floor")
    assert floor["floor_method"] == "sum of products" and floor["peak_gflops"] > 0
    # the products back to back, beside the floor (no floor: nothing compares it below)
    assert floor["floor_sequence_s"] > 0 and len(floor["products_s"]) == 8
    assert all("ratio_to_floor" in r for r in rows if r["impl"] == "bpcore")
    assert any("ratio_to_best_peer" in r for r in rows if r["impl"] == "bpcore")
    assert "blas" in data["machine"] and "cores" in data["machine"]
    md = (tmp_path / "results.md").read_text()
    assert "| small | float32 | numpy | sgd |" in md and "Smoke run" in md and data["smoke"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "time_per_step.png").read_bytes()[:4] == b"\x89PNG"


def test_estimators_benchmark_runs_and_reports(tmp_path):
    """``bpcore bench --estimators`` end to end on its smallest case, one round: every row
    has its ratio to scikit-learn, and in float64 the fitted model is scikit-learn's."""
    pytest.importorskip("sklearn")
    from . import estimators

    result = estimators.run(["digits-adam"], ["numpy", "torch"], ["float64"], rounds=1,
                            log=lambda *_: None)
    rows = {r["impl"]: r for r in result["rows"]}
    floor = rows.pop("floor")  # the fit's products alone, on scikit-learn's BLAS
    assert floor["time_s"] > 0  # (no comparison of two timings: this machine is shared)
    assert floor["vs_sklearn"] == floor["time_s"] / rows["sklearn"]["time_s"]
    assert set(rows) == {"sklearn", "numpy", "torch"} or "torch" in str(result["skipped"])
    for r in rows.values():
        assert r["time_s"] > 0 and np.isfinite(r["vs_sklearn"]) and r["n_iter"] == 20
        assert r["max_coef_diff"] < 1e-10
        assert r["score"] == rows["sklearn"]["score"]
    paths = estimators.write(result, {"cpu": "test"}, str(tmp_path))
    with open(paths[1]) as f:
        text = f.read()
    assert "bpcore.sklearn (numpy)" in text and "× scikit-learn" in text
    assert "the matrix products alone" in text


def test_scaling_benchmark_runs_and_reports(tmp_path):
    """``bpcore bench --scaling`` end to end, briefly: both engines, 1 and 2 workers, each
    row with its efficiency (a value, never a threshold: this machine is shared)."""
    from . import scaling

    engines = ["jax", "mpi"]
    result = scaling.run(engines, {"jax": [1, 2], "mpi": [1, 2]}, seconds=0.2,
                         log=lambda *_: None)
    got = {(r["engine"], r["workers"]) for r in result["rows"]}
    expected = {(e, n) for e in engines for n in (1, 2)}
    missing = expected - got
    assert not missing or all(f"{e}/{n}" in result["skipped"] for e, n in missing), result
    for r in result["rows"]:
        assert r["step_s"] > 0 and np.isfinite(r["efficiency"])
        assert (r["efficiency"] == 1.0) == (r["workers"] == 1)
    paths = scaling.write(result, {"cpu": "test"}, str(tmp_path))
    with open(paths[1]) as f:
        assert "| efficiency |" in f.read()


def test_smoke_is_refused_where_it_would_change_nothing(capsys):
    """``--smoke`` shortens the step suite's timing only: with --estimators or --scaling it
    would be silently ignored, so it is refused with the options that do shorten them."""
    from .__main__ import main

    for other in ("--estimators", "--scaling"):
        with pytest.raises(SystemExit) as e:
            main(["--smoke", other])
        assert e.value.code == 2 and "--smoke" in capsys.readouterr().err
