"""The suite under pytest-benchmark: ``python -m pytest benchmarks --benchmark-enable``.

Every (backend, case, kind) pair of bpcore, the GEMM floor of each backend, and each peer.
Runners are built (and JAX-compiled) outside the timed function; each timed call ends with
a device synchronisation. With ``--benchmark-disable`` (the default in this project's
pytest settings) every function runs once: a smoke test, never a timing assertion.
"""

from __future__ import annotations

import pytest

import bpcore

from .cases import CASES
from .impls import KINDS, PEERS, Unavailable, bpcore_runner, floor_runner, peer_runner

BACKENDS = [b for b in bpcore.backends.names() if b != "array_api_strict"]
CPU_CASES = ["small", "mnist", "large"]
ALL_CASES = CPU_CASES + ["wide"]


def _gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return "cupy" in bpcore.backends.available()


def _case(name):
    case = CASES[name]
    if case.gpu_only and not _gpu_present():
        pytest.skip(f"case {name!r} runs only with a GPU present")
    return case


def _time(benchmark, build):
    try:
        runner = build()
    except Unavailable as e:
        pytest.skip(str(e))
    runner.sync([runner.run(0)])  # compile / warm up outside the timing

    state = {"i": 1}

    def one():
        out = runner.run(state["i"])
        state["i"] += 1
        runner.sync([out])

    benchmark.pedantic(one, rounds=5, iterations=1, warmup_rounds=1) \
        if benchmark.enabled else benchmark(one)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ALL_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bpcore(benchmark, backend, case, kind, dtype):
    c = _case(case)
    if dtype == "float64" and case != "small" and not benchmark.enabled:
        pytest.skip("float64 smoke runs on the small case only (the code path is the same)")
    benchmark.group = f"{case}-{dtype}-{kind}"
    _time(benchmark, lambda: bpcore_runner(backend, kind, c, dtype))


@pytest.mark.parametrize("case", ALL_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_floor(benchmark, backend, case):
    c = _case(case)
    benchmark.group = f"{case}-float32-floor"
    _time(benchmark, lambda: floor_runner(backend, c, "float32"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("peer", PEERS)
def test_peer(benchmark, peer, case, kind):
    benchmark.group = f"{case}-float32-{kind}"
    _time(benchmark, lambda: peer_runner(peer, kind, CASES[case], "float32"))


def test_report_end_to_end(tmp_path):
    """The report machinery: a tiny run writes the JSON, Markdown and charts."""
    import json

    from .__main__ import main

    assert main(["--cases", "small", "--no-sweep", "--backends", "numpy",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert {r["kind"] for r in rows if r["impl"] == "bpcore"} == set(KINDS)
    assert all("ratio_to_floor" in r for r in rows if r["impl"] == "bpcore")
    assert any("ratio_to_best_peer" in r for r in rows if r["impl"] == "bpcore")
    assert "blas" in data["machine"] and "cores" in data["machine"]
    assert "| small | float32 | numpy | sgd |" in (tmp_path / "results.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "time_per_step.png").read_bytes()[:4] == b"\x89PNG"
