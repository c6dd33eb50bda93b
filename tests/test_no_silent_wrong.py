"""Never a silent wrong answer: each case here once trained on, or reported success, quietly.

Every one must now give either the right result or a clear bpcore error, with the
parameters and optimizer state as they were.
"""

from __future__ import annotations

import numpy as np
import pytest

import bpcore
from bpcore import backends, optim
from bpcore.errors import DivergenceError, ShapeError

from .conftest import params_np


def _data(n=64, d=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, c, n)


def _snapshot(trainer):
    from bpcore._array import nested_leaves

    be = trainer.model.backend
    return ([be.to_numpy(a).copy() for a in nested_leaves(trainer.model.params)],
            [be.to_numpy(a).copy() for a in nested_leaves(trainer.opt_state)])


def _assert_same(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.cross_backend
def test_out_of_range_labels_from_any_library_never_train(backend):
    """Labels as another library's array: host ones are checked at once; device ones inside
    the step, refused there and reported by check()."""
    X, y = _data()
    for other in backends.available():
        ob = backends.get(other)
        bad = ob.asarray(np.array([0, 1, 7, 2] * 2))
        model = bpcore.MLP([5, 8, 3], backend=backend, seed=0)
        trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.01))
        trainer.step(X[:8], y[:8])
        before = _snapshot(trainer)
        try:
            trainer.step(X[:8], bad)
        except ShapeError as e:  # checked at once
            assert "class label 7 is out of range" in str(e)
        except bpcore.errors.DeviceMismatchError:
            continue  # labels on another accelerator: refused, as designed
        else:  # labels on an asynchronous device: refused inside the step
            with pytest.raises(ShapeError, match="targets were invalid"):
                trainer.check()
        _assert_same(_snapshot(trainer), before)


@pytest.mark.parametrize("dt", ["int8", ">i2", "<i4", ">i8", "int64", "uint8", ">u4", "uint64"])
def test_the_label_range_check_is_the_plain_one_for_every_integer_type(dt):
    """The boundary's one-pass range check (a negative label seen as a huge unsigned one)
    against the plain ``0 <= y < n_out``: every width, signedness and byte order, strided
    views, the extremes of each type."""
    from bpcore.nn.targets import _labels_in_range

    info = np.iinfo(np.dtype(dt))
    rng = np.random.default_rng(0)
    for n_out in (1, 2, 10, 127):
        for values in ([0], [n_out - 1], [n_out], [-1], [info.min], [info.max],
                       rng.integers(-3, n_out + 3, 40), rng.integers(0, n_out, 40)):
            v = np.array(values)
            v = v[(v >= info.min) & (v <= info.max)]
            if not v.size:
                continue
            y = v.astype(dt)
            for arr in (y, np.repeat(y, 2)[::2]):  # contiguous, and a strided view
                assert _labels_in_range(arr, n_out) == bool(
                    np.all((arr.astype(object) >= 0) & (arr.astype(object) < n_out))), \
                    (dt, n_out, arr)
    with pytest.raises(ShapeError, match="class label -1 is out of range"):
        bpcore.Trainer(bpcore.MLP([2, 3]), "softmax_cross_entropy").step(
            np.zeros((2, 2)), np.array([-1, 1], dtype=">i8"))


@pytest.mark.parametrize("inplace", [None, False])
def test_labels_of_every_integer_type_train_as_int64_ones(backend, inplace):
    """Class labels of any integer dtype, on the host or already the backend's arrays (an
    MNIST file's uint8, say): the same run as int64 labels, in every executor, and ``fit``
    and ``evaluate`` take them too. (PyTorch's in-place step raised on every dtype but
    int32/int64, its generic step on uint16/32/64: its kernels index with int64 only.)"""
    if inplace is False and backend.inplace_ops is None:
        pytest.skip(f"{backend.name}: one executor (inplace=False changes nothing)")
    X, y = _data(16)
    want = None
    dtypes = ("int64", "uint8", "int8", "int16", "uint16", "int32", "uint32", "uint64")
    if backend.compiles:  # (each label dtype compiles the step anew: the extremes only)
        dtypes = ("int64", "uint8", "uint64")
    for dt in dtypes:
        for on_device in (False, True):
            labels = y.astype(dt)
            if on_device:
                try:
                    labels = backend.asarray(labels)
                except Exception:  # (a library without this dtype: host labels only)
                    continue
            model = bpcore.MLP([5, 8, 3], backend=backend, dtype="float32", seed=0)
            trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.01),
                                     inplace=inplace)
            losses = [float(trainer.step(X, labels)) for _ in range(3)]
            trainer.check()
            got = (losses, params_np(model))
            if want is None:
                want = got
                continue
            assert got[0] == want[0], (dt, on_device)
            for (Wa, ba), (Wb, bb) in zip(got[1], want[1]):
                np.testing.assert_array_equal(Wa, Wb)
                np.testing.assert_array_equal(ba, bb)
            if dt == "uint8":
                trainer.fit(X, labels, epochs=1, batch_size=8, verbose=0)
                assert np.isfinite(trainer.evaluate(X, labels)["loss"])


def test_big_endian_data_trains_as_native(backend):
    """Arrays in the other byte order (read from a big-endian file, say): the same training
    run as native ones on every backend (PyTorch refused them; Numba's labels kernel could
    not type them)."""
    X, y = _data(16)
    runs = []
    for Xs, ys in ((X, y), (X.astype(">f8"), y.astype(">i4"))):
        model = bpcore.MLP([5, 8, 3], backend=backend, dtype="float64", seed=0)
        trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.01))
        for _ in range(3):
            trainer.step(Xs, ys)
        trainer.check()
        runs.append(params_np(model))
    for (Wa, ba), (Wb, bb) in zip(*runs):
        np.testing.assert_array_equal(Wa, Wb)
        np.testing.assert_array_equal(ba, bb)


def test_negative_or_nan_targets_are_refused(backend):
    X, y = _data(8)
    soft = np.full((8, 3), 1 / 3)
    soft[0] = [1.2, -0.2, 0.0]
    cases = [("softmax_cross_entropy", soft, "must be >= 0"),
             ("mse", np.where(np.arange(24).reshape(8, 3) == 5, np.nan, 0.0), "NaN or inf"),
             ("binary_cross_entropy", np.full((8, 3), 1.5), "[0, 1]")]
    for loss, target, msg in cases:
        model = bpcore.MLP([5, 4, 3], backend=backend, seed=0)
        trainer = bpcore.Trainer(model, loss, optim.sgd(0.1))
        before = _snapshot(trainer)
        device_target = backend.asarray(target)
        try:
            trainer.step(X, device_target)
        except ShapeError as e:
            assert msg in str(e)
        else:
            assert backend.asynchronous, "a synchronous backend must check host data at once"
            with pytest.raises(ShapeError, match="targets were invalid"):
                trainer.check()
        _assert_same(_snapshot(trainer), before)


@pytest.mark.parametrize("make_opt,why", [
    (lambda: optim.adam(1e6), "grew past"),
    (lambda: optim.sgd(3e38), "not finite"),
])
def test_divergence_keeps_finite_last_good_parameters(backend, make_opt, why):
    X, y = _data(200)
    model = bpcore.MLP([5, 16, 3], backend=backend, seed=0)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", make_opt())
    snapshots = []
    for epoch in range(20):
        for i in range(0, 200, 50):
            snapshots.append(_snapshot(trainer))
            trainer.step(X[i:i + 50], y[i:i + 50])
        if int(trainer.guard.bad_step):
            break
    with pytest.raises(DivergenceError, match=why) as err:
        trainer.check()
    bad = int(trainer.guard.bad_step)
    assert f"after step {bad - 1}" in str(err.value)
    _assert_same(_snapshot(trainer), snapshots[bad - 1])  # the state before the bad step
    assert all(np.all(np.isfinite(a)) for a in _snapshot(trainer)[0])


def test_fit_reports_divergence_instead_of_success(backend):
    X, y = _data(200)
    model = bpcore.MLP([5, 16, 3], backend=backend, seed=0)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(1e6))
    with pytest.raises(DivergenceError):
        trainer.fit(X, y, epochs=20, batch_size=50, verbose=0)
    assert all(np.all(np.isfinite(W)) for W, _ in params_np(model))


def test_the_growth_limit_is_configurable():
    X, y = _data(200)
    trainer = bpcore.Trainer(bpcore.MLP([5, 16, 2], seed=0), "mse", optim.sgd(3.0),
                             divergence_factor=10)
    with pytest.raises(DivergenceError, match="grew past 10 times"):
        for _ in range(50):  # far too large a step for this regression: the loss oscillates up
            trainer.step(X, X[:, :2])
            trainer.check()
    for bad in (1.0, 0, -3, float("inf"), "big", True):
        with pytest.raises(bpcore.errors.ConfigError, match="divergence_factor"):
            bpcore.Trainer(bpcore.MLP([5, 3]), divergence_factor=bad)
    trainer = bpcore.Trainer(bpcore.MLP([5, 16, 3], seed=0), "softmax_cross_entropy",
                             optim.adam(1e6), divergence_factor=None)
    for _ in range(3):
        trainer.step(X[:50], y[:50])
    trainer.check()  # huge but finite losses pass when the limit is off


def test_the_reference_loss_survives_a_checkpoint(tmp_path):
    X, y = _data(64)
    trainer = bpcore.Trainer(bpcore.MLP([5, 8, 3], seed=0), "softmax_cross_entropy",
                             optim.sgd(0.1))
    trainer.fit(X, y, epochs=1, batch_size=16, verbose=0)
    ref = float(trainer.guard.ref_loss)
    trainer.save(tmp_path / "c.safetensors")
    resumed = bpcore.Trainer.resume(tmp_path / "c.safetensors")
    assert float(resumed.guard.ref_loss) == pytest.approx(ref)
    assert resumed.divergence_factor == trainer.divergence_factor


@pytest.mark.parametrize("kw", [dict(epochs=2.5), dict(batch_size=2.5), dict(epochs="3"),
                                dict(batch_size=True), dict(epochs=-1), dict(batch_size=0)])
def test_fit_settings_must_be_whole_numbers(kw):
    trainer = bpcore.Trainer(bpcore.MLP([3, 2]), "mse")
    before = _snapshot(trainer)
    with pytest.raises(bpcore.errors.ConfigError, match=next(iter(kw))):
        trainer.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0, **kw)
    _assert_same(_snapshot(trainer), before)
    trainer.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=np.int64(1), verbose=0)


def test_early_stopping_without_its_metric_fails_before_any_step():
    X, y = _data(32)
    trainer = bpcore.Trainer(bpcore.MLP([5, 4, 3]), "softmax_cross_entropy", optim.sgd(0.1))
    before = _snapshot(trainer)
    with pytest.raises(bpcore.errors.ConfigError, match="val_loss.*validation_data"):
        trainer.fit(X, y, epochs=3, callbacks=[bpcore.EarlyStopping("val_loss")], verbose=0)
    _assert_same(_snapshot(trainer), before)
    assert trainer.steps == 0


def test_bfloat16_inputs_are_widened_exactly(backend):
    torch = pytest.importorskip("torch")
    model = bpcore.MLP([3, 2], backend=backend, seed=0)
    x = torch.tensor([[1.5, -0.25, 3.0], [0.0, 2.0, -1.0]], dtype=torch.bfloat16)
    want = backend.to_numpy(model(np.asarray(x.float())))
    np.testing.assert_array_equal(backend.to_numpy(model(x)), want)


def test_dtype_objects_are_accepted_like_their_names():
    torch = pytest.importorskip("torch")
    for dt in (np.float64, np.dtype("float64"), torch.float64, "float64"):
        assert bpcore.MLP([3, 2], dtype=dt).dtype_name == "float64"
    for dt in (np.float32, torch.float32):
        assert bpcore.MLP([3, 2], dtype=dt).dtype_name == "float32"
    with pytest.raises(bpcore.errors.DTypeError):
        bpcore.MLP([3, 2], dtype=np.int32)


def test_an_activation_typo_is_an_error_even_without_hidden_layers():
    with pytest.raises(bpcore.errors.UnknownNameError, match="relux"):
        bpcore.MLP([2, 3], activation="relux")


# ---- what a new user reaches for ---------------------------------------------------------
def test_a_pandas_dataframe_is_accepted_as_x():
    pd = pytest.importorskip("pandas")
    X, y = _data(40)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(5)])
    a = bpcore.Trainer(bpcore.MLP([5, 4, 3], seed=0), "softmax_cross_entropy", optim.sgd(0.1))
    b = bpcore.Trainer(bpcore.MLP([5, 4, 3], seed=0), "softmax_cross_entropy", optim.sgd(0.1))
    ha = a.fit(df, pd.Series(y), epochs=2, batch_size=8, verbose=0)
    hb = b.fit(X, y, epochs=2, batch_size=8, verbose=0)
    assert ha["loss"] == hb["loss"]
    with pytest.raises(bpcore.errors.DTypeError, match="DataFrame"):
        a.model(pd.DataFrame({"a": ["x", "y"], "b": [1, 2], "c": [1, 2], "d": [1, 2],
                              "e": [1, 2]}))


def test_predict_and_predict_proba_give_numpy_on_every_backend(backend):
    X, _ = _data(60)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)  # learnable
    model = bpcore.MLP([5, 8, 3], backend=backend, seed=0)
    with pytest.raises(bpcore.errors.ConfigError, match="does not know what it predicts"):
        model.predict(X)
    bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.05)).fit(X, y, epochs=20,
                                                                          verbose=0)
    P = model.predict_proba(X, batch_size=7)
    assert isinstance(P, np.ndarray) and P.shape == (60, 3)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-6)
    logits = backend.to_numpy(model(X)).astype(np.float64)
    pred = model.predict(X)
    assert isinstance(pred, np.ndarray) and pred.dtype == np.int64
    np.testing.assert_array_equal(pred, logits.argmax(axis=1))
    assert np.mean(pred == y) > 0.8
    binary = bpcore.MLP([5, 4, 2], backend=backend, seed=0, task="binary")
    Pb = binary.predict_proba(X)
    np.testing.assert_allclose(Pb, 1 / (1 + np.exp(-backend.to_numpy(binary(X)).astype(float))),
                               rtol=1e-5)
    np.testing.assert_array_equal(binary.predict(X), (Pb > 0.5).astype(np.int64))
    reg = bpcore.MLP([5, 2], backend=backend, task="values")
    np.testing.assert_array_equal(reg.predict(X), backend.to_numpy(reg(X)))
    with pytest.raises(bpcore.errors.ConfigError, match="no probabilities"):
        reg.predict_proba(X)


def test_a_loaded_classifier_knows_its_task(tmp_path):
    X, y = _data(30)
    t = bpcore.Trainer(bpcore.MLP([5, 4, 3], seed=0), "softmax_cross_entropy", "adam")
    t.save(tmp_path / "c.safetensors")
    np.testing.assert_array_equal(bpcore.load(tmp_path / "c.safetensors").predict(X),
                                  t.model.predict(X))


def test_validation_split_holds_out_the_last_rows():
    X, y = _data(50)
    a = bpcore.Trainer(bpcore.MLP([5, 4, 3], seed=0), "softmax_cross_entropy", optim.sgd(0.1))
    b = bpcore.Trainer(bpcore.MLP([5, 4, 3], seed=0), "softmax_cross_entropy", optim.sgd(0.1))
    ha = a.fit(X, y, epochs=2, batch_size=8, validation_split=0.2, verbose=0)
    hb = b.fit(X[:40], y[:40], epochs=2, batch_size=8, validation_data=(X[40:], y[40:]),
               verbose=0)
    assert ha["val_loss"] == hb["val_loss"] and ha["loss"] == hb["loss"]
    for bad in (0, 1, 1.5, -0.1, "0.2", True, 0.001):
        with pytest.raises(bpcore.errors.ConfigError, match="validation_split"):
            a.fit(X, y, epochs=1, validation_split=bad, verbose=0)
    with pytest.raises(bpcore.errors.ConfigError, match="not both"):
        a.fit(X, y, epochs=1, validation_split=0.2, validation_data=(X, y), verbose=0)


def test_evaluation_refuses_out_of_range_labels_on_any_backend(backend):
    X, y = _data(16)
    trainer = bpcore.Trainer(bpcore.MLP([5, 4, 3], backend=backend), "softmax_cross_entropy")
    bad = backend.asarray(np.array([0, 1, 5, 2] * 4))
    with pytest.raises(ShapeError, match="out of range|invalid targets"):
        trainer.evaluate(X, bad)
    with pytest.raises(ShapeError, match="out of range|invalid targets"):
        trainer.fit(X, y, epochs=1, validation_data=(X, bad), verbose=0)
    assert trainer.steps == 0
