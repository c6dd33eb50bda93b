"""Training state and configuration are plain data: one step counter, JSON that round-trips
through the registries, checkpoints that are exactly the state's tensors plus that JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bpcore
from bpcore import optim
from bpcore._array import nested_leaves
from bpcore.io.config import TrainConfig
from bpcore.errors import CheckpointError, ConfigError

OPTS = [optim.sgd(0.1), optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        optim.momentum(0.05, 0.8), optim.adam(1e-3), optim.adamw(optim.cosine_decay(1e-2, 50)),
        optim.adam(optim.step_decay(0.1, 10, 0.5), b1=0.8), optim.sgd(optim.constant(0.2))]


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: json.dumps(o.spec)[:60])
def test_optimizer_specs_round_trip_through_the_registry(opt):
    spec = json.loads(json.dumps(opt.spec))  # JSON all the way
    again = optim.from_spec(spec)
    assert again.spec == opt.spec
    params = [(np.ones((2, 3)), np.zeros(2))]
    grads = [(np.full((2, 3), 0.5), np.full(2, -0.25))]
    s1, s2 = opt.init(params), again.init(params)
    for i in range(3):
        u1, s1 = opt.update(grads, s1, params, step=i)
        u2, s2 = again.update(grads, s2, params, step=i)
        for a, b in zip(nested_leaves(u1), nested_leaves(u2)):
            np.testing.assert_array_equal(a, b)


def test_momentum_is_sgd_with_momentum_by_spec():
    assert optim.momentum(0.05, 0.8).spec == optim.sgd(0.05, momentum=0.8).spec
    assert optim.momentum(0.05, 0.8).spec["name"] == "sgd"


def test_a_custom_learning_rate_function_has_no_spec():
    assert optim.sgd(lambda step: 0.1).spec is None
    t = bpcore.Trainer(bpcore.MLP([3, 2]), "mse", optim.sgd(lambda step: 0.1))
    assert TrainConfig.of(t).optimizer is None


def test_one_step_counter():
    X = np.random.default_rng(0).standard_normal((16, 3))
    t = bpcore.Trainer(bpcore.MLP([3, 4, 2]), "mse", optim.adam(optim.cosine_decay(0.01, 5)))
    for _ in range(7):
        t.step(X, X[:, :2])
    assert t.steps == 7 and int(t.state.step) == 7
    shapes = {a.shape for a in nested_leaves(t.state.opt_state)}
    assert shapes <= {(4, 3), (4,), (2, 4), (2,)}  # only moments: no count of its own


def test_train_config_round_trips_and_rebuilds(tmp_path):
    t = bpcore.Trainer(bpcore.MLP([3, 5, 2], ["tanh"], dtype="float64"), "softmax_cross_entropy",
                       optim.adamw(optim.cosine_decay(1e-2, 50)), clip_norm=2.0,
                       divergence_factor=100)
    config = TrainConfig.of(t)
    back = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    model = back.build_model("numpy")
    assert model.sizes == [3, 5, 2] and model.activation_names == ["tanh", "identity"]
    assert model.dtype_name == "float64" and model.task == "classes"
    assert back.build_optimizer().spec == t.base_optimizer.spec
    for bad in ([1], {"sizes": [3, 2]}, {**config.to_dict(), "loss": "eval"},
                {**config.to_dict(), "activations": ["os.system", "identity"]}):
        with pytest.raises(ConfigError):
            TrainConfig.from_dict(bad)


def test_a_checkpoint_is_the_state_plus_the_config(tmp_path):
    from safetensors.numpy import load_file

    X = np.random.default_rng(0).standard_normal((16, 3))
    t = bpcore.Trainer(bpcore.MLP([3, 4, 2]), "mse", optim.adam(1e-2))
    for _ in range(3):
        t.step(X, X[:, :2])
    t.save(tmp_path / "c.safetensors")
    names = set(load_file(str(tmp_path / "c.safetensors")))
    assert names == {"W1", "b1", "W2", "b2", "opt.0", "opt.1", "opt.2", "opt.3", "opt.4",
                     "opt.5", "opt.6", "opt.7", "state.step", "state.epoch", "state.epoch_batch",
                     "state.guard.bad_step", "state.guard.reason", "state.guard.ref_loss"}
    ck = bpcore.load_checkpoint(tmp_path / "c.safetensors")
    assert ck.step == 3 and ck.config == TrainConfig.of(t)
    resumed = bpcore.Trainer.resume(tmp_path / "c.safetensors")
    for a, b in zip(nested_leaves(resumed.state), nested_leaves(t.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_model_only_checkpoint_cannot_be_resumed(tmp_path):
    bpcore.save(tmp_path / "m.safetensors", bpcore.MLP([3, 2]))
    with pytest.raises(CheckpointError, match="model only"):
        bpcore.Trainer.resume(tmp_path / "m.safetensors")


def test_the_jax_state_is_a_pytree_and_the_step_is_pure():
    jax = pytest.importorskip("jax")
    from functools import partial

    from bpcore.training.step import train_step

    t = bpcore.Trainer(bpcore.MLP([3, 4, 2], backend="jax", dtype="float64"), "mse",
                       optim.adam(1e-2))
    X = jax.numpy.asarray(np.random.default_rng(0).standard_normal((8, 3)))
    batch = t.prepare_batch(X, X[:, :2])
    step = jax.jit(partial(train_step, activations=t.model.activations, loss=t.loss,
                           optimizer=t.optimizer))
    before = t.state
    s1, m1 = step(before, batch)
    s2, m2 = step(before, batch)  # the same input state gives the same result: pure
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_array_equal(a, b)
    assert int(s1.step) == 1 and int(before.step) == 0
    assert len(jax.tree_util.tree_leaves(before)) == len(nested_leaves(before))
