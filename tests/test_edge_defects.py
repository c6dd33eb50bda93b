"""Edge defects found by a hostile probe (silent wrong answers, lost data): each test failed
before its fix. The command-line ones are in ``test_cli_predict.py``, the MPI ones in
``test_parallel.py``."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as st_load

import bpcore
from bpcore import optim
from bpcore.io.files import atomic_write
from bpcore.io.preprocess import Standardize
from bpcore.io.checkpoint import _encode
from bpcore.errors import CheckpointError, ConfigError, DivergenceError

INPLACE = [("numpy", None), ("numpy", False), ("torch", None), ("jax", None)]


def _trainer(backend, inplace=None, opt="adam", sizes=(4, 8, 3), dtype="float64", **kw):
    be = bpcore.backends.get(backend) if isinstance(backend, str) else backend
    if be.name == "jax" and dtype == "float64":
        pytest.importorskip("jax")
    m = bpcore.MLP(list(sizes), "relu", backend=be, dtype=dtype, seed=0)
    return bpcore.Trainer(m, "softmax_cross_entropy", optim.get_optimizer(opt, lr=1e-2),
                          inplace=inplace, **kw)


def _host_state(tr):
    be = tr.model.backend
    s = tr.state
    leaves = bpcore._array.nested_leaves((s.params, s.opt_state, s.step, s.epoch, tuple(s.guard)))
    return [np.array(be.to_numpy(a), dtype=np.float64) for a in leaves]


def _data(n=40, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, k, n)


def _backend(name):
    try:
        return bpcore.backends.get(name)
    except bpcore.errors.BackendUnavailableError as e:
        pytest.skip(str(e))


# ---- the guard covers the optimizer state it writes -------------------------------------------
@pytest.mark.parametrize("backend_name,inplace", INPLACE)
def test_adam_state_overflow_is_refused_not_kept(backend_name, inplace):
    """A gradient whose square overflows float32 (one input column of 1e30): Adam's v became
    inf while its update m/sqrt(v) was 0, so the guard passed and those weights froze."""
    be = _backend(backend_name)
    tr = _trainer(be, inplace, "adam", dtype="float32", divergence_factor=None)
    X, y = _data()
    X = X.astype(np.float32)
    tr.step(X[:8], y[:8])
    before = _host_state(tr)
    X[:, 0] = 1e30
    tr.step(X[:8], y[:8])
    with pytest.raises(DivergenceError, match="not finite"):
        tr.check()
    after = _host_state(tr)
    for a, b in zip(before[:-3], after[:-3]):  # all but the guard
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(a).all() for a in after[:-1])


# ---- assigning a whole state ----------------------------------------------------------------
@pytest.mark.parametrize("backend_name,inplace", INPLACE)
def test_assigned_state_brings_its_parameters(backend_name, inplace):
    be = _backend(backend_name)
    a, b = _trainer(be, inplace), _trainer(be, inplace)
    b.model.set_params([(W * 3, v - 1) for W, v in b.model.copy_params()])  # another model
    X, y = _data()
    for _ in range(3):
        b.step(X[:8], y[:8])
    a.state = b.state
    np.testing.assert_array_equal(_host_state(a)[0], _host_state(b)[0])
    a.step(X[8:16], y[8:16])  # a continues b's training: the same step as b's own next one
    b.step(X[8:16], y[8:16])
    for x, z in zip(_host_state(a), _host_state(b)):
        np.testing.assert_allclose(x, z, rtol=0, atol=1e-12)
    assert a.steps == 4


def test_assigned_state_that_does_not_fit_is_refused():
    a, b = _trainer("numpy"), _trainer("numpy", sizes=(4, 9, 3))
    before = _host_state(a)
    with pytest.raises(ConfigError, match="does not fit"):
        a.state = b.state
    c = _trainer("numpy", opt="sgd")
    with pytest.raises(ConfigError, match="opt_state"):
        a.state = c.state
    for x, z in zip(before, _host_state(a)):
        np.testing.assert_array_equal(x, z)


# ---- saving while fit runs in another thread --------------------------------------------------
@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_saves_during_fit_in_another_thread_are_whole_snapshots(tmp_path, backend_name):
    """Each save is one consistent state: it loads (its checksum holds) and its parameters are
    exactly those of the uninterrupted run after the saved step count."""
    be = _backend(backend_name)
    X, y = _data(64)
    ref, seen = _trainer(be), {}
    original = ref.step_indexed

    def record(*a, **k):
        out = original(*a, **k)
        seen[ref.steps] = ref.model.state_dict()
        return out

    ref.step_indexed = record
    ref.fit(X, y, epochs=40, batch_size=8, verbose=0)

    tr = _trainer(be)
    path = tmp_path / "snap.safetensors"
    worker = threading.Thread(target=tr.fit, args=(X, y), kwargs=dict(
        epochs=40, batch_size=8, verbose=0))
    worker.start()
    checked = 0
    while worker.is_alive() or checked < 30:  # (most of them while fit runs)
        tr.save(path)
        ck = bpcore.load_checkpoint(path)  # raises on a torn file
        got = ck.model.state_dict()
        want = seen.get(ck.step, _trainer(be).model.state_dict())
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{k} at step {ck.step}")
        assert ck.epoch_batch == ck.step - 8 * ck.epoch
        checked += 1
    worker.join()
    assert tr.steps == 320


# ---- resuming an interrupted epoch --------------------------------------------------------------
@pytest.mark.parametrize("backend_name,inplace", INPLACE)
@pytest.mark.parametrize("before_step", [False, True])
def test_interrupted_fit_resumes_at_the_next_batch(tmp_path, backend_name, inplace,
                                                   before_step):
    be = _backend(backend_name)
    X, y = _data(80)
    full = _trainer(be, inplace, "adam")
    full.fit(X, y, epochs=3, batch_size=8, verbose=0, seed=5)
    assert full.steps == 30

    tr = _trainer(be, inplace, "adam")
    original, calls = tr.step_indexed, [0]

    def interrupted(*a, **k):
        calls[0] += 1
        if before_step and calls[0] == 15:
            raise KeyboardInterrupt
        out = original(*a, **k)
        if not before_step and calls[0] == 14:
            raise KeyboardInterrupt
        return out

    tr.step_indexed = interrupted
    with pytest.raises(KeyboardInterrupt):
        tr.fit(X, y, epochs=3, batch_size=8, verbose=0, seed=5)
    assert (tr.steps, tr.epoch, tr.epoch_batch) == (14, 1, 4)
    path = tmp_path / "c.safetensors"
    tr.save(path)
    again = bpcore.Trainer.resume(path, backend=be)
    assert again.epoch_batch == 4
    history = again.fit(X, y, epochs=3 - again.epoch, batch_size=8, verbose=0, seed=5)
    assert again.steps == 30 and again.epoch == 3 and again.epoch_batch == 0
    assert history.epochs == [2, 3]
    for a, b in zip(_host_state(again), _host_state(full)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_resume_with_other_batching_is_refused(tmp_path):
    X, y = _data(80)
    tr = _trainer("numpy")
    original = tr.step_indexed

    def stop_after_six(*a, **k):
        out = original(*a, **k)
        if tr.epoch_batch == 6:
            raise KeyboardInterrupt
        return out

    tr.step_indexed = stop_after_six
    with pytest.raises(KeyboardInterrupt):
        tr.fit(X, y, epochs=1, batch_size=8, verbose=0)
    tr.step_indexed = original
    with pytest.raises(ConfigError, match="stopped after batch 6"):
        tr.fit(X, y, epochs=1, batch_size=16, verbose=0)  # 5 batches an epoch
    path = tmp_path / "c.safetensors"
    tr.save(path)
    again = bpcore.Trainer.resume(path)
    assert again.epoch_plan == (80, 8, False, True, 0)
    for other in (dict(seed=1), dict(shuffle=False), dict(drop_last=True), dict(batch_size=4)):
        kw = dict(epochs=1, batch_size=8, verbose=0, seed=0) | other
        for t in (tr, again):  # (the same rule before and after a checkpoint)
            with pytest.raises(ConfigError, match="under another plan"):
                t.fit(X, y, **kw)
    again.fit(X, y, epochs=1, batch_size=8, verbose=0, seed=0)  # the same plan goes on
    assert again.steps == 10 and again.epoch_batch == 0


# ---- crafted checkpoints with a valid checksum ----------------------------------------------------
def _saved(tmp_path, **save_kw):
    tr = _trainer("numpy")
    X, y = _data()
    tr.fit(X, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "ok.safetensors"
    tr.save(path, **save_kw)
    return path


def _craft(path, tensors=None, config=None, meta_extra=None):
    """Rewrite a checkpoint with changed tensors or config, and a checksum that holds."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["bpcore"])
    data = st_load(str(path))
    data.update(tensors or {})
    meta.pop("sha256")
    if config:
        meta["config"].update(config)
    meta.update(meta_extra or {})
    out = path.with_name("crafted.safetensors")
    atomic_write(str(out), _encode(data, meta))
    return out


@pytest.mark.parametrize("field,value,match", [
    ("state.step", np.int32(-1), "state.step = -1 is outside"),
    ("state.step", np.int64(2 ** 40), "state.step = 1099511627776 is outside"),
    ("state.step", np.float64(4.5), "state.step must be an integer"),
    ("state.epoch", np.int32(-2), "state.epoch = -2"),
    ("state.guard.bad_step", np.int32(-3), "bad_step = -3"),
    ("state.guard.bad_step", np.int32(999), "bad_step = 999"),
    ("state.guard.reason", np.int32(7), "reason = 7"),
    ("state.guard.reason", np.int32(1), "contradict"),
    ("state.guard.ref_loss", np.int32(1), "ref_loss must be a float"),
    ("state.guard.ref_loss", np.float64(-1.0), "ref_loss must be a float >= 0"),
    ("state.epoch_batch", np.int32(-4), "epoch_batch = -4"),
])
def test_crafted_state_is_refused_naming_the_field(tmp_path, field, value, match):
    crafted = _craft(_saved(tmp_path), {field: np.asarray(value)})
    with pytest.raises(CheckpointError, match=match):
        bpcore.Trainer.resume(crafted)


@pytest.mark.parametrize("plan", [[1, 2], [0, 8, False, True, 0], [80, 8, 0, 1, 0],
                                  [80, 8, False, True, -1], "80,8"])
def test_crafted_epoch_plan_is_refused(tmp_path, plan):
    crafted = _craft(_saved(tmp_path), meta_extra={"epoch_plan": plan})
    with pytest.raises(CheckpointError, match="epoch_plan"):
        bpcore.load_checkpoint(crafted)


@pytest.mark.parametrize("name", ["W1", "b2", "opt.0"])
def test_nan_in_a_tensor_is_a_checkpoint_error(tmp_path, name):
    path = _saved(tmp_path)
    bad = st_load(str(path))[name].copy()
    bad.flat[0] = np.nan
    with pytest.raises(CheckpointError, match=name):
        bpcore.load_checkpoint(_craft(path, {name: bad}))


@pytest.mark.parametrize("std", [1e-320, 0.0, 1e-9])
def test_degenerate_preprocessing_is_refused(tmp_path, std):
    path = _saved(tmp_path, preprocessing=Standardize((0.0,) * 4, (1.0,) * 4))
    spec = {"kind": "standardize", "mean": [0.0] * 4, "std": [std, 1.0, 1.0, 1.0]}
    with pytest.raises(CheckpointError, match="preprocessing: .*std of feature 0"):
        bpcore.load_checkpoint(_craft(path, config={"preprocessing": spec}))


def test_an_honest_checkpoint_still_loads(tmp_path):
    path = _craft(_saved(tmp_path))
    tr = bpcore.Trainer.resume(path)
    assert tr.steps == 5 and tr.epoch == 1 and tr.epoch_batch == 0


# ---- behaviour pinned to values worked out by hand ---------------------------------------------
class _Logs(bpcore.Callback):
    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, trainer, epoch, logs):
        logs["val_loss"] = self.values[epoch - 1]


@pytest.mark.parametrize("min_delta,stops_after", [(0.0, 5), (0.05, 3), (0.5, 2)])
def test_early_stopping_min_delta_is_a_required_improvement(min_delta, stops_after):
    # val_loss 1.0, 0.9, 0.88, 0.87, 0.9, ...: with min_delta 0.05 only 1.0 -> 0.9 improves
    # enough (0.88 and 0.87 are within 0.05 of 0.9), so with patience 2 it stops after epoch 3;
    # with 0 the best is 0.87 at epoch 4, stop after 6... patience 1 below: after epoch 5.
    values = [1.0, 0.9, 0.88, 0.87, 0.9, 0.95, 0.99, 1.0]
    tr = _trainer("numpy")
    X, y = _data()
    stop = bpcore.EarlyStopping("val_loss", patience=1, min_delta=min_delta,
                                restore_best=False)
    h = tr.fit(X, y, epochs=8, batch_size=40, verbose=0, validation_data=(X, y),
               callbacks=[_Logs(values), stop])
    assert h.epochs[-1] == stops_after


def test_drop_last_averages_over_the_rows_trained_on():
    X, y = _data(20)
    tr = _trainer("numpy", opt="sgd")
    tr0 = _trainer("numpy", opt="sgd")
    h = tr.fit(X, y, epochs=1, batch_size=8, verbose=0, shuffle=False, drop_last=True)
    # by hand: two batches of 8 (the last 4 rows dropped), each loss before its own update
    l1 = float(tr0.step(X[:8], y[:8]))
    l2 = float(tr0.step(X[8:16], y[8:16]))
    assert h["loss"][0] == pytest.approx((8 * l1 + 8 * l2) / 16, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5])
def test_cosine_decay_alpha_is_a_fraction_of_the_rate(alpha):
    s = optim.cosine_decay(0.2, 100, alpha=alpha)
    assert float(s(0)) == pytest.approx(0.2)
    assert float(s(100)) == pytest.approx(0.2 * alpha)
    assert float(s(500)) == pytest.approx(0.2 * alpha)
    assert float(s(50)) == pytest.approx(0.2 * (alpha + (1 - alpha) * 0.5))


def test_standardize_uses_the_population_std():
    X = np.array([[1.0], [3.0]])  # mean 2; population std 1 (ddof=1 would be sqrt(2))
    s = Standardize.fit(X)
    assert s.mean == (2.0,) and s.std == (1.0,)
    np.testing.assert_array_equal(s(X), [[-1.0], [1.0]])


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_guard_measures_growth_against_the_first_loss_on_both_paths(backend_name):
    """divergence_factor compares with the first step's loss (not the best so far), in the
    in-place and in the generic step alike, and the whole state (guard included) agrees."""
    be = _backend(backend_name)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((8, 4)), np.zeros((8, 1))
    out = []
    for inplace in (None, False):
        m = bpcore.MLP([4, 1], "identity", backend=be, dtype="float64", seed=0)
        tr = bpcore.Trainer(m, "mse", optim.sgd(1e-9), divergence_factor=3.0, inplace=inplace)
        W = np.ones((1, 4))
        losses = []
        # losses L, L/100 (the best), then 10 L/100: ten times the best, a tenth of the first
        for scale in (10.0, 1.0, np.sqrt(10.0)):
            tr.set_params([(W * scale, np.zeros(1))])
            losses.append(float(tr.step(X, y)))
        assert losses[1] == pytest.approx(losses[0] / 100) and losses[2] > 3 * losses[1]
        tr.check()  # accepted: 10x the best, but under 3x the first
        assert float(tr.state.guard.ref_loss) == losses[0] and tr.steps == 3
        tr.set_params([(W * 20.0, np.zeros(1))])  # 4x the first: refused
        tr.step(X, y)
        with pytest.raises(DivergenceError, match="grew past 3"):
            tr.check()
        out.append(tr)
    fast, slow = out
    assert fast._inplace is not None and slow._inplace is None
    for a, b in zip(_host_state(fast), _host_state(slow)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


# ---- smaller ones --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hint", [("pytorch", "'torch'"), ("Numpy", "'numpy'"),
                                       ("cuda", "'cupy'"), ("jaxx", "'jax'")])
def test_backend_names_get_a_did_you_mean(name, hint):
    with pytest.raises(bpcore.errors.BackendUnavailableError, match=f"did you mean {hint}"):
        bpcore.MLP([2, 2], backend=name)


def test_available_backends_are_probed_without_importing_them():
    import subprocess
    import sys

    code = ("import sys, bpcore; names = bpcore.backends.available(); "
            "print(names, 'torch' in sys.modules, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300).stdout
    assert out.strip().endswith("False False"), out
    assert "'numpy'" in out


def test_model_predict_refuses_rows_it_cannot_answer():
    tr = _trainer("numpy")
    X, _ = _data(6)
    X[2, 1] = np.nan
    X[4, 0] = np.inf
    with pytest.raises(bpcore.errors.ShapeError, match=r"rows \[2, 4\]"):
        tr.model.predict(X)
    assert math.isfinite(float(tr.model.predict_proba(X[:2]).sum()))


def test_side_reports_carry_the_noise_warning(tmp_path):
    """``bpcore bench --estimators`` (a side report) warns of a noisy machine as the step
    benchmark does: its rows carry the spread of their timed fits."""
    from benchmarks.report import write_side_report

    rows = [{"case": "c", "spread": s} for s in (0.5, 0.6, 0.1)]
    paths = write_side_report({"rows": rows}, {}, str(tmp_path), "estimators", "t", "i", "b")
    assert "noisy" in Path(paths[1]).read_text()
    quiet = [{"case": "c", "spread": 0.01}] * 3
    paths = write_side_report({"rows": quiet}, {}, str(tmp_path), "estimators", "t", "i", "b")
    assert "noisy" not in Path(paths[1]).read_text()


# ---- kernels chosen by the object, never by its name -------------------------------------------
def _leaky(slope):
    from bpcore.nn.activations import Activation

    def forward(Z):
        xp = bpcore._array.array_namespace(Z)
        return xp.where(Z > 0, Z, slope * Z)

    def vjp(Z, Y, D):
        xp = bpcore._array.array_namespace(Z)
        return xp.where(Z > 0, D, slope * D)

    return Activation("relu", forward, vjp, init="he")  # a built-in's name, another function


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_own_activation_named_like_a_builtin_runs_its_own_math(backend_name):
    be = _backend(backend_name)
    X, y = _data()
    states = {}
    for inplace, act in ((None, _leaky(0.3)), (False, _leaky(0.3)), (None, "relu")):
        m = bpcore.MLP([4, 8, 8, 3], act, backend=be, dtype="float64", seed=0)
        tr = bpcore.Trainer(m, "softmax_cross_entropy", optim.sgd(0.1), inplace=inplace)
        for i in range(3):
            tr.step(X[8 * i:8 * i + 8], y[8 * i:8 * i + 8])
        states[(inplace, isinstance(act, str))] = _host_state(tr)
    for a, b in zip(states[(None, False)], states[(False, False)]):  # fast path = reference
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert not np.allclose(states[(None, False)][0], states[(None, True)][0])


def test_own_loss_named_like_a_builtin_is_not_served_the_builtins_compiled_code():
    from bpcore.nn.losses import LOSSES, Loss

    builtin = LOSSES["mse"]
    doubled = Loss("mse", lambda Y, T: tuple(2 * v for v in builtin.forward(Y, T)),
                   **{k: getattr(builtin, k) for k in builtin.__dataclass_fields__
                      if k not in ("name", "forward")})
    m = bpcore.MLP([3, 2], "identity", dtype="float64", seed=0)
    X, T = np.ones((4, 3)), np.zeros((4, 2))
    v1, _ = bpcore.value_and_grad(m, X, T, loss="mse")
    v2, _ = bpcore.value_and_grad(m, X, T, loss=doubled)
    assert float(v2) == pytest.approx(2 * float(v1))


def test_model_predict_refuses_inf_inputs_that_a_saturating_layer_hides():
    """inf through tanh gives finite outputs, and so a class: the rows are refused by their
    inputs, not only by their outputs (model.predict, and so bpcore predict)."""
    m = bpcore.MLP([3, 4, 2], "tanh", dtype="float64", seed=0, task="classes")
    X = np.ones((3, 3))
    X[1, 2] = np.inf
    with pytest.raises(bpcore.errors.ShapeError, match=r"rows \[1\]"):
        m.predict(X)


def test_output_activation_of_your_own_named_softmax_is_not_taken_for_bpcores():
    """predict_proba normalises the outputs unless the output layer IS bpcore's softmax: an
    activation of your own called "softmax" (here the identity) gets normalised like logits."""
    from bpcore.nn.activations import Activation

    fake = Activation("softmax", lambda Z: Z, lambda Z, Y, D: D)
    m = bpcore.MLP([3, 4], "tanh", fake, dtype="float64", seed=0, task="classes")
    P = m.predict_proba(np.ones((2, 3)))
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
