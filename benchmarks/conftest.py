"""pytest-benchmark suite. In CI it runs with --benchmark-disable: each benchmark executes
once, as a smoke test that it still works; no timing threshold anywhere."""

from __future__ import annotations

import pytest

try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.benchmark_suite)


def pytest_configure(config):
    config.addinivalue_line("markers", "benchmark_suite: part of benchmarks/")
