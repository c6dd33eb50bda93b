"""The buffered executors against the generic step, on the same inputs: the in-place step
(bpcore.training.inplace: NumPy, PyTorch on the CPU) and the buffered step it overrides
(bpcore.training.buffered: what CUDA PyTorch and CuPy run, and here on the CPU too).

Every accepted and every refused step must leave the same state (to float64 round-off), for
each optimizer, activation, loss and backend that offers in-place operations; and the fast
path must actually run (no silent fallback on ordinary inputs).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import bpcore
from bpcore import optim
from bpcore.errors import ConfigError, DivergenceError, ShapeError
from bpcore.optim.schedules import cosine_decay

from bpcore.training.buffered import BufferedStep
from bpcore.training.inplace import InplaceStep

from .conftest import _backend_or_skip as backend_or_skip

INPLACE_BACKENDS = ["numpy", "torch"]
# (backend, executor): "default" is what the Trainer picks (the in-place step on the CPU, the
# buffered step on CUDA); "buffered" forces the buffered step where the in-place one would run.
EXECUTORS = [("numpy", "default"), ("numpy", "buffered"), ("torch", "default"),
             ("torch", "buffered"), ("cupy", "default")]

OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.05),
    "sgd_wd": lambda: optim.sgd(0.05, weight_decay=1e-2),
    "momentum": lambda: optim.momentum(0.05, 0.9),
    "nesterov_wd": lambda: optim.sgd(0.05, momentum=0.8, nesterov=True, weight_decay=1e-3),
    "adam": lambda: optim.adam(1e-2),
    "adam_l2": lambda: optim.adam(1e-2, weight_decay=1e-2),
    "adamw": lambda: optim.adamw(1e-2, weight_decay=1e-1),
    "sgd_cosine": lambda: optim.sgd(cosine_decay(0.1, 20)),
}


def _pair(backend, mode, opt, *, sizes=(6, 16, 12, 4), act="relu",
          loss="softmax_cross_entropy", clip=None, **kw):
    be = backend_or_skip(backend)
    if be.inplace_ops is None:
        pytest.skip(f"{backend} offers no in-place kernels here")
    out = []
    for inplace in (True, False):
        m = bpcore.MLP(list(sizes), act, backend=be, dtype="float64", seed=3)
        out.append(bpcore.Trainer(m, loss, OPTIMIZERS[opt](), clip_norm=clip, inplace=inplace,
                                  **kw))
    assert out[0].inplace and not out[1].inplace
    _force(out[0], mode)
    return out


def _force(tr, mode):
    """Make ``tr`` run the buffered step where ``mode`` says so (and check what runs)."""
    if mode == "buffered":
        tr._inplace = BufferedStep(tr)
    want = InplaceStep if tr.model.backend.inplace_ops.host_reads and mode != "buffered" \
        else BufferedStep
    assert type(tr._inplace) is want
    return tr


def _data(n, sizes, loss, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, sizes[0]))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, sizes[-1], n)
    elif loss == "binary_cross_entropy":
        y = (rng.random((n, sizes[-1])) > 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((n, sizes[-1]))
    return X, y


def _rebuild(tr, optimizer, inplace, mode):
    """A new Trainer on the same model with another optimizer, carrying the state over (the
    way to change an optimizer: a Trainer's own is fixed)."""
    new = bpcore.Trainer(tr.model, tr.loss, optimizer, inplace=inplace)
    if inplace:
        _force(new, mode)
    new.state = tr.state
    return new


def _host(tr):
    be = tr.model.backend
    leaves = bpcore._array.nested_leaves((tr.state.params, tr.state.opt_state))
    return [np.array(be.to_numpy(a)) for a in leaves]


def _assert_same_state(a, b, rtol=1e-12):
    for x, y in zip(_host(a), _host(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-14)
    for f in ("step", "epoch"):
        assert int(getattr(a.state, f)) == int(getattr(b.state, f))
    for f in ("bad_step", "reason"):
        assert int(getattr(a.state.guard, f)) == int(getattr(b.state.guard, f))


@pytest.mark.parametrize("backend,mode", EXECUTORS)
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_same_steps_as_generic(backend, mode, opt):
    fast, ref = _pair(backend, mode, opt)
    for i in range(12):
        X, y = _data(8 + (i % 3), fast.model.sizes, "softmax_cross_entropy", seed=i)
        la, lb = float(fast.step(X, y)), float(ref.step(X, y))
        assert la == pytest.approx(lb, rel=1e-12)
    _assert_same_state(fast, ref)
    assert getattr(fast._inplace, "fallbacks", 0) == 0


@pytest.mark.parametrize("backend,mode", EXECUTORS)
@pytest.mark.parametrize("act,loss", [("tanh", "mse"), ("sigmoid", "binary_cross_entropy"),
                                      ("gelu", "softmax_cross_entropy"), ("relu", "mse")])
def test_generic_activations_and_losses(backend, mode, act, loss):
    fast, ref = _pair(backend, mode, "adam", act=act, loss=loss, clip=0.5)
    for i in range(6):
        X, y = _data(10, fast.model.sizes, loss, seed=i)
        fast.step(X, y), ref.step(X, y)
    _assert_same_state(fast, ref)


@pytest.mark.parametrize("backend,mode", EXECUTORS)
def test_fit_same_history(backend, mode):
    fast, ref = _pair(backend, mode, "nesterov_wd")
    X, y = _data(100, fast.model.sizes, "softmax_cross_entropy")
    ha = fast.fit(X, y, epochs=3, batch_size=32, verbose=0)  # a last, smaller batch too
    hb = ref.fit(X, y, epochs=3, batch_size=32, verbose=0)
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-12)
    _assert_same_state(fast, ref)


@pytest.mark.parametrize("backend,mode", EXECUTORS)
@pytest.mark.parametrize("bad", ["nan_x", "inf_x", "huge_lr", "label", "grew"])
def test_refused_steps_change_nothing(backend, mode, bad):
    opt = {"grew": "adamw", "huge_lr": "adam"}.get(bad, "momentum")
    fast, ref = _pair(backend, mode, opt)
    X, y = _data(16, fast.model.sizes, "softmax_cross_entropy")
    for tr in (fast, ref):
        tr.step(X, y)
    if bad == "huge_lr":  # finite gradients, an update (~lr) that could overflow a parameter
        fast, ref = (_rebuild(tr, optim.adam(1e200), inplace, mode) for tr, inplace in
                     ((fast, True), (ref, False)))
    before = _host(fast)
    Xb = X.copy()
    yb = y
    if bad == "nan_x":
        Xb[3, 1] = np.nan
    elif bad == "inf_x":
        Xb[0, 0] = np.inf
    elif bad == "grew":
        Xb = X * 1e6
    elif bad == "label":
        be = fast.model.backend
        yb = be.asarray(np.where(np.arange(16) == 5, 99, y))
    for tr in (fast, ref):
        if bad == "label" and not tr.model.backend.asynchronous:
            # host labels are checked at the boundary; feed the prepared, invalid targets
            xb, T = tr.prepare_batch(X, y)
            T[5, :] = math.nan
            tr.step_prepared(xb, T)
        else:
            tr.step(Xb, yb)
    _assert_same_state(fast, ref)
    for a, b in zip(before, _host(fast)):
        np.testing.assert_array_equal(a, b)
    err = ShapeError if bad == "label" else DivergenceError
    for tr in (fast, ref):
        with pytest.raises(err):
            tr.check()


@pytest.mark.parametrize("backend,mode", EXECUTORS)
def test_state_replaced_from_outside_is_adopted(backend, mode):
    fast, ref = _pair(backend, mode, "adam")
    X, y = _data(12, fast.model.sizes, "softmax_cross_entropy")
    for tr in (fast, ref):
        tr.step(X, y)
        tr.set_params([(2 * W, b) for W, b in tr.model.copy_params()])
        tr.reset_guard()
        tr.step(X, y)
    _assert_same_state(fast, ref)
    # a state handed in whole (a resumed checkpoint, say) is copied into the buffers
    fast.state = ref.state
    fast.step(X, y), ref.step(X, y)
    _assert_same_state(fast, ref)


@pytest.mark.parametrize("backend,mode", EXECUTORS)
def test_inconsistent_adam_state_runs_generic(backend, mode):
    fast, ref = _pair(backend, mode, "adam")
    X, y = _data(12, fast.model.sizes, "softmax_cross_entropy")
    for tr in (fast, ref):
        tr.step(X, y)
        mu, nu = tr.state.opt_state[0]
        xp = tr.model.backend.xp
        nu = [(-xp.ones_like(a), -xp.ones_like(b)) for a, b in nu]  # impossible: nu < 0
        tr.state = tr.state._replace(opt_state=(type(tr.state.opt_state[0])(mu, nu),
                                                tr.state.opt_state[1]))
        tr.step(X, y)
    if type(fast._inplace) is InplaceStep:  # (no proof possible: the buffered step ran)
        assert fast._inplace.fallbacks >= 1
    _assert_same_state(fast, ref)
    with pytest.raises(DivergenceError):
        fast.check()


def test_snapshots_do_not_change():
    be = backend_or_skip("numpy")
    m = bpcore.MLP([4, 8, 3], backend=be, seed=0)
    tr = bpcore.Trainer(m, "softmax_cross_entropy", optim.sgd(0.5))
    assert tr.inplace
    X, y = _data(8, m.sizes, "softmax_cross_entropy")
    sd, cp = m.state_dict(), m.copy_params()
    sd0 = {k: v.copy() for k, v in sd.items()}
    tr.step(X, y)
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd0[k])
    assert not np.array_equal(cp[0][0], m.params[0][0])


def test_a_trainers_optimizer_and_guard_are_fixed():
    """Assigning them after construction would be ignored by a compiled or in-place step:
    a silent wrong answer. It is an error that says what to do instead."""
    be = backend_or_skip("numpy")
    tr = bpcore.Trainer(bpcore.MLP([4, 8, 3], backend=be), "softmax_cross_entropy", "sgd")
    for name, value in (("optimizer", optim.adam(1e-3)), ("base_optimizer", optim.sgd(1.0)),
                        ("loss", "mse"), ("clip_norm", 1.0), ("check_finite", False),
                        ("divergence_factor", None)):
        with pytest.raises(AttributeError, match="new Trainer"):
            setattr(tr, name, value)
    tr.stop_training = True  # what callbacks set stays settable


def test_inplace_true_says_why_not():
    be = backend_or_skip("numpy")
    m = bpcore.MLP([4, 8, 3], backend=be)
    custom = optim.chain(optim.scale_by_learning_rate(0.1))
    with pytest.raises(ConfigError, match="named optimizers"):
        bpcore.Trainer(m, "softmax_cross_entropy", custom, inplace=True)
    assert not bpcore.Trainer(m, "softmax_cross_entropy", custom).inplace
    with pytest.raises(ConfigError, match="inplace"):
        bpcore.Trainer(m, "softmax_cross_entropy", "sgd", inplace="yes")


def test_steady_state_step_allocates_nothing_model_sized():
    import tracemalloc

    be = backend_or_skip("numpy")
    m = bpcore.MLP([64, 1024, 1024, 10], backend=be, seed=0)
    tr = bpcore.Trainer(m, "softmax_cross_entropy", optim.adam(1e-3))
    X, y = _data(32, m.sizes, "softmax_cross_entropy")
    xb, T = tr.prepare_batch(X, y)
    for _ in range(3):
        tr.step_prepared(xb, T)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(5):
        tr.step_prepared(xb, T)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    # Only the small output-sized arrays of the loss (32 x 10) and Python objects: less than
    # half of one hidden activation (32 x 1024 doubles), let alone a weight matrix.
    activation = 32 * 1024 * 8
    assert peak < activation / 2, (peak, activation)


@pytest.mark.parametrize("backend,mode", EXECUTORS)
def test_mixed_activations(backend, mode):
    """A relu layer after a generic one and before one: the error buffers' reuse."""
    fast, ref = _pair(backend, mode, "momentum", sizes=(5, 12, 9, 7, 3), act=["tanh", "relu", "gelu"])
    for i in range(5):
        X, y = _data(9, fast.model.sizes, "softmax_cross_entropy", seed=i)
        fast.step(X, y), ref.step(X, y)
    _assert_same_state(fast, ref)


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch", "array_api_strict"])
def test_labels_and_one_hot_rows_give_the_same_step(backend):
    """Trainer.step passes class labels into the step as they are (fused on numpy/torch,
    one-hot inside the compiled step on JAX); one-hot rows take the canonical path."""
    be = backend_or_skip(backend)
    out = []
    for as_rows in (False, True):
        m = bpcore.MLP([6, 10, 4], backend=be, dtype="float64", seed=1)
        tr = bpcore.Trainer(m, "softmax_cross_entropy", optim.adam(1e-2))
        for i in range(4):
            X, y = _data(7, m.sizes, "softmax_cross_entropy", seed=i)
            tr.step(X, np.eye(4)[y] if as_rows else be.asarray(y))
        out.append(tr)
    _assert_same_state(*out)


def test_jax_donates_the_old_state_without_the_guard_unless_inplace_false():
    be = backend_or_skip("jax")
    X, y = _data(8, (6, 10, 4), "softmax_cross_entropy")
    guarded = bpcore.Trainer(bpcore.MLP([6, 10, 4], backend=be, seed=0),
                             "softmax_cross_entropy", optim.sgd(0.1))
    kept = guarded.model.params[0][0]
    guarded.step(X, y)
    assert not guarded.inplace and not kept.is_deleted()  # the guard needs the old state
    with pytest.raises(ConfigError, match="check_finite=False"):
        bpcore.Trainer(guarded.model, "softmax_cross_entropy", "sgd", inplace=True)
    m = bpcore.MLP([6, 10, 4], backend=be, seed=0)
    tr = bpcore.Trainer(m, "softmax_cross_entropy", optim.sgd(0.1), check_finite=False)
    assert tr.inplace
    old = m.params[0][0]
    snapshot = m.copy_params()
    tr.step(X, y)
    assert old.is_deleted()
    np.testing.assert_array_equal(np.asarray(snapshot[0][0]), np.asarray(snapshot[0][0]))
    m2 = bpcore.MLP([6, 10, 4], backend=be, seed=0)
    tr2 = bpcore.Trainer(m2, "softmax_cross_entropy", optim.sgd(0.1), inplace=False,
                         check_finite=False)
    old2 = m2.params[0][0]
    tr2.step(X, y)
    assert not tr2.inplace and not old2.is_deleted()
    np.testing.assert_allclose(np.asarray(m.params[0][0]), np.asarray(m2.params[0][0]))


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
def test_relu_kernel_keeps_nan_and_zeroes_minus_inf_as_the_generic_one(backend):
    be = backend_or_skip(backend)
    if be.inplace_ops is None:
        pytest.skip(f"{backend} offers no in-place kernels here")
    values = np.array([[np.nan, -np.inf, -1.0, -0.0, 0.0, 2.5, np.inf]], dtype=np.float32)
    Z = be.asarray(values.copy())
    be.inplace_ops.relu_(Z)
    want = be.to_numpy(bpcore.ACTIVATIONS["relu"].forward(be.asarray(values)))
    np.testing.assert_array_equal(be.to_numpy(Z), want)


# ---- the device path on the CPU ------------------------------------------------------------
def _numpy_as_a_device():
    """The numpy backend with CuPy's in-place operations (``CupyOps`` on NumPy, which spells
    its reductions the same way) and ``host_reads`` False: the Trainer then runs the buffered
    step exactly as on a GPU (labels turned into one-hot rows on the device, no host read),
    so the CuPy adapter's logic is tested where no GPU is."""
    import dataclasses

    be = backend_or_skip("numpy")
    ops = bpcore.backends._ops.CupyOps(np)
    assert not ops.host_reads
    return dataclasses.replace(be, name="numpy-as-device", inplace_ops=ops)


@pytest.mark.parametrize("opt", ["adam", "nesterov_wd", "sgd_cosine"])
@pytest.mark.parametrize("act,loss", [("relu", "softmax_cross_entropy"),
                                      ("tanh", "binary_cross_entropy")])
def test_cupy_ops_run_the_buffered_step_as_on_a_gpu(opt, act, loss):
    be = _numpy_as_a_device()
    runs = []
    for inplace in (None, False):
        m = bpcore.MLP([6, 16, 12, 4], act, backend=be, dtype="float64", seed=3)
        tr = bpcore.Trainer(m, loss, OPTIMIZERS[opt](), inplace=inplace)
        assert (type(tr._inplace) is BufferedStep) == (inplace is None)
        for i in range(8):
            X, y = _data(9, m.sizes, loss, seed=i)
            tr.step(X, y)
        xb, T = tr.prepare_batch(*_data(16, m.sizes, loss, seed=99))
        T[5, :] = math.nan  # (a label out of range on a device arrives as a row of NaN)
        tr.step_prepared(xb, T)  # refused on the device: nothing changes but the guard
        runs.append(tr)
    _assert_same_state(*runs)
    for tr in runs:
        assert int(tr.state.guard.bad_step) == 9
        with pytest.raises(ShapeError):
            tr.check()


def test_cupy_ops_run_the_estimators_as_on_a_gpu():
    """bpcore.sklearn on the same stand-in: the buffered step with CuPy's operations fits
    scikit-learn's model (adam, early stopping, sample weights)."""
    sknn = pytest.importorskip("sklearn.neural_network")
    from bpcore.sklearn import MLPClassifier

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((120, 5)), rng.integers(0, 3, 120)
    sw = rng.uniform(0.5, 2.0, 120)
    kw = dict(hidden_layer_sizes=(9,), max_iter=5, batch_size=16, random_state=0,
              early_stopping=True, n_iter_no_change=100, learning_rate_init=0.02)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = sknn.MLPClassifier(**kw).fit(X, y, sample_weight=sw)
        bp = MLPClassifier(backend=_numpy_as_a_device(), **kw).fit(X, y, sample_weight=sw)
    for a, b in zip(sk.coefs_ + sk.intercepts_, bp.coefs_ + bp.intercepts_):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend,mode", EXECUTORS)
def test_unguarded_steps_match_too(backend, mode):
    """check_finite=False: every step applied as computed (the buffered step copies the new
    state into its buffers instead of selecting it)."""
    fast, ref = _pair(backend, mode, "adamw", check_finite=False)
    for i in range(6):
        X, y = _data(10, fast.model.sizes, "softmax_cross_entropy", seed=i)
        fast.step(X, y), ref.step(X, y)
    _assert_same_state(fast, ref)
