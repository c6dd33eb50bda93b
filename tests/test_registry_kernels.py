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
    # guard refuses it (relu's kernel multiplies by its mask: inf·0 is NaN, where() gives 0)
    Dh = data.draw(hnp.arrays(np.float64, shape, elements=_finite), label="D")
    Z, D = be.asarray(Zh), be.asarray(Dh)
    with np.errstate(all="ignore"):
        Y = act.forward(Z)
        G = act.vjp(Z, Y, D)
        Zk = be.asarray(Zh.copy())
        if act.kernel.forward_ is not None:
            act.kernel.forward_(ops, Zk)
        np.testing.assert_array_equal(be.to_numpy(Zk), be.to_numpy(Y))  # (NaN == NaN here)
        if act.kernel.masked:  # the executor's backward, from the kernel's output
            mask = ops.bool_empty(shape)
            act.kernel.mask_(ops, Zk, mask)
            Dk = be.asarray(Dh.copy())
            act.kernel.backward_(ops, Dk, mask)
        else:
            Dk = D
    np.testing.assert_array_equal(be.to_numpy(Dk), be.to_numpy(G))


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
    _, want = _run("numpy", "generic", act, loss, opt)
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
    """A named optimizer with a setting the in-place update does not implement runs the
    buffered step, which runs the optimizer's own update (the spec is only the description
    the in-place kernels read): a new option of bpcore.optim is never silently dropped."""
    opt = optim.adam(1e-2)
    opt = opt._replace(spec=dict(opt.spec, amsgrad=True))
    model = bpcore.MLP(SIZES, backend="numpy", dtype="float64", seed=0)
    trainer = bpcore.Trainer(model, "mse", opt, inplace=True)
    assert type(trainer._inplace) is BufferedStep
    assert "amsgrad" in unsupported_reason(trainer)
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
