"""Written once: each registry entry's in-place kernel equals its generic form, and every
executor of the one step gives the same training run.

* Every activation entry that carries an in-place kernel (:class:`bpcore.nn.activations.
  InplaceKernel`) is held to the entry's own ``forward`` and ``vjp``, on every backend with
  in-place kernels, on hypothesis-drawn shapes and values (zeros, ties, signed zeros,
  infinities and NaN included in Z; D finite), in float64: bit for bit.
* Executor equivalence: activation × loss × optimizer (schedules, clipping, weight decay) ×
  executor (NumPy and PyTorch in place and buffered, PyTorch generic, JAX compiled), 20
  steps in float64, against the NumPy generic step, to 1e-12. (The buffered step is the one
  CUDA PyTorch and CuPy run; here it runs on the CPU, where its logic is the same.) The activations include one of the user's own
  that reuses a built-in's name ("relu", a leaky variant) and an Optimizer of the user's own
  whose spec names "adam": an executor that dispatched on names would give them the
  built-in's kernel and the run would differ.
"""

from __future__ import annotations

import numpy as np
import pytest

import bpcore
from bpcore import optim
from bpcore._array import nested_leaves
from bpcore.nn.activations import ACTIVATIONS, Activation
from bpcore.optim.schedules import cosine_decay
from bpcore.training.buffered import BufferedStep
from bpcore.optim.inplace import AdamUpdate, inplace_form
from bpcore.training.inplace import InplaceStep, unsupported_reason

from .conftest import _backend_or_skip as backend_or_skip

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

KERNEL_ENTRIES = sorted(n for n, a in ACTIVATIONS.items() if a.kernel is not None)
INPLACE_BACKENDS = ["numpy", "torch"]


def test_the_registry_carries_kernels():
    assert KERNEL_ENTRIES == ["identity", "relu"]
    # An entry of the user's own, whatever its name, has none unless given one.
    own = Activation("relu", ACTIVATIONS["leaky_relu"].forward, ACTIVATIONS["leaky_relu"].vjp)
    assert own.kernel is None


_values = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, -1e-300, 1e308, -1e308,
                     float("inf"), float("-inf"), float("nan")]),
    st.floats(-10, 10, allow_nan=False, width=64))
_finite = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, 1e308, -1e308]),
                    st.floats(-10, 10, allow_nan=False, width=64))


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
@pytest.mark.parametrize("name", KERNEL_ENTRIES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_kernel_equals_the_entrys_generic_form(backend, name, data):
    be = backend_or_skip(backend)
    ops = be.inplace_ops
    if ops is None:
        pytest.skip(f"{backend} offers no in-place kernels here")
    act = ACTIVATIONS[name]
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=2, max_side=9), label="shape")
    Zh = data.draw(hnp.arrays(np.float64, shape, elements=_values), label="Z")
    # D finite: a non-finite D makes the step's gradient non-finite on either form, and the
    # guard refuses it (NumPy's relu kernel without Numba multiplies by its mask: inf·0 is
    # NaN, where() gives 0)
    Dh = data.draw(hnp.arrays(np.float64, shape, elements=_finite), label="D")
    Z, D = be.asarray(Zh), be.asarray(Dh)
    with np.errstate(all="ignore"):
        Y = act.forward(Z)
        G = act.vjp(Z, Y, D)
        Zk = be.asarray(Zh.copy())
        if act.kernel.forward_ is not None:
            act.kernel.forward_(ops, Zk)
        np.testing.assert_array_equal(be.to_numpy(Zk), be.to_numpy(Y))  # (NaN == NaN here)
        if act.kernel.backward_ is not None:  # the executor's backward, from the output
            Dk = be.asarray(Dh.copy())
            act.kernel.backward_(ops, Dk, Zk)
        else:
            Dk = D
    got, want = be.to_numpy(Dk), be.to_numpy(G)
    # At a NaN output f' is undefined: a kernel may keep D there (PyTorch's threshold_backward
    # does), where the generic form gives 0. Such a row's loss is NaN: the step is refused.
    number = ~np.isnan(be.to_numpy(Zk))
    np.testing.assert_array_equal(got[number], want[number])
    if backend == "numpy":  # (NumPy's kernels, with Numba or without, give the generic 0)
        np.testing.assert_array_equal(got, want)


# ---- executor equivalence -------------------------------------------------------------------
def _user_relu() -> Activation:
    """The user's own "relu": leaky, with no kernel (must not run the built-in's)."""
    leaky = ACTIVATIONS["leaky_relu"]
    return Activation("relu", leaky.forward, leaky.vjp, init="he")


def _user_adam() -> optim.Optimizer:
    """An Optimizer of the user's own whose spec says "adam" but whose update is not Adam's
    (Adam with the step size halved): a fast path that trusted the spec would run Adam's."""
    inner = optim.chain(optim.scale_by_adam(), optim.scale_by_learning_rate(5e-3))
    return optim.Optimizer(inner.init, inner.update, {"name": "adam", "lr": 1e-2, "b1": 0.9,
                                                      "b2": 0.999, "eps": 1e-8,
                                                      "weight_decay": 0.0})


ACTS = {"relu": lambda: "relu", "tanh": lambda: "tanh", "user_relu": _user_relu}
OPTS = {
    "sgd_clip": (lambda: optim.sgd(0.1), 0.5),
    "nesterov_wd": (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
                    None),
    "adam_l2": (lambda: optim.adam(1e-2, weight_decay=1e-3), None),
    "adamw_cosine": (lambda: optim.adamw(cosine_decay(2e-2, 20), weight_decay=1e-1), 1.0),
    "user_adam": (_user_adam, None),
}
LOSSES = ["softmax_cross_entropy", "mse", "binary_cross_entropy"]
# "default": what the Trainer picks (the in-place step where the host reads values: NumPy,
# CPU PyTorch; the buffered step on CUDA PyTorch and CuPy); "buffered": forced where the
# in-place one would run.
EXECUTORS = [("numpy", "default"), ("numpy", "buffered"), ("torch", "default"),
             ("torch", "buffered"), ("torch", "generic"), ("jax", "generic"), ("cupy", "default")]
SIZES = (7, 13, 11, 4)
STEPS = 20


def _batches(loss: str):
    rng = np.random.default_rng(11)
    X = rng.standard_normal((STEPS, 9, SIZES[0]))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, SIZES[-1], (STEPS, 9))
    elif loss == "binary_cross_entropy":
        y = (rng.random((STEPS, 9, SIZES[-1])) > 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((STEPS, 9, SIZES[-1]))
    return X, y


def _run(backend: str, mode: str, act: str, loss: str, opt: str):
    be = backend_or_skip(backend)  # (the suite runs JAX with x64 on: tests/conftest.py)
    make, clip = OPTS[opt]
    model = bpcore.MLP(SIZES, ACTS[act](), backend=be, dtype="float64", seed=4)
    trainer = bpcore.Trainer(model, loss, make(), clip_norm=clip,
                             inplace=None if mode != "generic" else False)  # (None: where it may)
    if mode == "buffered" and trainer._inplace is not None:
        trainer._inplace = BufferedStep(trainer)  # (the CUDA executor, on the CPU)
    X, y = _batches(loss)
    for k in range(STEPS):
        trainer.step(X[k], y[k])
    trainer.check()
    st_ = trainer.state
    return trainer, [np.array(be.to_numpy(a)) for a in nested_leaves((st_.params,
                                                                      st_.opt_state))]


# (JAX with one loss: each case compiles.)
CASES = [(ex[0], ex[1], a, lo, o) for a in sorted(ACTS) for lo in LOSSES for o in sorted(OPTS)
         for ex in EXECUTORS if ex[0] != "jax" or lo == "softmax_cross_entropy"]


@pytest.mark.parametrize("backend,mode,act,loss,opt", CASES, ids=[
    f"{a}-{lo}-{o}-{be}-{mode}" for be, mode, a, lo, o in CASES])
def test_every_executor_runs_the_same_step(backend, mode, act, loss, opt):
    backend_or_skip(backend)  # (before a Trainer exists: a skip's traceback keeps its frame,
    # and a Trainer alive in it would hold bpcore's SIGINT handler for the rest of the run)
    want = _run("numpy", "generic", act, loss, opt)[1]
    trainer, got = _run(backend, mode, act, loss, opt)
    if mode != "generic":
        # The buffered paths ran where they may, and only there: never for the user's own
        # update (which need not be elementwise).
        assert (trainer._inplace is not None) == (opt != "user_adam")
        if trainer._inplace is not None:
            host = trainer.model.backend.inplace_ops.host_reads and mode == "default"
            assert type(trainer._inplace) is (InplaceStep if host else BufferedStep)
            assert getattr(trainer._inplace, "fallbacks", 0) == 0
    assert int(trainer.state.step) == STEPS
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13,
                                   err_msg=f"leaf {i} after {STEPS} steps")


def test_the_user_relu_differs_from_the_builtin():
    """(So the equivalence above would notice a built-in kernel run for the user's relu.)"""
    a = _run("numpy", "generic", "user_relu", "mse", "adam_l2")[1]
    b = _run("numpy", "generic", "relu", "mse", "adam_l2")[1]
    assert max(np.max(np.abs(x - y)) for x, y in zip(a, b)) > 1e-6


def test_a_named_optimizers_unknown_setting_is_never_ignored():
    """A named optimizer built with a setting its in-place form does not implement (a new
    option of bpcore.optim, say) carries no in-place form, so it runs the buffered step,
    which runs the optimizer's own update: a new option is never silently dropped. The
    executor dispatches on the object the optimizer carries, never on its spec's name."""
    settings = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    assert isinstance(inplace_form("adam", settings), AdamUpdate)
    assert inplace_form("adam", dict(settings, amsgrad=True)) is None
    assert inplace_form("adam", {k: v for k, v in settings.items() if k != "eps"}) is None
    # (an optimizer of bpcore.optim built by name with such a setting, as _named builds it)
    opt = optim._named("adam", [optim.scale_by_adam(), optim.scale_by_learning_rate(1e-2)],
                       **settings, amsgrad=True)
    assert opt.inplace is None and opt.spec["amsgrad"] is True
    model = bpcore.MLP(SIZES, backend="numpy", dtype="float64", seed=0)
    trainer = bpcore.Trainer(model, "mse", opt, inplace=True)
    assert type(trainer._inplace) is BufferedStep
    assert "no in-place form" in unsupported_reason(trainer)
    # (the spec is a description only: editing it changes nothing the executors run)
    edited = optim.adam(1e-2)._replace(spec=dict(optim.adam(1e-2).spec, name="sgd"))
    assert isinstance(edited.inplace, AdamUpdate)
    generic = bpcore.Trainer(bpcore.MLP(SIZES, backend="numpy", dtype="float64", seed=0),
                             "mse", opt, inplace=False)
    X, y = _batches("mse")
    for k in range(5):
        trainer.step(X[k], y[k])
        generic.step(X[k], y[k])
    for a, b in zip(nested_leaves(trainer.state[:2]), nested_leaves(generic.state[:2])):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    # (the user's own Optimizer: an update not built by name is never a buffered path's)
    assert bpcore.Trainer(model, "mse", _user_adam())._inplace is None


# ---- optimizers' in-place forms ---------------------------------------------------------------
def _forms():
    """(label, transformation carrying an in-place form, penalty or None, moments)."""
    from bpcore.sklearn import _rules

    h = _rules._Hyper(0.05, 1e-3, 0.9, 0.9, 1 - 0.9, 0.999, 1 - 0.999, 1e-8)
    out = [(f"bpcore-{name}", optim.OPTIMIZERS[name](**kw), None) for name, kw in (
        ("sgd", dict(lr=0.1)), ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
        ("sgd", dict(lr=cosine_decay(0.1, 30), momentum=0.9, nesterov=True)),
        ("adam", dict(lr=1e-2, weight_decay=1e-2)), ("adamw", dict(lr=1e-2)))]
    out += [("sklearn-sgd", _rules.sgd(h, False), _rules.l2_penalty(h.alpha)),
            ("sklearn-nesterov", _rules.sgd(h, True), _rules.l2_penalty(h.alpha)),
            ("sklearn-adam", _rules.adam(h), _rules.l2_penalty(0.0))]
    return out


FORMS = _forms()


def _ops(variant: str):
    """``(backend, in-place operations)``: ``numpy`` is the backend's own (Numba's fused
    updates where Numba is installed), ``numpy-plain`` NumPy's own kernels on it."""
    if variant == "numpy-plain":
        from bpcore.backends._ops import NumpyOps

        return backend_or_skip("numpy"), NumpyOps(np)
    if variant == "torch-own":  # PyTorch's own kernels, as on a CUDA device (no host reads)
        be = backend_or_skip("torch")
        ops = type(be.inplace_ops)(be.inplace_ops.torch)
        ops.host_reads = False
        return be, ops
    be = backend_or_skip(variant)
    return be, be.inplace_ops


OPS_VARIANTS = ["numpy", "numpy-plain", "torch"]


@pytest.mark.parametrize("backend", OPS_VARIANTS)
@pytest.mark.parametrize("label,opt,penalty", FORMS, ids=[f[0] for f in FORMS])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_an_optimizers_inplace_form_equals_its_update(backend, label, opt, penalty, data):
    """Each in-place form (bpcore's named optimizers; scikit-learn's SGD, Nesterov, Adam and
    its L2 penalty) applied to flat buffers equals the transformation's own ``update`` (and
    ``penalty``) on the same buffers seen as one layer, three steps in a row, float64."""
    from bpcore.optim.inplace import Norms

    be, ops = _ops(backend)
    form = opt.inplace
    assert form is not None
    n = data.draw(st.integers(2, 40), label="n")
    nW = data.draw(st.integers(1, n - 1), label="n_weights")
    vec = hnp.arrays(np.float64, n, elements=_finite.filter(lambda v: abs(v) < 1e6))
    p0 = data.draw(vec, label="params")
    grads = [data.draw(vec, label=f"g{k}") for k in range(3)]
    one = lambda f: [(f[:nW], f[nW:])]  # noqa: E731
    params = one(be.asarray(p0.copy()))
    state = opt.init(params)
    if state is None:  # scikit-learn's: velocities, or the moments (ms, vs)
        zeros = lambda: [(be.xp.zeros_like(W), be.xp.zeros_like(b)) for W, b in params]  # noqa
        state = zeros() if form.n_moments == 1 else (zeros(), zeros())
    p, moments = be.asarray(p0.copy()), [be.asarray(np.zeros(n)) for _ in range(form.n_moments)]
    tmp = (ops.empty((7,), p.dtype), ops.empty((7,), p.dtype))  # chunks shorter than n
    T = (None, be.asarray(np.full((3, 1), 1.0)))
    for k, gh in enumerate(grads):
        g_tree = one(be.asarray(gh.copy()))
        if penalty is not None:
            _, g_tree = penalty(be.asarray(np.float64(1.0)), g_tree, params, T)
        u, state = opt.update(g_tree, state, params, step=k)
        params = optim.apply_updates(params, u)
        g = be.asarray(gh.copy())
        if penalty is not None:
            penalty.inplace_(ops, be.asarray(np.float64(1.0)), g, p, nW, T, tmp)
        if form.l2:  # (the in-place step folds classic L2 before the form; the update has it)
            ops.axpy_(g[:nW], form.l2, p[:nW], tmp)
        with ops.quiet():
            assert form.apply_(ops, p, g, moments, k, nW, 1.0, Norms(0.0, 0.0), np.inf,
                               False, tmp)
    want = np.concatenate([be.to_numpy(a) for a in nested_leaves(params)])
    np.testing.assert_allclose(be.to_numpy(p), want, rtol=1e-12, atol=1e-14)


# ---- Numba's fused updates: NumPy's own numbers, bit for bit ---------------------------------
_any = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, 1e308, -1e308, float("inf"),
                                  float("-inf"), float("nan")]),
                 st.floats(-1e3, 1e3, allow_nan=False, width=64))


def _update_calls():
    """(label, call(ops, p, g, m, v, tmp)) for every update NumbaOps overrides, and relu's
    backward."""
    return [
        ("axpy", lambda o, p, g, m, v, t: o.axpy_(p, 0.37, g, t)),
        ("sgd", lambda o, p, g, m, v, t: o.add_scaled_(p, g.copy(), -0.1)),
        ("l2-fold", lambda o, p, g, m, v, t: o.l2_fold_(g, p, p.shape[0] // 2, 0.3,
                                                       g.dtype.type(7.0), t)),
        ("l2-fold-no-alpha", lambda o, p, g, m, v, t: o.l2_fold_(g, p, p.shape[0] // 2, 0.0,
                                                                g.dtype.type(3.0), t)),
        ("momentum", lambda o, p, g, m, v, t: o.momentum_update_(p, g, m, 0.1, 0.9, False, t)),
        ("nesterov", lambda o, p, g, m, v, t: o.momentum_update_(p, g, m, 0.1, 0.9, True, t)),
        ("velocity", lambda o, p, g, m, v, t: o.velocity_update_(p, g, m, 0.05, 0.9, False, t)),
        ("velocity-nesterov",
         lambda o, p, g, m, v, t: o.velocity_update_(p, g, m, 0.05, 0.9, True, t)),
        ("adam", lambda o, p, g, m, v, t: o.adam_update_(p, g, m, v, 1e-3, 1e-8, 0.9, 0.999,
                                                           0.0, p.shape[0] // 2, t)),
        ("adamw", lambda o, p, g, m, v, t: o.adam_update_(p, g, m, v, 3e-3, 1e-7, 0.8, 0.99,
                                                            1e-2, p.shape[0] // 2, t)),
        # (not an update, but NumPy's numbers too: D ← D·[Y > 0], here D = g and Y = p)
        ("relu-backward", lambda o, p, g, m, v, t: o.relu_backward_(g.reshape(1, -1),
                                                                    p.reshape(1, -1))),
    ]


UPDATE_CALLS = _update_calls()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("label,call", UPDATE_CALLS, ids=[c[0] for c in UPDATE_CALLS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_numba_updates_are_numpys_bit_for_bit(dtype, label, call, data):
    """NumbaOps's single-pass updates against NumpyOps's chunked ones, on the same
    hypothesis-drawn buffers (NaN, infinities, signed zeros, huge values), float64 and
    float32 (every scalar rounded to the dtype as NumPy rounds it): the same bits."""
    pytest.importorskip("numba")
    from bpcore.backends._numba import NumbaOps
    from bpcore.backends._ops import NumpyOps

    n = data.draw(st.integers(1, 40), label="n")
    vec = hnp.arrays(np.float64, n, elements=_any)
    with np.errstate(over="ignore"):  # (1e308 in float32 is inf)
        arrays = [data.draw(vec, label=k).astype(dtype) for k in ("p", "g", "m")]
        arrays.append(np.abs(data.draw(vec, label="v")).astype(dtype))
    out = []
    for ops in (NumbaOps(np), NumpyOps(np)):
        bufs = [a.copy() for a in arrays]
        tmp = (np.empty(7, dtype), np.empty(7, dtype))  # (NumPy's chunks shorter than n)
        with np.errstate(all="ignore"):
            for _ in range(2):
                call(ops, *bufs, tmp)
        out.append(bufs)
    for got, want in zip(*out):
        np.testing.assert_array_equal(got, want)  # (NaN == NaN here; -0.0 == 0.0 too)
        real = ~np.isnan(want)  # (and the sign of every zero; a NaN's sign means nothing)
        assert np.array_equal(np.signbit(got[real]), np.signbit(want[real]))


def test_the_numpy_backend_runs_numbas_updates_where_numba_is_installed(monkeypatch):
    import importlib.util

    from bpcore.backends import _numba
    from bpcore.backends._ops import NumpyOps

    be = backend_or_skip("numpy")
    if importlib.util.find_spec("numba") is None:
        assert type(be.inplace_ops) is NumpyOps
        assert "not installed" in _numba.numba_unavailable_reason()
        return
    assert isinstance(be.inplace_ops, _numba.NumbaOps)
    assert _numba._kernels() is not None, _numba.numba_unavailable_reason()
    monkeypatch.setenv("BPCORE_NUMBA", "0")  # the switch that turns them off
    assert type(_numba.numba_ops(np)) is NumpyOps
    assert _numba.numba_unavailable_reason() == "BPCORE_NUMBA=0"


def test_a_numba_that_fails_to_import_leaves_numpys_kernels(monkeypatch):
    """A Numba that is installed but does not import (built for another NumPy, say): the
    updates run NumPy's own kernels, the same numbers, and bpcore info says why."""
    import sys

    from bpcore.backends import _numba
    from bpcore.backends._ops import NumpyOps

    monkeypatch.setattr(_numba, "_KERNELS", None)
    monkeypatch.setattr(_numba, "_BROKEN", [])
    monkeypatch.setitem(sys.modules, "numba", None)  # (import numba raises ImportError)
    monkeypatch.setattr(_numba.importlib.util, "find_spec", lambda name: object())
    ops = _numba.NumbaOps(np)
    rng = np.random.default_rng(0)
    bufs = [rng.standard_normal(50) for _ in range(3)] + [rng.random(50)]
    want = [a.copy() for a in bufs]
    tmp = (np.empty(7), np.empty(7))
    ops.adam_update_(*bufs, 1e-3, 1e-8, 0.9, 0.999, 1e-2, 30, tmp)
    NumpyOps(np).adam_update_(*want, 1e-3, 1e-8, 0.9, 0.999, 1e-2, 30, tmp)
    for a, b in zip(bufs, want):
        np.testing.assert_array_equal(a, b)
    assert "numba failed to import (ModuleNotFoundError" in _numba.numba_unavailable_reason()
    assert type(_numba.numba_ops(np)) is NumpyOps


@pytest.mark.parametrize("form", ["labels", "targets"])
@pytest.mark.parametrize("variant", ["numpy", "torch", "torch-own"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_backends_softmax_xent_equals_the_entrys_kernel(form, variant, dtype, data):
    """The backend's one-pass softmax cross-entropy, which the softmax entry's kernel runs
    in place of its own operations: ``ops.softmax_xent_labels`` on integer labels and
    ``ops.softmax_xent`` on canonical targets (one-hot rows, soft rows, rows of zeros, rows
    of NaN: a label found out of range on a device). Numba's one pass per row on NumPy;
    on PyTorch's CPU tensors the same pass on their memory; PyTorch's own kernels where the
    host does not read the tensors (a CUDA device; here on the CPU, ``torch-own``). The same
    value and D as that kernel on NumPy's own operations, to round-off, and the same count
    of correct rows as :meth:`Loss.correct` (logits with ties, ±1e3, infinities and NaN)."""
    be, ops = _ops(variant)
    name = "softmax_xent_labels" if form == "labels" else "softmax_xent"
    fused = getattr(ops, name, None)
    if fused is None:
        pytest.skip(f"{variant}: no fused kernel here (Numba not installed)")
    from bpcore.backends._ops import NumpyOps

    B, C = data.draw(st.integers(1, 9), label="B"), data.draw(st.integers(1, 12), label="C")
    z = st.one_of(st.sampled_from([0.0, 1e3, -1e3, float("inf"), float("-inf"),
                                   float("nan")]), st.floats(-30, 30, width=32))
    Zh = data.draw(hnp.arrays(np.float64, (B, C), elements=z), label="Z").astype(dtype)
    yh = data.draw(hnp.arrays(np.int64, B, elements=st.integers(0, C - 1)), label="labels")
    Th = np.eye(C)[yh]
    if form == "targets":  # some rows soft, of zeros, or NaN
        for b in range(B):
            kind = data.draw(st.sampled_from(["onehot", "soft", "zeros", "nan"]), label="row")
            if kind == "soft":
                Th[b] = data.draw(hnp.arrays(np.float64, C, elements=st.sampled_from(
                    [0.0, 0.25, 0.5, 1.0])), label="soft row")
            elif kind != "onehot":
                Th[b] = 0.0 if kind == "zeros" else np.nan
    Th = Th.astype(dtype)
    loss = bpcore.LOSSES["softmax_cross_entropy"]
    kernel, plain = loss.kernel, NumpyOps(np)
    with np.errstate(all="ignore"):
        if form == "labels":
            v_want, D_want, none = kernel.labels(plain, Zh, yh, kernel.buffers(plain, Zh))
            Z, t = be.asarray(Zh), be.asarray(yh)
        else:
            plain.softmax_xent = None  # (NumPy's own operations, whatever this class adds)
            v_want, D_want, none = kernel(plain, Zh, Th, kernel.buffers(plain, Zh))
            Z, t = be.asarray(Zh), be.asarray(Th)
        count_want = float(loss.correct(Zh, Th))
        v_got, D_got, correct = fused(Z, t, ops.empty((B, C), Z.dtype))
    assert none is None  # (NumPy's own operations leave the count to the executor)
    if correct is not None:  # counted in the pass: NumPy's argmax (first maximum, first NaN)
        assert float(correct) == count_want
        assert str(be.to_numpy(correct).dtype) == dtype
    if not np.isfinite(float(v_want)):  # (inf or NaN alike: the guard refuses the step)
        assert not np.isfinite(float(v_got))
        return
    tol = 1e-12 if dtype == "float64" else 2e-6
    # (the entry's own rounding: lse - Z_y loses eps·|lse| where the logits are large, which
    # PyTorch's log-softmax, Z - m - log Σ, does not)
    big = np.abs(Zh[np.isfinite(Zh)]).max(initial=1.0)
    np.testing.assert_allclose(float(v_got), float(v_want), rtol=tol, atol=tol * big)
    np.testing.assert_allclose(be.to_numpy(D_got), D_want, rtol=tol * big, atol=tol * big)
    assert str(be.to_numpy(D_got).dtype) == dtype


@pytest.mark.parametrize("backend_name", INPLACE_BACKENDS)
def test_a_loss_of_your_own_on_labels_runs_its_own_kernel(backend_name):
    """The backend's one-pass softmax cross-entropy is the softmax entry's choice, not the
    executor's: a loss of the user's own named "softmax_cross_entropy" whose kernel computes
    something else on labels (here twice the loss) trains with that kernel, as the generic
    step does with its forward."""
    import dataclasses

    from bpcore.nn.losses import SoftmaxXentKernel

    ref = bpcore.LOSSES["softmax_cross_entropy"]
    calls = []

    class Twice(SoftmaxXentKernel):
        def labels(self, ops, Z, labels, bufs):
            calls.append(1)
            value, D, correct = super().labels(ops, Z, labels, bufs)
            ops.mul(D, 2.0, D)
            return value * 2, D, correct

    own = dataclasses.replace(ref, forward=lambda Y, T: tuple(2 * v for v in ref.forward(Y, T)),
                              kernel=Twice())
    assert own.name == ref.name
    be = backend_or_skip(backend_name)
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((12, 4)), rng.integers(0, 3, 12)
    runs = []
    for inplace in (None, False):
        model = bpcore.MLP([4, 6, 3], backend=be, dtype="float64", seed=1)
        trainer = bpcore.Trainer(model, own, optim.sgd(0.1), inplace=inplace)
        for _ in range(3):
            trainer.step(be.asarray(X), be.asarray(y))
        runs.append([be.to_numpy(a) for a in nested_leaves(model.params)])
    assert calls, "the executor did not run the loss's own kernel on labels"
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_numbas_labels_kernel_never_reads_out_of_bounds():
    """Labels are range-checked at the boundary before this kernel runs; were one out of
    range anyway, its row is NaN and so is the loss (the guard refuses the step), never a
    read or write outside the buffers."""
    be, ops = _ops("numpy")
    if getattr(ops, "softmax_xent_labels", None) is None:
        pytest.skip("Numba not installed")
    Z = np.zeros((3, 4))
    D = np.full((3, 4), 7.0)
    for bad in (4, -1, 10**6):
        value, out, _ = ops.softmax_xent_labels(Z, np.array([0, bad, 3]), D)
        assert np.isnan(value)
        assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


# ---- scikit-learn's losses: each entry's kernel against its generic form ----------------------
def _sklearn_loss_entries():
    from bpcore.sklearn._rules import _LOSSES

    return sorted((k, v) for k, v in _LOSSES.items() if v.kernel is not None)


SK_LOSSES = _sklearn_loss_entries()


def test_scikit_learns_losses_carry_kernels():
    assert [k for k, _ in SK_LOSSES] == ["identity", "logistic", "softmax"]


@pytest.mark.parametrize("variant", ["numpy", "numpy-plain", "torch", "torch-own"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,loss", SK_LOSSES, ids=[k for k, _ in SK_LOSSES])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_scikit_learns_loss_kernel_equals_its_generic_form(variant, dtype, name, loss, data):
    """The value and D of each scikit-learn loss's in-place kernel equal its generic form's
    (logits with zeros, ties, ±1e3 and NaN; 0/1 or real targets; sample weights with zeros),
    with each set of in-place operations: Numba's one-pass log losses (on NumPy, and on
    PyTorch's CPU tensors), NumPy's and PyTorch's own operations."""
    be, ops = _ops(variant)
    B = data.draw(st.integers(1, 9), label="B")
    C = 1 if name == "logistic" and data.draw(st.booleans(), label="binary") else \
        data.draw(st.integers(1, 6), label="C")
    z = st.one_of(st.sampled_from([0.0, -0.0, 1e3, -1e3, 40.0, -40.0, float("nan")]),
                  st.floats(-20, 20, allow_nan=False, width=32))
    Zh = data.draw(hnp.arrays(np.float64, (B, C), elements=z), label="Z").astype(dtype)
    if name == "identity":
        Yh = data.draw(hnp.arrays(np.float64, (B, C), elements=st.floats(-5, 5, width=32)))
    else:
        Yh = data.draw(hnp.arrays(np.float64, (B, C), elements=st.sampled_from([0.0, 1.0])))
    swh = data.draw(hnp.arrays(np.float64, (B, 1), elements=st.sampled_from([0.0, 0.5, 1.0,
                                                                              3.0])))
    Z, T = be.asarray(Zh), (be.asarray(Yh.astype(dtype)), be.asarray(swh.astype(dtype)))
    with np.errstate(all="ignore"):
        v_want, D_want = loss.forward(Z, T)
        v_got, D_got, counted = loss.kernel(ops, Z, T, loss.kernel.buffers(ops, Z))
    # (PyTorch spells 1 - x and 1/x with other kernels; Numba's one-pass form sums in
    # another order)
    exact = variant == "numpy-plain" or variant == "numpy" and getattr(
        ops, {"softmax": "softmax_log_loss", "logistic": "sigmoid_log_loss"}.get(name, ""),
        None) is None
    rtol = 0 if exact else 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(float(v_got), float(v_want), rtol=rtol, atol=0, equal_nan=True)
    # (D = sw (P - Y) cancels where P is near Y: its round-off is P's, up to rtol·sw)
    np.testing.assert_allclose(be.to_numpy(D_got), be.to_numpy(D_want), rtol=rtol,
                               atol=rtol * swh.max())
    assert counted is None  # (nothing counted in the pass: the executor asks correct)
    assert float(loss.kernel.correct(ops, Z, T)) == float(loss.correct(Z, T)) == 0.0
