"""Training: cross-backend agreement, convergence, the compiled step, optimizers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import bpcore
from bpcore import backends, optim
from bpcore.errors import ConfigError

from .conftest import params_np

WORST_CROSS_BACKEND: dict[str, float] = {}


def _spirals(n_per_class=100, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n_per_class)
    r = 0.1 + 0.9 * t
    X, y = [], []
    for c in range(2):
        a = 3.0 * math.pi * t + c * math.pi
        X.append(np.stack([r * np.cos(a), r * np.sin(a)], 1) + rng.normal(0, 0.01, (n_per_class, 2)))
        y.append(np.full(n_per_class, c))
    return np.concatenate(X), np.concatenate(y)


@pytest.mark.cross_backend
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_cross_backend_agreement_20_steps_float64(opt_name):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 6))
    y = rng.integers(0, 3, size=32)
    results = {}
    for name in backends.available():
        model = bpcore.MLP([6, 16, 8, 3], activation=["tanh", "gelu"], backend=name,
                           dtype="float64", seed=42)
        opt = optim.sgd(lr=0.1, momentum=0.9) if opt_name == "sgd" else optim.adam(lr=0.01)
        trainer = bpcore.Trainer(model, loss="softmax_cross_entropy", optimizer=opt)
        for i in range(20):
            batch = slice((i % 4) * 8, (i % 4 + 1) * 8)
            trainer.step(X[batch], y[batch])
        results[name] = params_np(model)
    ref = results["numpy"]
    assert len(results) >= 2, "needs at least two backends to compare"
    for name, params in results.items():
        worst = max(float(np.max(np.abs(a - b))) for la, lb in zip(params, ref)
                    for a, b in zip(la, lb))
        WORST_CROSS_BACKEND[f"{name}/{opt_name}"] = worst
        assert worst < 1e-10, (name, worst)


@pytest.mark.cross_backend
def test_same_seed_same_initial_bits_on_every_backend(dtype):
    ref = None
    for name in backends.available():
        be = backends.get(name)
        if dtype == "float64" and be.float64_error():
            continue
        p = [(be.to_numpy(W), be.to_numpy(b)) for W, b in
             bpcore.MLP([5, 7, 3], backend=name, dtype=dtype, seed=9).params]
        if ref is None:
            ref = p
        for (W, b), (rW, rb) in zip(p, ref):
            assert W.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(W, rW)
            np.testing.assert_array_equal(b, rb)
    other = bpcore.MLP([5, 7, 3], dtype=dtype, seed=10).params[0][0]
    assert not np.array_equal(np.asarray(other), ref[0][0])


def test_array_api_strict_runs_the_whole_training_step():
    be = pytest.importorskip("array_api_strict") and backends.get("array_api_strict")
    model = bpcore.MLP([4, 8, 3], activation="softplus", backend=be, dtype="float32")
    for opt in (optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                optim.adamw(1e-2, weight_decay=0.1),
                optim.adam(optim.cosine_decay(1e-2, 10))):
        trainer = bpcore.Trainer(model, loss="softmax_cross_entropy", optimizer=opt)
        loss = trainer.step(np.ones((5, 4)), np.array([0, 1, 2, 1, 0]))
        assert type(loss).__module__.startswith("array_api_strict")
        assert loss.shape == () and math.isfinite(float(loss))
    for loss_name, y in (("mse", np.zeros((5, 3))), ("binary_cross_entropy", np.ones((5, 3)))):
        trainer = bpcore.Trainer(model, loss=loss_name, optimizer="adam")
        assert math.isfinite(float(trainer.step(np.ones((5, 4)), y)))


def test_xor_reaches_full_accuracy(backend):
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    y = np.array([0, 1, 1, 0])
    model = bpcore.MLP([2, 8, 2], "tanh", backend=backend, seed=0)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.05))
    for _ in range(300):
        trainer.step(X, y)
    pred = np.argmax(backend.to_numpy(model(X)), axis=1)
    assert (pred == y).all(), pred


def test_two_spirals_reach_full_training_accuracy(backend):
    X, y = _spirals()
    model = bpcore.MLP([2, 64, 64, 2], "tanh", backend=backend, seed=0)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.01))
    prepared = trainer.prepare_batch(X, y)
    for _ in range(600):  # (every backend is at 100% from step 400 on, and stays there)
        trainer.step_prepared(*prepared)
    pred = np.argmax(backend.to_numpy(model(X)), axis=1)
    assert (pred == y).mean() == 1.0, (pred == y).mean()


def test_step_returns_a_device_scalar_and_does_not_sync(backend):
    model = bpcore.MLP([3, 4, 2], backend=backend)
    trainer = bpcore.Trainer(model, "mse", optim.sgd(0.1))
    loss = trainer.step(np.ones((2, 3)), np.zeros((2, 2)))
    assert backend.is_native(loss) and loss.shape == ()
    assert loss.dtype == backend.dtype("float32")


def test_jax_step_compiles_once_per_shape():
    jax = pytest.importorskip("jax")
    model = bpcore.MLP([3, 4, 2], backend="jax")
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(1e-3))
    for _ in range(5):
        trainer.step(np.ones((8, 3)), np.zeros(8, dtype=np.int64))
    assert trainer.trace_count == 1
    trainer.step(np.ones((4, 3)), np.zeros(4, dtype=np.int64))  # a new batch size
    assert trainer.trace_count == 2
    assert all(isinstance(a, jax.Array) for layer in model.params for a in layer)
    leaves = jax.tree_util.tree_leaves(trainer.opt_state)
    assert leaves and all(isinstance(a, jax.Array) for a in leaves)


# ---- optimizers on their own: exact one-step formulas and known minima -------------------
def _quadratic_run(opt, steps, be):
    """Minimise ½‖W − W*‖² + ½‖b − b*‖² from zero; returns the final distance."""
    target = [(np.array([[1.0, -2.0], [0.5, 3.0]]), np.array([-1.0, 2.0]))]
    params = [(be.asarray(np.zeros((2, 2)), dtype="float64"),
               be.asarray(np.zeros(2), dtype="float64"))]
    tgt = [tuple(be.asarray(a, dtype="float64") for a in layer) for layer in target]
    state = opt.init(params)
    for i in range(steps):
        grads = [(W - tW, b - tb) for (W, b), (tW, tb) in zip(params, tgt)]
        # the step count as a device array, as inside the compiled step
        updates, state = opt.update(grads, state, params, step=be.asarray(np.int32(i)))
        params = optim.apply_updates(params, updates)
    return max(float(np.max(np.abs(be.to_numpy(a) - t))) for a, t in zip(params[0], target[0]))


@pytest.mark.parametrize("make", [
    lambda: optim.sgd(0.3),
    lambda: optim.momentum(0.1, 0.9),
    lambda: optim.momentum(0.1, 0.9, nesterov=True),
    lambda: optim.adam(0.1),
    lambda: optim.adam(optim.step_decay(0.2, 100, 0.5)),
    lambda: optim.sgd(optim.cosine_decay(0.5, 400, alpha=0.1)),
], ids=["sgd", "momentum", "nesterov", "adam", "adam-step", "sgd-cosine"])
def test_optimizers_reach_the_minimum_of_a_parabola(backend, make):
    if backend.float64_error():
        pytest.skip(backend.float64_error())
    assert _quadratic_run(make(), 400, backend) < 1e-4


def test_optimizer_one_step_formulas():
    p = [(np.array([[1.0, 2.0]]), np.array([0.5]))]
    g = [(np.array([[0.1, -0.2]]), np.array([0.3]))]

    def one(opt, steps=1):
        s, params = opt.init(p), p
        for i in range(steps):
            u, s = opt.update(g, s, params, step=i)
            params = optim.apply_updates(params, u)
        return params

    np.testing.assert_allclose(one(optim.sgd(0.1))[0][0], [[0.99, 2.02]])
    # L2 weight decay on W only: W ← W − lr (g + wd W); b untouched by the decay.
    out = one(optim.sgd(0.1, weight_decay=0.5))
    np.testing.assert_allclose(out[0][0], [[1 - 0.1 * (0.1 + 0.5), 2 - 0.1 * (-0.2 + 1.0)]])
    np.testing.assert_allclose(out[0][1], [0.5 - 0.1 * 0.3])
    # Momentum (v ← βv + g): two steps move by lr·g·(1) then lr·g·(1 + β).
    np.testing.assert_allclose(one(optim.momentum(0.1, 0.9), 2)[0][1], [0.5 - 0.03 * 2.9])
    # Adam's first step is lr·sign(g) (bias-corrected m/√v = g/|g|), up to eps.
    np.testing.assert_allclose(one(optim.adam(0.01))[0][0], [[0.99, 2.01]], rtol=1e-7)
    # AdamW: decay decoupled, W ← W − lr (adam + wd W).
    np.testing.assert_allclose(one(optim.adamw(0.01, weight_decay=0.1))[0][0],
                               [[1 - 0.01 * (1 + 0.1), 2 - 0.01 * (-1 + 0.2)]], rtol=1e-7)


def test_schedules_are_plain_functions_of_the_step():
    assert optim.constant(0.1)(123) == pytest.approx(0.1)
    s = optim.step_decay(1.0, 10, 0.5)
    assert [float(s(t)) for t in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    c = optim.cosine_decay(1.0, 100, alpha=0.0)
    assert float(c(0)) == pytest.approx(1.0) and float(c(50)) == pytest.approx(0.5)
    assert float(c(100)) == pytest.approx(0.0) and float(c(1000)) == pytest.approx(0.0)


def test_clip_by_global_norm():
    g = [(np.array([[3.0, 0.0]]), np.array([4.0]))]  # norm 5
    clip = optim.clip_by_global_norm(1.0)
    out, _ = clip.update(g, clip.init(g), g)
    np.testing.assert_allclose(out[0][0], [[0.6, 0.0]])
    np.testing.assert_allclose(out[0][1], [0.8])
    out, _ = optim.clip_by_global_norm(10.0).update(g, (), g)
    np.testing.assert_allclose(out[0][0], [[3.0, 0.0]])


@pytest.mark.parametrize("bad", [
    lambda: optim.sgd(lr=-1), lambda: optim.sgd(lr=0), lambda: optim.adam(b1=1.0),
    lambda: optim.sgd(0.1, nesterov=True), lambda: optim.momentum(0.1, beta=1.5),
    lambda: optim.sgd(lr="fast"), lambda: optim.step_decay(0.1, 0),
    lambda: optim.sgd(0.1, weight_decay=-1.0),
])
def test_bad_optimizer_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        bad()


@pytest.mark.cross_backend
def test_model_copies_to_other_backends_and_dtypes():
    m = bpcore.MLP([3, 4, 2], ["tanh"], "softmax", seed=8, dtype="float32")
    for name in backends.available():
        copy = m.to(name, dtype="float64") if not backends.get(name).float64_error() \
            else m.to(name)
        assert copy.backend.name == name and copy.activation_names == ["tanh", "softmax"]
        for (W, b), (W0, b0) in zip(params_np(copy), params_np(m)):
            np.testing.assert_array_equal(W, W0)
            np.testing.assert_array_equal(b, b0)
    assert m.to().backend is m.backend and m.to(dtype="float64").dtype_name == "float64"
