"""Trainer.fit: history, seeded shuffling, no recompilation, early stopping, divergence."""

from __future__ import annotations

import numpy as np
import pytest

import bpcore
from bpcore import EarlyStopping, optim
from bpcore.errors import ConfigError, DivergenceError

from .conftest import params_np


def _data(n=96, d=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)
    return X, y


def test_fit_records_history_and_learns(backend):
    X, y = _data()
    model = bpcore.MLP([5, 16, 3], "tanh", backend=backend, seed=0)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.02))
    h = trainer.fit(X, y, epochs=40, batch_size=32, validation_data=(X[:20], y[:20]),
                    verbose=0)
    assert h.epochs == list(range(1, 41)) and trainer.epoch == 40 and trainer.steps == 120
    assert set(h.keys()) == {"loss", "accuracy", "val_loss", "val_accuracy", "time"}
    assert h["loss"][-1] < 0.5 * h["loss"][0] and h["accuracy"][-1] > 0.9
    ev = trainer.evaluate(X[:20], y[:20])
    assert ev["loss"] == pytest.approx(h["val_loss"][-1], rel=1e-5)
    assert ev["accuracy"] == pytest.approx(h["val_accuracy"][-1])


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("split", [None, 0.25])
def test_fit_on_class_labels_takes_them_as_labels_and_equals_one_hot_rows(backend_name,
                                                                           split):
    """Where the in-place step takes class labels directly, ``fit`` on integer labels runs
    it on the labels (no one-hot rows: the loss's one-pass kernel), and trains the same
    model, history and all, as ``fit`` on the same targets given as one-hot rows (the
    canonical path), to round-off in float64; a validation split takes its labels too."""
    from bpcore._array import nested_leaves

    from .conftest import _backend_or_skip

    be = _backend_or_skip(backend_name)
    X, y = _data(n=90)
    runs = []
    for targets in (y, np.eye(3)[y]):
        model = bpcore.MLP([5, 8, 3], backend=be, dtype="float64", seed=1)
        trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.01))
        calls = []
        step_labels = trainer._inplace.step_labels
        trainer._inplace.step_labels = lambda *a: calls.append(1) or step_labels(*a)
        h = trainer.fit(X, targets, epochs=3, batch_size=16, seed=4, verbose=0,
                        validation_split=split)
        runs.append((model.copy_params(), h, len(calls)))
    (p_labels, h_labels, n_labels), (p_rows, h_rows, n_rows) = runs
    n_train = 90 - (0 if split is None else int(round(90 * split)))
    assert n_labels == 3 * -(-n_train // 16) and n_rows == 0
    for a, b in zip(nested_leaves(p_labels), nested_leaves(p_rows)):
        np.testing.assert_allclose(be.to_numpy(a), be.to_numpy(b), rtol=1e-12, atol=1e-14)
    for key in h_rows.keys() - {"time"}:
        np.testing.assert_allclose(h_labels[key], h_rows[key], rtol=1e-12)


def test_fit_is_reproducible_and_shuffles_by_seed(backend):
    X, y = _data()

    def run(seed, shuffle=True):
        m = bpcore.MLP([5, 8, 3], backend=backend, seed=1)
        bpcore.Trainer(m, "softmax_cross_entropy", optim.sgd(0.1)).fit(
            X, y, epochs=2, batch_size=10, seed=seed, shuffle=shuffle, verbose=0)
        return params_np(m)

    a, b, c = run(3), run(3), run(4)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    assert not np.array_equal(a[0][0], c[0][0])
    assert not np.array_equal(run(3, shuffle=False)[0][0], a[0][0])


def test_fit_regression_and_binary_targets(backend):
    X, y = _data()
    m = bpcore.MLP([5, 8, 2], backend=backend)
    h = bpcore.Trainer(m, "mse", optim.adam(0.01)).fit(X, X[:, :2] * 0.5, epochs=3, verbose=0)
    assert "accuracy" not in h and h["loss"][-1] < h["loss"][0]
    m = bpcore.MLP([5, 8, 1], backend=backend)
    t = bpcore.Trainer(m, "binary_cross_entropy", optim.adam(0.01))
    h = t.fit(X, (y > 0).astype(np.float64), epochs=3, verbose=0)
    # accuracy against an independent count: a logit's sign against the 0/1 target
    logits = np.asarray(backend.to_numpy(m(X)), dtype=np.float64)[:, 0]
    assert t.evaluate(X, (y > 0).astype(np.float64))["accuracy"] == pytest.approx(
        np.mean((logits > 0) == (y > 0)))
    assert len(h["accuracy"]) == 3


def test_jax_fit_compiles_each_shape_once():
    pytest.importorskip("jax")
    X, y = _data(n=100)
    model = bpcore.MLP([5, 8, 3], backend="jax")
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(1e-3))
    trainer.fit(X, y, epochs=4, batch_size=32, verbose=0)  # 3 full batches + one of 4
    assert trainer.trace_count == 2
    trainer.fit(X, y, epochs=2, batch_size=32, verbose=0)
    assert trainer.trace_count == 2  # nothing recompiled on later steps or epochs


def test_early_stopping_restores_the_best_weights(backend):
    X, y = _data()
    model = bpcore.MLP([5, 32, 3], backend=backend)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.sgd(0.5))
    # validation labels that disagree with training: val_loss rises once training fits
    stop = EarlyStopping("val_loss", patience=2)
    seen = {}

    class Spy(bpcore.Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            seen[epoch] = params_np(trainer.model)

    h = trainer.fit(X, y, epochs=60, batch_size=16, validation_data=(X[:30], (y[:30] + 1) % 3),
                    callbacks=[stop, Spy()], verbose=0)
    assert stop.stopped_epoch is not None and len(h.epochs) < 60
    best_epoch = int(np.argmin(h["val_loss"])) + 1
    assert stop.best_epoch == best_epoch
    np.testing.assert_array_equal(params_np(model)[0][0], seen[best_epoch][0][0])


def test_early_stopping_needs_a_known_metric():
    X, y = _data()
    trainer = bpcore.Trainer(bpcore.MLP([5, 3]), "softmax_cross_entropy")
    with pytest.raises(ConfigError, match="val_loss.*validation_data"):
        trainer.fit(X, y, epochs=2, callbacks=[EarlyStopping("val_loss")], verbose=0)


def test_divergence_stops_with_last_good_parameters(backend):
    X, y = _data(n=40)
    X_bad = X.copy()
    X_bad[25, 2] = np.nan  # lands in the third batch of 10 (no shuffling)

    def trainer():
        m = bpcore.MLP([5, 8, 3], backend=backend, seed=2)
        return bpcore.Trainer(m, "softmax_cross_entropy", optim.adam(0.01))

    good = trainer()  # (the same two batches through fit's own path: the same bits)
    good.fit(X[:20], y[:20], epochs=1, batch_size=10, shuffle=False, verbose=0)
    t = trainer()
    with pytest.raises(DivergenceError, match="step 3") as ei:
        t.fit(X_bad, y, epochs=3, batch_size=10, shuffle=False, verbose=0)
    assert "last good" in str(ei.value) and isinstance(ei.value, FloatingPointError)
    for (W, b), (gW, gb) in zip(params_np(t.model), params_np(good.model)):
        np.testing.assert_array_equal(W, gW)
        np.testing.assert_array_equal(b, gb)
    for a, g in zip(bpcore._array.nested_leaves(t.opt_state),
                    bpcore._array.nested_leaves(good.opt_state)):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(g))
    with pytest.raises(DivergenceError):  # still flagged until reset
        t.check()
    t.reset_guard()
    t.check()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_huge_learning_rate_diverges_cleanly(backend):
    X, y = _data()
    t = bpcore.Trainer(bpcore.MLP([5, 8, 1], "identity", backend=backend), "mse",
                       optim.sgd(1e6))
    with pytest.raises(DivergenceError):
        t.fit(X, X[:, :1] * 1e3, epochs=20, batch_size=8, verbose=0)
    assert all(np.isfinite(W).all() and np.isfinite(b).all() for W, b in params_np(t.model))


def test_clip_norm_bounds_each_update(backend):
    X, y = _data()
    m = bpcore.MLP([5, 4, 3], backend=backend, dtype="float32")
    before = params_np(m)
    t = bpcore.Trainer(m, "softmax_cross_entropy", optim.sgd(1.0), clip_norm=1e-3)
    t.step(X, y)
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for la, lb in zip(params_np(m), before)
                        for a, b in zip(la, lb)))
    assert moved <= 1e-3 * (1 + 1e-4)


def test_fit_rejects_bad_settings():
    X, y = _data()
    t = bpcore.Trainer(bpcore.MLP([5, 3]), "softmax_cross_entropy")
    with pytest.raises(ConfigError, match="batch_size"):
        t.fit(X, y, batch_size=0, verbose=0)
    with pytest.raises(ConfigError, match="no batch"):
        t.fit(X, y, batch_size=1000, drop_last=True, verbose=0)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_divergence_is_not_overridden_by_early_stopping_restore(backend):
    import re

    from bpcore._array import array_namespace

    X, y = _data(n=40)

    def lr(step):  # sane for 6 steps, then absurd: the run blows up in epoch 2 or 3
        xp = array_namespace(step)
        return 0.1 + 1e30 * xp.astype(step >= 6, step.dtype)

    def make():
        return bpcore.Trainer(bpcore.MLP([5, 8, 3], backend=backend, seed=2),
                              "softmax_cross_entropy", optim.sgd(lr))

    t = make()
    stop = EarlyStopping("val_loss", patience=5)
    with pytest.raises(DivergenceError) as ei:
        t.fit(X, y, epochs=5, batch_size=10, shuffle=False, verbose=0,
              validation_data=(X, y), callbacks=[stop])
    bad = int(re.search(r"step (\d+)", str(ei.value)).group(1))
    assert bad > 5 and stop.best_params is not None  # a later snapshot existed, unused
    ref = make()
    for i in range(bad - 1):
        j = i % 4
        ref.step(X[j * 10:(j + 1) * 10], y[j * 10:(j + 1) * 10])
    np.testing.assert_array_equal(params_np(t.model)[0][0], params_np(ref.model)[0][0])


def test_guard_can_be_switched_off(backend):
    X, y = _data(n=20)
    X[3, 1] = np.nan
    t = bpcore.Trainer(bpcore.MLP([5, 4, 3], backend=backend), "softmax_cross_entropy",
                       optim.sgd(0.1), check_finite=False)
    t.fit(X, y, epochs=1, batch_size=10, shuffle=False, verbose=0)  # no error raised
    assert not np.isfinite(params_np(t.model)[0][0]).all() and t.steps == 2
