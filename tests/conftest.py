"""Shared fixtures: every test that takes `backend` runs once per registered backend.

A backend that cannot run here (CuPy without a GPU, say) shows up as *skipped* with the
reason bpcore gives, never silently absent. JAX runs with 64-bit mode on (for float64
gradient checks) and with strict dtype and rank promotion, so a silent upcast or an
implicit broadcast in the core fails loudly.
"""

from __future__ import annotations

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
DTYPES = ["float32", "float64"]


def _backend_or_skip(name: str):
    try:
        return bpcore.backends.get(name)
    except BackendUnavailableError as e:
        pytest.skip(str(e))


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


def tonp(backend, a):
    return np.asarray(backend.to_numpy(a), dtype=np.float64)


def params_np(model):
    return [(tonp(model.backend, W), tonp(model.backend, b)) for W, b in model.params]


def unit(rng, shape):
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v)


def pytest_terminal_summary(terminalreporter):
    """Print the figures the issue asks for, measured by this very run."""
    from . import test_gradients, test_training

    lines = []
    if test_gradients.WORST_JAX_REL_ERROR:
        lines.append("worst relative gradient error vs jax.grad (float64): " + ", ".join(
            f"{k}={v:.2e}" for k, v in sorted(test_gradients.WORST_JAX_REL_ERROR.items())))
    if test_training.WORST_CROSS_BACKEND:
        lines.append("worst parameter disagreement vs numpy after 20 steps (float64): " +
                     ", ".join(f"{k}={v:.2e}" for k, v in
                               sorted(test_training.WORST_CROSS_BACKEND.items())))
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
    if lines:
        terminalreporter.section("bpcore figures")
        for line in lines:
            terminalreporter.write_line(line)
