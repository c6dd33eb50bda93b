"""bpcore gradients driving an optax optimizer, inside your own jitted JAX step.

bpcore's parameters are plain pytrees (a list of ``(W, b)`` tuples), so optax, jax.tree
and jax.jit work on them directly. ``bpcore.loss_and_grad`` is a pure function: the
hand-written backward pass is traced and compiled like any other JAX code.

    pip install "bpcore[jax]"; python examples/jax_optax.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import optax

import bpcore
from bpcore.io.datasets import make_spirals
from bpcore.nn.targets import prepare_target


def main(argv: list[str] | None = None, steps: int = 1500) -> float:
    X, y = make_spirals(n_per_class=200, n_classes=3, seed=1)
    model = bpcore.MLP([2, 64, 64, 3], activation="gelu", backend="jax", seed=0)
    loss = bpcore.LOSSES["softmax_cross_entropy"]
    x = model.backend.asarray(X)
    targets = prepare_target(loss, model.backend, y, 3, len(y), "float32")  # one-hot rows

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))
    opt_state = optimizer.init(model.params)

    @jax.jit
    def step(params, opt_state, x, t):
        value, grads, _ = bpcore.loss_and_grad(params, model.activations, loss, x, t)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = model.params
    for i in range(steps):
        params, opt_state, value = step(params, opt_state, x, targets)
        if (i + 1) % 500 == 0:
            print(f"step {i + 1}: loss {float(value):.4f}")
    model.params = params  # hand the trained pytree back to the model
    n_leaves = len(jax.tree_util.tree_leaves(model.params))
    acc = float(jnp.mean(jnp.argmax(model(X), axis=1) == jnp.asarray(y)))
    print(f"training accuracy {acc:.3f} ({n_leaves} parameter arrays in the pytree)")
    return acc


if __name__ == "__main__":
    main(sys.argv[1:])
