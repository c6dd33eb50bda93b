"""Property tests over random architectures and batch sizes (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

import bpcore
from bpcore import ACTIVATIONS


@settings(max_examples=40, deadline=None, derandomize=True)  # the same cases on every run
@given(sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5),
       batch=st.integers(1, 9),
       act=st.sampled_from(sorted(ACTIVATIONS)),
       seed=st.integers(0, 2 ** 16))
def test_shapes_dtypes_and_finite_gradients(sizes, batch, act, seed):
    rng = np.random.default_rng(seed)
    model = bpcore.MLP(sizes, activation=act, dtype="float64", seed=seed)
    # Random biases: with zero biases a dead relu unit feeds an exact 0 into the next
    # layer, which then sits on its kink, where no finite difference is meaningful.
    model.set_params([(W, rng.uniform(0.1, 0.5, size=b.shape) * rng.choice([-1, 1], b.shape))
                      for W, b in model.params])
    x = rng.standard_normal((batch, sizes[0]))
    y = rng.integers(0, sizes[-1], size=batch)
    out = model(x)
    assert out.shape == (batch, sizes[-1]) and out.dtype == np.float64
    value, grads, dx = bpcore.value_and_grad(model, x, y, loss="softmax_cross_entropy",
                                             input_grad=True)
    assert np.isfinite(value) and dx.shape == x.shape
    for (gW, gb), (W, b) in zip(grads, model.params):
        assert gW.shape == W.shape and gb.shape == b.shape
        assert np.all(np.isfinite(gW)) and np.all(np.isfinite(gb))
    # a directional derivative agrees with central differences
    v = [(rng.standard_normal(W.shape), rng.standard_normal(b.shape)) for W, b in model.params]
    base = [(np.array(W), np.array(b)) for W, b in model.params]
    eps = 1e-6

    def at(t):
        model.set_params([(W + t * vW, b + t * vb) for (W, b), (vW, vb) in zip(base, v)])
        return float(bpcore.value_and_grad(model, x, y, loss="softmax_cross_entropy")[0])

    numeric = (at(eps) - at(-eps)) / (2 * eps)
    analytic = sum(np.sum(gW * vW) + np.sum(gb * vb) for (gW, gb), (vW, vb) in zip(grads, v))
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))
