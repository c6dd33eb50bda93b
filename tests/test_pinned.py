"""Behaviour pinned to known values, so that a refactor cannot change it unnoticed.

Each test here was written against a bug that the rest of the suite let through when it was
planted by hand (a mutation): Nesterov momentum ignored, a schedule off by one step, the same
shuffle order every epoch, He and Glorot swapped, an unweighted epoch loss, EarlyStopping's
patience off by one, torch sharing read-only NumPy memory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import bpcore
from bpcore import EarlyStopping, optim

P0, G, LR = 0.5, 0.3, 0.1


def _steps(opt, n):
    """Apply ``opt`` ``n`` times to one scalar bias with a constant gradient G."""
    params = [(np.zeros((1, 1)), np.array([P0]))]
    grads = [(np.zeros((1, 1)), np.array([G]))]
    state = opt.init(params)
    for i in range(n):
        u, state = opt.update(grads, state, params, step=i)
        params = optim.apply_updates(params, u)
    return float(params[0][1][0])


def test_nesterov_two_steps_by_hand():
    # v1 = g, u1 = g + βv1 = g(1+β); v2 = βv1 + g = g(1+β), u2 = g + βv2 = g(1+β+β²).
    b = 0.9
    want = P0 - LR * G * ((1 + b) + (1 + b + b * b))
    assert _steps(optim.sgd(LR, momentum=b, nesterov=True), 2) == pytest.approx(want, abs=1e-15)
    heavy_ball = P0 - LR * G * (1 + (1 + b))
    assert _steps(optim.sgd(LR, momentum=b), 2) == pytest.approx(heavy_ball, abs=1e-15)


@pytest.mark.parametrize("schedule,rates", [
    (optim.step_decay(LR, 1, 0.5), [LR, LR / 2, LR / 4]),
    (optim.cosine_decay(LR, 2), [LR, LR / 2, 0.0]),
    (optim.constant(LR), [LR, LR, LR]),
])
def test_the_first_update_uses_the_schedule_at_step_0(schedule, rates):
    for n in range(1, 4):
        want = P0 - G * sum(rates[:n])
        assert _steps(optim.sgd(schedule), n) == pytest.approx(want, abs=1e-15), n
    # Adam's schedule is read at the same step numbers.
    assert _steps(optim.adam(schedule), 1) == pytest.approx(P0 - rates[0], rel=1e-7)


def test_each_epoch_uses_its_documented_permutation(monkeypatch):
    n, batch, seed = 23, 5, 7
    X = np.arange(n, dtype=np.float64).reshape(n, 1)
    y = np.zeros(n, dtype=np.int64)
    model = bpcore.MLP([1, 2], seed=0, dtype="float64")
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.sgd(1e-9))
    seen = []
    real = trainer._advance  # every step runs through it, with its batch

    def record(step_fn, xb, T, **kw):
        seen.extend(int(v) for v in np.asarray(xb)[:, 0])
        return real(step_fn, xb, T, **kw)

    monkeypatch.setattr(trainer, "_advance", record)
    trainer.fit(X, y, epochs=3, batch_size=batch, seed=seed, verbose=0)
    for epoch in range(3):  # documented: numpy.random.default_rng([seed, epoch]).permutation(n)
        want = np.random.default_rng([seed, epoch]).permutation(n).tolist()
        assert seen[epoch * n:(epoch + 1) * n] == want, epoch
    seen.clear()
    trainer.fit(X, y, epochs=1, batch_size=batch, seed=seed, verbose=0)  # resumes at epoch 3
    assert seen == np.random.default_rng([seed, 3]).permutation(n).tolist()
    seen.clear()
    trainer.fit(X, y, epochs=1, batch_size=batch, shuffle=False, verbose=0)
    assert seen == list(range(n))


@pytest.mark.parametrize("act,scheme", [("relu", "he"), ("tanh", "glorot")])
def test_initial_weight_spread(act, scheme):
    sizes = [400, 300, 200]
    m = bpcore.MLP(sizes, act, "identity", seed=3, dtype="float64")
    for k, ((W, b), n_in, n_out) in enumerate(zip(m.params, sizes[:-1], sizes[1:])):
        layer_scheme = scheme if k == 0 else "glorot"  # the identity output layer: Glorot
        want = (math.sqrt(2.0 / n_in) if layer_scheme == "he" else
                math.sqrt(2.0 / (n_in + n_out)))  # Glorot uniform: limit/sqrt(3)
        assert float(np.std(W)) == pytest.approx(want, rel=0.03), (k, layer_scheme)
        assert abs(float(np.mean(W))) < 0.05 * want and not np.any(b)
        if layer_scheme == "glorot":
            assert float(np.max(np.abs(W))) <= math.sqrt(6.0 / (n_in + n_out))


def test_epoch_loss_is_the_sample_weighted_mean():
    """At a negligible learning rate, the epoch's training loss is the dataset's loss."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 4))
    y = rng.integers(0, 3, 50)
    model = bpcore.MLP([4, 6, 3], "tanh", seed=1, dtype="float64")
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.sgd(1e-12))
    before = trainer.evaluate(X, y)
    # Independent of bpcore's loss code: softmax cross-entropy by hand.
    Z = np.asarray(model(X))
    ref = np.mean(np.log(np.exp(Z).sum(1)) - Z[np.arange(50), y])
    assert before["loss"] == pytest.approx(ref, rel=1e-12)
    assert before["accuracy"] == pytest.approx(np.mean(Z.argmax(1) == y))
    h = trainer.fit(X, y, epochs=1, batch_size=16, shuffle=False, verbose=0)  # 16+16+16+2
    assert h["loss"][0] == pytest.approx(before["loss"], rel=1e-9)
    assert h["accuracy"][0] == pytest.approx(before["accuracy"])


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    class Fake:
        stop_training = False
        model = None

    es = EarlyStopping("val_loss", patience=2, restore_best=False)
    trainer = Fake()
    es.on_train_begin(trainer)
    stopped_at = None
    for epoch, v in enumerate([1.0, 0.9, 0.95, 0.96, 0.97, 0.98], start=1):
        es.on_epoch_end(trainer, epoch, {"val_loss": v})
        if trainer.stop_training:
            stopped_at = epoch
            break
    # best at epoch 2; epochs 3 and 4 do not improve: patience 2 is used up at epoch 4.
    assert stopped_at == 4 and es.best_epoch == 2 and es.stopped_epoch == 4


def test_torch_never_shares_read_only_numpy_memory():
    torch = pytest.importorskip("torch")
    try:
        be = bpcore.backends.get("torch")
    except bpcore.errors.BackendUnavailableError as e:
        pytest.skip(str(e))
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    a.flags.writeable = False
    t = be.asarray(a)  # no "non-writable" warning (warnings are errors in this suite)
    t += 1  # writing to the tensor must not reach the read-only array
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert isinstance(t, torch.Tensor)
