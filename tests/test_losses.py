"""Loss values against independent formulas, and stability at logits of ±1e4."""

from __future__ import annotations

import numpy as np
import pytest

from bpcore import LOSSES
from bpcore.nn.targets import prepare_target

from .conftest import tonp


def _prep(backend, loss, y, n_out, dtype):
    return prepare_target(LOSSES[loss], backend, y, n_out, len(y), dtype)


def test_values_match_independent_formulas(backend, dtype, rng):
    if dtype == "float64" and backend.float64_error():
        pytest.skip(backend.float64_error())
    Z = rng.standard_normal((6, 4)) * 3
    Zb = backend.asarray(Z, dtype=dtype)
    labels = rng.integers(0, 4, size=6)
    probs = rng.uniform(0, 1, size=(6, 4))
    values = rng.standard_normal((6, 4))
    tol = 1e-12 if dtype == "float64" else 1e-5
    Zq = Z.astype(dtype).astype(np.float64)

    got = float(LOSSES["mse"](Zb, _prep(backend, "mse", values, 4, dtype)))
    want = 0.5 * np.sum((Zq - values.astype(dtype)) ** 2) / 6
    assert got == pytest.approx(want, rel=tol)

    got = float(LOSSES["softmax_cross_entropy"](
        Zb, _prep(backend, "softmax_cross_entropy", labels, 4, dtype)))
    logp = Zq - np.logaddexp.reduce(Zq, axis=1, keepdims=True)
    assert got == pytest.approx(-np.mean(logp[np.arange(6), labels]), rel=tol)
    # one-hot rows give exactly the same value as the integer labels
    onehot = np.eye(4)[labels]
    got1 = float(LOSSES["softmax_cross_entropy"](
        Zb, _prep(backend, "softmax_cross_entropy", onehot, 4, dtype)))
    assert got1 == pytest.approx(got, rel=tol)

    got = float(LOSSES["binary_cross_entropy"](
        Zb, _prep(backend, "binary_cross_entropy", probs, 4, dtype)))
    p = 1 / (1 + np.exp(-Zq))
    pq = probs.astype(dtype)
    want = -np.sum(pq * np.log(p) + (1 - pq) * np.log(1 - p)) / 6
    assert got == pytest.approx(want, rel=max(tol, 1e-10))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_stable_at_huge_logits(backend, loss, dtype):
    if dtype == "float64" and backend.float64_error():
        pytest.skip(backend.float64_error())
    Z = np.array([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]])
    y = {"softmax_cross_entropy": np.array([0, 0, 1]),
         "binary_cross_entropy": np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]),
         "mse": np.zeros((3, 2))}[loss]
    value, D = LOSSES[loss].forward(backend.asarray(Z, dtype=dtype),
                                    _prep(backend, loss, y, 2, dtype))
    value, D = float(value), tonp(backend, D)
    assert np.isfinite(value) and np.all(np.isfinite(D))
    if loss == "softmax_cross_entropy":
        # row 0 is right with certainty (0), row 1 wrong by 2e4, row 2 is log 2
        assert value == pytest.approx((0 + 2e4 + np.log(2)) / 3, rel=1e-6)
        np.testing.assert_allclose(D, np.array([[0, 0], [-1, 1], [0.5, -0.5]]) / 3, atol=1e-7)
    if loss == "binary_cross_entropy":
        assert value == pytest.approx((0 + 2e4 + 2 * np.log(2)) / 3, rel=1e-6)
        np.testing.assert_allclose(D, np.array([[0, 0], [-1, 1], [0, 0]]) / 3, atol=1e-7)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_targets_rule_on_the_host_equals_the_devices(name):
    """The in-place step reads the smallest and largest target on the host: the same rule,
    the same answer as the device's, for every loss, on valid, negative, out-of-range, NaN,
    infinite and empty targets."""
    import bpcore

    be = bpcore.backends.get(name) if name in bpcore.backends.available() else None
    if be is None or be.inplace_ops is None or not be.inplace_ops.host_reads:
        pytest.skip(f"{name}: no host-read in-place operations here")
    cases = [np.eye(3)[[0, 2, 1]], np.full((2, 3), 0.5), -np.eye(3), 2 * np.eye(3),
             np.array([[0.0, np.nan, 1.0]]), np.array([[np.inf, 0.0, 0.0]]),
             np.array([[-np.inf, 1.0, 0.0]]), np.zeros((0, 3))]
    for loss in LOSSES.values():
        for T in cases:
            for dtype in ("float32", "float64"):
                Tb = be.asarray(T, dtype=dtype)
                on_device = bool(loss.targets_valid(Tb))
                on_host = loss.targets_valid(Tb, be.inplace_ops)
                assert on_host is on_device, (loss.name, T, dtype)
