"""Shared fixtures: every test that takes `backend` runs once per registered backend.

A backend that cannot run here (CuPy without a GPU, say) shows up as *skipped* with the
reason bpcore gives, never silently absent. JAX runs with 64-bit mode on (for float64
gradient checks) and with strict dtype and rank promotion, so a silent upcast or an
implicit broadcast in the core fails loudly.

Two tiers. The default run (the README's test command, and CI) leaves out, as *deselected*:

* tests marked ``extended``: the same behaviour as a default test, on another backend or
  case (a second dtype of a multi-process run, a second signal of an interrupt test);
* on JAX, where each test compiles its own programs (about a second each on 2 cores), the
  cases of a test function's parameter grid beyond ``JAX_CASES``, spread evenly over it, as
  JAX's own suite runs ``JAX_NUM_GENERATED_CASES`` of its generated cases. Every test function
  still runs on JAX at least once. ``extended(thin=[backends])`` thins a large grid on more
  backends alike (scikit-learn's estimator checks on PyTorch).

``BPCORE_TESTS=all`` runs every test. ``BPCORE_TESTS=gpu`` (what ``benchmarks/gpu_check.sh``
sets) keeps only the tests that exercise a GPU-capable backend (cupy, jax, torch), every case
of them: the ``cross_backend`` ones first, then the ``gpu`` ones, then every test
parametrised on or named after one of those backends. The rest is reported as deselected.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import numpy as np
import pytest

try:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
except ImportError:  # pragma: no cover - jax is optional
    jax = None

import bpcore
from bpcore.errors import BackendUnavailableError

ALL_BACKENDS = bpcore.backends.names()
GPU_CAPABLE = ("cupy", "jax", "torch")
DTYPES = ["float32", "float64"]


def skip_or_fail(reason: str, gpu_related: bool = True):
    """Skip, except on a real GPU check (``BPCORE_REQUIRE_GPU=1``): there a GPU test that
    cannot run is a failure, or a broken GPU stack would pass as a row of skips."""
    if gpu_related and os.environ.get("BPCORE_REQUIRE_GPU") == "1":
        pytest.fail(f"BPCORE_REQUIRE_GPU=1, but: {reason}")
    pytest.skip(reason)


def _backend_or_skip(name: str):
    try:
        return bpcore.backends.get(name)
    except BackendUnavailableError as e:
        skip_or_fail(str(e), gpu_related=name in GPU_CAPABLE)


def _gpu_rank(item) -> int | None:
    """Run order in the GPU selection (lower first), or None to deselect the test."""
    if item.get_closest_marker("cross_backend"):
        return 0
    if item.get_closest_marker("gpu"):
        return 1
    last = item.get_closest_marker("gpu_last")  # after the rest: a test limit that cuts them
    spec = getattr(item, "callspec", None)      # short costs nothing else
    named = {v for k, v in (spec.params.items() if spec else ()) if k in ("backend",
                                                                          "backend_name")}
    if last and last.kwargs.get("per_backend"):  # the broadest last, CuPy's first
        name = next(iter(named & set(GPU_CAPABLE)), None)
        return 4 + GPU_CAPABLE.index(name) if name else None
    if named & set(GPU_CAPABLE) or any(b in item.originalname for b in GPU_CAPABLE):
        return 3 if last else 2
    return None


SELECTIONS = ("", "all", "gpu")
JAX_CASES = 3  # the default run's cases per test function on JAX (see the module docstring)


def _selection() -> str:
    selection = os.environ.get("BPCORE_TESTS", "")
    if selection not in SELECTIONS:
        raise pytest.UsageError(
            f"BPCORE_TESTS={selection!r}: the selections are 'all' (every test) and 'gpu' "
            "(the GPU check's); unset, the default run")
    return selection


def pytest_configure(config):
    _selection()  # (a misspelt selection is refused before minutes of collection)
    if config.pluginmanager.hasplugin("xdist"):  # (-n: its hooks exist only then)
        config.pluginmanager.register(_WorkerFigures(), "bpcore-worker-figures")


def _figures() -> tuple[dict, dict]:
    """The figures the summary prints, as this process measured them."""
    from . import test_gradients, test_training

    return test_gradients.WORST_JAX_REL_ERROR, test_training.WORST_CROSS_BACKEND


class _WorkerFigures:
    """Under pytest-xdist (``-n``), each worker measures its share of the figures and the
    controller, which runs no test, prints the summary: workers send theirs back when they
    finish (``workeroutput``) and the controller keeps the worst of each."""

    @pytest.hookimpl(tryfirst=True)  # (before xdist's own, which sends workeroutput)
    def pytest_sessionfinish(self, session):
        out = getattr(session.config, "workeroutput", None)
        if out is not None:  # a worker
            out["bpcore_figures"] = [{k: float(v) for k, v in d.items()} for d in _figures()]
            out["bpcore_left_out"] = list(EXTENDED_LEFT_OUT)

    def pytest_testnodedown(self, node, error):
        out = getattr(node, "workeroutput", None) or {}
        for mine, theirs in zip(_figures(), out.get("bpcore_figures", ())):
            for k, v in theirs.items():
                mine[k] = max(v, mine.get(k, 0.0))
        if out.get("bpcore_left_out") and not EXTENDED_LEFT_OUT:  # (each worker's is alike)
            EXTENDED_LEFT_OUT.extend(out["bpcore_left_out"])


def _spread(n: int, k: int) -> set[int]:
    """``k`` of ``range(n)``, evenly spread, the first and the last included."""
    return set(range(n)) if n <= k else {round(i * (n - 1) / (k - 1)) for i in range(k)}


def _default_tier(items) -> tuple[list, list]:
    """``(kept, left out)`` for the default run (see the module docstring)."""
    grids: dict[Any, list[int]] = {}  # (test function, thinned backend) -> its cases
    left = set()
    for i, it in enumerate(items):
        spec = getattr(it, "callspec", None)
        mark = it.get_closest_marker("extended")
        kw = mark.kwargs if mark is not None else {}
        if mark is not None and "thin" not in kw and (
                "cases" not in kw or (spec is not None and spec.id in kw["cases"])):
            left.add(i)  # marked extended (all of it, or this case)
            continue
        thin = ("jax", *kw.get("thin", ()))
        name = next((v for v in (spec.params.values() if spec else ())
                     if isinstance(v, str) and v in thin), None)
        if name is not None:
            grids.setdefault((it.nodeid.split("[")[0], name), []).append(i)
    for idx in grids.values():
        keep = _spread(len(idx), JAX_CASES)
        left.update(i for n, i in enumerate(idx) if n not in keep)
    return ([it for i, it in enumerate(items) if i not in left],
            [it for i, it in enumerate(items) if i in left])


EXTENDED_LEFT_OUT: list[int] = []  # how many tests the default run left out (for the summary)


def pytest_collection_modifyitems(config, items):
    selection = _selection()
    if selection == "all":
        return
    if selection == "":
        kept, left = _default_tier(items)
        if left:
            config.hook.pytest_deselected(items=left)
            EXTENDED_LEFT_OUT.append(len(left))
        items[:] = kept
        return
    ranked = [(_gpu_rank(it), i, it) for i, it in enumerate(items)]
    keep = sorted((r, i, it) for r, i, it in ranked if r is not None)
    dropped = [it for r, _, it in ranked if r is None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = [it for _, _, it in keep]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """A usable Backend, once per registered name; skipped (with why) where unusable."""
    return _backend_or_skip(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@contextlib.contextmanager
def sigint_not_ignored(on_restore=None):
    """Python's own SIGINT handler meanwhile, where the run inherited SIGINT ignored (a test
    run started as a background job of a shell). Tests of Ctrl-C need it, and so do their
    children: handlers are reset on exec, an ignored signal is not. ``on_restore``: called
    before SIG_IGN is put back."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            if on_restore is not None:
                on_restore()
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def tonp(backend, a):
    return np.asarray(backend.to_numpy(a), dtype=np.float64)


def params_np(model):
    return [(tonp(model.backend, W), tonp(model.backend, b)) for W, b in model.params]


def unit(rng, shape):
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v)


def pytest_terminal_summary(terminalreporter):
    """Print the figures the issue asks for, measured by this very run."""
    worst_grad, worst_cross = _figures()
    lines = []
    if worst_grad:
        lines.append("worst relative gradient error vs jax.grad (float64): " + ", ".join(
            f"{k}={v:.2e}" for k, v in sorted(worst_grad.items())))
    if worst_cross:
        lines.append("worst parameter disagreement vs numpy after 20 steps (float64): " +
                     ", ".join(f"{k}={v:.2e}" for k, v in sorted(worst_cross.items())))
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped"):
        for rep in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(rep, "nodeid", "")
            name = next((b for b in ALL_BACKENDS if f"[{b}" in nodeid or f"-{b}]" in nodeid
                         or f"-{b}-" in nodeid), "backend-independent")
            counts.setdefault(name, {}).setdefault(outcome, 0)
            counts[name][outcome] += 1
    if counts:
        lines.append("tests per backend: " + "; ".join(
            f"{k}: " + ", ".join(f"{n} {o}" for o, n in v.items())
            for k, v in sorted(counts.items())))
    if EXTENDED_LEFT_OUT:
        n = EXTENDED_LEFT_OUT[0]
        lines.append(f"default run: {n} test{'s' * (n != 1)} of the extended tier left out "
                     "(more JAX cases, more backends; BPCORE_TESTS=all runs them)")
    if lines:
        terminalreporter.section("bpcore figures")
        for line in lines:
            terminalreporter.write_line(line)
