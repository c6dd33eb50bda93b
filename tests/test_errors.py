"""Bad input: the right error type, a message naming argument, expected and given, and no
change to the model's parameters."""

from __future__ import annotations

import numpy as np
import pytest

import bpcore
from bpcore import optim
from bpcore.errors import (ConfigError, DeviceMismatchError, DTypeError, ShapeError,
                           UnknownNameError)

from .conftest import params_np
from .test_backends import _Producer

X = np.ones((4, 3))
Y = np.array([0, 1, 2, 1])

BAD_BATCHES = [
    # (x, y, error type, message parts)
    (np.ones((4, 5)), Y, ShapeError, ["x", "3 features", "(4, 5)"]),
    (np.ones(3), Y, ShapeError, ["x", "2-d", "(3,)", "reshape(1, 3)"]),
    (np.ones((4, 3, 1)), Y, ShapeError, ["x", "2-d", "(4, 3, 1)"]),
    (X, np.array([0, 1, 3, 1]), ShapeError, ["y", "label 3", "[0, 2]"]),
    (X, np.array([0, -1, 2, 1]), ShapeError, ["y", "label -1", "[0, 2]"]),
    (X, np.array([0, 1, 2]), ShapeError, ["y", "4 targets", "(3,)"]),
    (X, np.ones((4, 2)), ShapeError, ["y", "(4, 3)", "(4, 2)"]),
    (X, np.array([0.0, 1.0, 2.0, 1.0]), DTypeError, ["y", "integers", "float64"]),
    (np.ones((4, 3), dtype=np.int64), Y, DTypeError, ["x", "floating", "int64", "astype"]),
    (np.ones((4, 3), dtype=bool), Y, DTypeError, ["x", "floating", "bool"]),
    (np.ones((4, 3), dtype=np.complex128), Y, DTypeError, ["x", "floating", "complex128"]),
    (X, Y.astype(np.complex64), DTypeError, ["y", "real", "complex64"]),
    (_Producer(np.ones((4, 3)), device=(2, 1)), Y, DeviceMismatchError, ["cuda:1"]),
    ("not an array", Y, DTypeError, ["x", "str"]),
]


@pytest.mark.parametrize("x,y,err,parts", BAD_BATCHES,
                         ids=[f"{e.__name__}-{i}" for i, (_, _, e, _) in enumerate(BAD_BATCHES)])
def test_bad_batches_raise_clear_errors_and_leave_params_unchanged(backend, x, y, err, parts):
    model = bpcore.MLP([3, 5, 3], backend=backend, seed=1)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", optim.adam(0.1))
    trainer.step(X, Y)  # some optimizer state to protect as well
    before, state_before = params_np(model), trainer.opt_state
    for call in (lambda: trainer.step(x, y),
                 lambda: bpcore.value_and_grad(model, x, y, loss="softmax_cross_entropy")):
        with pytest.raises(err) as ei:
            call()
        for p in parts:
            assert p in str(ei.value), (p, str(ei.value))
    for (W, b), (W0, b0) in zip(params_np(model), before):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
    assert trainer.opt_state is state_before and trainer.steps == 1


@pytest.mark.parametrize("loss,y,parts", [
    ("mse", np.ones((4, 2)), ["y", "(4, 3)", "(4, 2)"]),
    ("binary_cross_entropy", np.full((4, 3), 2.0), ["y", "[0, 1]"]),
    ("mse", np.ones((5, 3)), ["y", "4 targets"]),
])
def test_bad_targets_for_value_losses(backend, loss, y, parts):
    model = bpcore.MLP([3, 5, 3], backend=backend)
    with pytest.raises(ShapeError) as ei:
        bpcore.value_and_grad(model, X, y, loss=loss)
    for p in parts:
        assert p in str(ei.value)


def test_targets_of_one_output_may_be_flat(backend):
    model = bpcore.MLP([3, 4, 1], backend=backend)
    value, _ = bpcore.value_and_grad(model, X, np.array([0.0, 1, 1, 0]),
                                     loss="binary_cross_entropy")
    assert np.isfinite(float(value))


@pytest.mark.parametrize("kwargs,name,parts", [
    ({"activation": "rellu"}, "activation", ["'rellu'", "relu", "tanh"]),
    ({"output_activation": "sofmax"}, "output_activation", ["'sofmax'", "softmax"]),
])
def test_unknown_activation_lists_valid_names(kwargs, name, parts):
    with pytest.raises(UnknownNameError) as ei:
        bpcore.MLP([3, 4, 2], **kwargs)
    assert str(ei.value).startswith(name)
    for p in parts:
        assert p in str(ei.value)
    assert isinstance(ei.value, KeyError)


def test_unknown_loss_and_optimizer_list_valid_names():
    model = bpcore.MLP([3, 4, 2])
    with pytest.raises(UnknownNameError, match="mse.*softmax_cross_entropy"):
        bpcore.value_and_grad(model, X, Y, loss="cross_entropy")
    with pytest.raises(UnknownNameError, match="loss.*'hinge'"):
        bpcore.Trainer(model, loss="hinge")
    with pytest.raises(UnknownNameError, match="optimizer.*'rmsprop'.*adam"):
        bpcore.Trainer(model, optimizer="rmsprop")


@pytest.mark.parametrize("sizes,parts", [
    ([3, 0, 2], ["sizes[1]", "positive", "0"]),
    ([3, -4, 2], ["sizes[1]", "-4"]),
    ([3, 2.5, 2], ["sizes[1]", "2.5"]),
    ([3], ["at least 2"]),
    (7, ["sizes", "list"]),
])
def test_bad_layer_sizes(sizes, parts):
    with pytest.raises(ConfigError) as ei:
        bpcore.MLP(sizes)
    for p in parts:
        assert p in str(ei.value)


def test_wrong_number_of_hidden_activations():
    with pytest.raises(ConfigError, match="2 names for 1 hidden"):
        bpcore.MLP([3, 4, 2], activation=["relu", "tanh"])


def test_bad_dtype_and_params():
    with pytest.raises(DTypeError, match="float16"):
        bpcore.MLP([3, 2], dtype="float16")
    m = bpcore.MLP([3, 4, 2])
    before = params_np(m)
    with pytest.raises(ShapeError, match=r"W2: expected \(2, 4\), got \(4, 2\)"):
        m.set_params([(np.ones((4, 3)), np.ones(4)), (np.ones((4, 2)), np.ones(2))])
    for (W, b), (W0, b0) in zip(params_np(m), before):
        np.testing.assert_array_equal(W, W0)


def test_errors_subclass_builtins():
    from bpcore import errors
    assert issubclass(errors.ShapeError, ValueError)
    assert issubclass(errors.DTypeError, TypeError)
    assert issubclass(errors.BackendUnavailableError, ImportError)
    assert issubclass(errors.CheckpointError, ValueError)
    assert issubclass(errors.DivergenceError, FloatingPointError)
    assert issubclass(errors.DeviceMismatchError, ValueError)
