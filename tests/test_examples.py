"""Each example runs end to end and learns."""

from __future__ import annotations

import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_numpy_pipeline():
    assert _load("numpy_pipeline").main(epochs=60) > 0.9


def test_jax_optax():
    pytest.importorskip("jax")
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    with jax.numpy_dtype_promotion("standard"):  # optax itself relies on implicit promotion
        assert _load("jax_optax").main(steps=1500) > 0.95


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_torch_pipeline(backend):
    pytest.importorskip("torch")
    assert _load("torch_pipeline").main([backend], epochs=40) > 0.9
