"""The hand-written backward pass against finite differences, jax.grad and a worked example."""

from __future__ import annotations

import numpy as np
import pytest

import bpcore
from bpcore import ACTIVATIONS, LOSSES
from bpcore.nn.mlp import backward, forward, forward_cache

from .conftest import params_np, tonp, unit

EPS = 1e-6


def _targets(loss_name, rng, batch, n_out):
    if loss_name == "softmax_cross_entropy":
        return rng.integers(0, n_out, size=batch)
    if loss_name == "binary_cross_entropy":
        return rng.uniform(0, 1, size=(batch, n_out))
    return rng.standard_normal((batch, n_out))


def _set_flat(model, host_params, flat):
    out, i = [], 0
    for W, b in host_params:
        nW, nb = W.size, b.size
        out.append((flat[i:i + nW].reshape(W.shape), flat[i + nW:i + nW + nb].reshape(b.shape)))
        i += nW + nb
    model.set_params(out)


def _flat(tree):
    return np.concatenate([np.ravel(a) for layer in tree for a in layer])


# ---- each activation's Jacobian-transpose product, full Jacobian by central differences --
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_vjp_matches_full_jacobian(backend, name, rng):
    act = ACTIVATIONS[name]
    be = backend
    Z = rng.standard_normal((3, 5)) * 2
    Zb = be.asarray(Z, dtype="float64")
    Y = act.forward(Zb)
    U = unit(rng, (3, 5))  # random unit-norm upstream gradient, never ones
    G = tonp(be, act.vjp(Zb, Y, be.asarray(U, dtype="float64")))
    J = np.zeros((15, 15))  # d vec(Y) / d vec(Z)
    for i in range(15):
        e = np.zeros(15)
        e[i] = EPS
        plus = tonp(be, act.forward(be.asarray(Z + e.reshape(3, 5), dtype="float64")))
        minus = tonp(be, act.forward(be.asarray(Z - e.reshape(3, 5), dtype="float64")))
        J[:, i] = ((plus - minus) / (2 * EPS)).ravel()
    np.testing.assert_allclose(G.ravel(), J.T @ U.ravel(), rtol=1e-7, atol=1e-9)
    if act.elementwise:  # elementwise means a diagonal Jacobian
        np.testing.assert_allclose(J - np.diag(np.diag(J)), 0, atol=1e-9)


def _np_reference(name, z):
    """Independent NumPy formulas for each activation."""
    return {
        "identity": z,
        "sigmoid": 0.5 * (1 + np.tanh(z / 2)),
        "tanh": np.tanh(z),
        "relu": np.where(z > 0, z, 0.0),
        "leaky_relu": np.where(z > 0, z, 0.01 * z),
        "elu": np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
        "softplus": np.logaddexp(0, z),
        "gelu": 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))),
        "softmax": np.exp(z - np.logaddexp.reduce(z, axis=1, keepdims=True)),
    }[name]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_values_and_stability(backend, name, dtype, rng):
    be = backend
    if dtype == "float64" and be.float64_error():
        pytest.skip(be.float64_error())
    z = np.concatenate([rng.standard_normal((2, 4)) * 3,
                        np.array([[1e4, -1e4, 0.0, 50.0], [-50.0, 88.0, -88.0, 1e-3]])])
    got = tonp(be, ACTIVATIONS[name].forward(be.asarray(z, dtype=dtype)))
    want = _np_reference(name, z.astype(dtype).astype(np.float64))
    tol = 1e-12 if dtype == "float64" else 2e-6
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    G = ACTIVATIONS[name].vjp(be.asarray(z, dtype=dtype), be.asarray(got, dtype=dtype),
                              be.asarray(np.ones_like(z), dtype=dtype))
    assert np.all(np.isfinite(tonp(be, G)))


def test_every_activation_is_tested():
    assert set(ACTIVATIONS) == {"identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu",
                                "softplus", "gelu", "softmax"}
    assert set(LOSSES) == {"mse", "softmax_cross_entropy", "binary_cross_entropy"}


# ---- every activation x every loss, whole network, float64 central differences ------------
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_network_gradient_central_differences(backend, act, loss, rng):
    model = bpcore.MLP([3, 4, 3], activation=act, output_activation=act, backend=backend,
                       dtype="float64", seed=int(rng.integers(1000)))
    # Move away from zero so relu-like kinks sit far from every entry's ±EPS.
    model.set_params([(W, b + 0.05) for W, b in params_np(model)])
    x = rng.standard_normal((5, 3))
    y = _targets(loss, rng, 5, 3)
    value, grads = bpcore.value_and_grad(model, x, y, loss=loss)
    host = params_np(model)
    theta = _flat(host)
    numeric = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = EPS
        _set_flat(model, host, theta + e)
        plus = float(bpcore.value_and_grad(model, x, y, loss=loss)[0])
        _set_flat(model, host, theta - e)
        minus = float(bpcore.value_and_grad(model, x, y, loss=loss)[0])
        numeric[i] = (plus - minus) / (2 * EPS)
    analytic = _flat([(tonp(backend, g), tonp(backend, h)) for g, h in grads])
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    for (g, h), (W, b) in zip(grads, model.params):  # same structure, dtype, backend
        assert g.shape == W.shape and h.shape == b.shape
        assert g.dtype == W.dtype and backend.is_native(g)


@pytest.mark.parametrize("act", ["tanh", "softmax", "gelu"])
def test_network_vjp_full_jacobian_random_upstream(backend, act, rng):
    """backward(D=U) equals J^T U for the whole net, params and input, U random unit-norm."""
    be = backend
    model = bpcore.MLP([3, 4, 2], activation=act, output_activation=act, backend=be,
                       dtype="float64", seed=3)
    acts = model.activations
    x = rng.standard_normal((4, 3))
    xb = be.asarray(x, dtype="float64")
    Y, cache = forward_cache(model.params, xb, acts)
    U = unit(rng, tuple(Y.shape))
    grads, dX = backward(model.params, acts, cache, be.asarray(U, dtype="float64"),
                         input_grad=True)
    host = params_np(model)
    theta = _flat(host)

    def out(flat, xin):
        _set_flat(model, host, flat)
        return tonp(be, forward(model.params, be.asarray(xin, dtype="float64"), acts)).ravel()

    J = np.stack([(out(theta + e, x) - out(theta - e, x)) / (2 * EPS)
                  for e in np.eye(theta.size) * EPS], axis=1)
    Jx = np.stack([(out(theta, x + e.reshape(x.shape)) - out(theta, x - e.reshape(x.shape)))
                   / (2 * EPS) for e in np.eye(x.size) * EPS], axis=1)
    np.testing.assert_allclose(_flat([(tonp(be, g), tonp(be, h)) for g, h in grads]),
                               J.T @ U.ravel(), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(tonp(be, dX).ravel(), Jx.T @ U.ravel(), rtol=1e-7, atol=1e-9)


# ---- against jax.grad of an independently written forward pass ---------------------------
_JAX_ACTS = {
    "identity": lambda z, jnp, jax: z,
    "sigmoid": lambda z, jnp, jax: jax.nn.sigmoid(z),
    "tanh": lambda z, jnp, jax: jnp.tanh(z),
    "relu": lambda z, jnp, jax: jax.nn.relu(z),
    "leaky_relu": lambda z, jnp, jax: jax.nn.leaky_relu(z, 0.01),
    "elu": lambda z, jnp, jax: jax.nn.elu(z),
    "softplus": lambda z, jnp, jax: jax.nn.softplus(z),
    "gelu": lambda z, jnp, jax: jax.nn.gelu(z, approximate=True),
    "softmax": lambda z, jnp, jax: jax.nn.softmax(z, axis=1),
}

WORST_JAX_REL_ERROR: dict[str, float] = {}


@pytest.mark.parametrize("trial", range(6))
def test_gradients_match_jax_grad(backend, trial):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(100 + trial)
    n_hidden = int(rng.integers(1, 5))
    sizes = [int(rng.integers(2, 7)) for _ in range(n_hidden + 2)]
    hidden = [str(a) for a in rng.choice(sorted(ACTIVATIONS), size=n_hidden)]
    loss = sorted(LOSSES)[trial % 3]
    model = bpcore.MLP(sizes, activation=hidden, output_activation="identity", backend=backend,
                       dtype="float64", seed=trial)
    x = rng.standard_normal((7, sizes[0]))
    y = _targets(loss, rng, 7, sizes[-1])

    def ref_loss(params):
        h = jnp.asarray(x)
        for (W, b), name in zip(params, hidden + ["identity"]):
            h = _JAX_ACTS[name](h @ W.T + b[None, :], jnp, jax)
        if loss == "mse":
            return 0.5 * jnp.sum((h - y) ** 2) / len(x)
        if loss == "softmax_cross_entropy":
            logp = jax.nn.log_softmax(h, axis=1)
            return -jnp.mean(logp[jnp.arange(len(x)), jnp.asarray(y)])
        return jnp.sum(jax.nn.softplus(h) - jnp.asarray(y) * h) / len(x)

    ref_params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in params_np(model)]
    ref_value, ref_grads = jax.value_and_grad(ref_loss)(ref_params)
    value, grads = bpcore.value_and_grad(model, x, y, loss=loss)
    got = _flat([(tonp(backend, g), tonp(backend, h)) for g, h in grads])
    want = _flat([(np.asarray(g), np.asarray(h)) for g, h in ref_grads])
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    WORST_JAX_REL_ERROR[backend.name] = max(rel, WORST_JAX_REL_ERROR.get(backend.name, 0.0))
    assert rel < 1e-10, (sizes, hidden, loss, rel)
    assert abs(float(value) - float(ref_value)) <= 1e-12 * max(1.0, abs(float(ref_value)))


# ---- the derivation's bias trick: a constant-1 neuron instead of b -------------------------
def test_bias_folded_as_constant_neuron_gives_identical_gradients(backend, rng):
    sizes, acts = [3, 4, 5, 2], ["tanh", "relu"]
    model = bpcore.MLP(sizes, activation=acts, backend=backend, dtype="float64", seed=7)
    model.set_params([(W, rng.standard_normal(b.shape)) for W, b in params_np(model)])
    x = rng.standard_normal((6, 3))
    y = rng.integers(0, 2, size=6)
    _, grads = bpcore.value_and_grad(model, x, y, loss="softmax_cross_entropy")

    # Folded: every layer's input gets an extra neuron fixed at 1, whose weights are b.
    # Hidden layers carry the constant forward by an extra unit with zero incoming weights
    # and bias-weight 1 — here written out by hand with numpy, no b anywhere.
    host = params_np(model)
    Ws = [np.concatenate([W, b[:, None]], axis=1) for W, b in host]  # (n_out, n_in + 1)

    def folded_loss_and_grads(Ws):
        ys = [np.concatenate([x, np.ones((len(x), 1))], axis=1)]
        zs = []
        for k, W in enumerate(Ws):
            z = ys[-1] @ W.T
            zs.append(z)
            h = z if k == len(Ws) - 1 else (np.tanh(z) if k == 0 else np.maximum(z, 0))
            ys.append(h if k == len(Ws) - 1 else np.concatenate([h, np.ones((len(x), 1))], 1))
        z = ys[-1]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d = (p - np.eye(2)[y]) / len(x)
        gs = [None] * len(Ws)
        for k in range(len(Ws) - 1, -1, -1):
            g = d if k == len(Ws) - 1 else d * (1 - ys[k + 1][:, :-1] ** 2 if k == 0
                                                  else (zs[k] > 0))
            gs[k] = g.T @ ys[k]                    # ∇W^k = (f' ⊙ δ) y^{k-1 T}
            d = (g @ Ws[k])[:, :-1]                # δ^{k-1}, dropping the constant neuron
        return gs

    folded = folded_loss_and_grads(Ws)
    for (gW, gb), gfold in zip(grads, folded):
        np.testing.assert_allclose(tonp(backend, gW), gfold[:, :-1], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(tonp(backend, gb), gfold[:, -1], rtol=1e-12, atol=1e-14)


# ---- one hand-worked step -----------------------------------------------------------------
def test_hand_worked_2_3_2_step(backend):
    r"""A 2-3-2 net, relu hidden, identity output, MSE, one SGD step at lr = 0.5.

    x = [1, 2], t = [1, 0]
    W1 = [[1, 0], [0, 1], [1, -1]], b1 = [0, 0, 0.5]
    z1 = W1 x + b1 = [1, 2, -0.5]  ->  y1 = relu(z1) = [1, 2, 0]
    W2 = [[1, 1, 1], [0, 1, -1]],  b2 = [0, -1]
    z2 = y2 = W2 y1 + b2 = [3, 1]
    g = ½‖y2 - t‖² = ½(2² + 1²) = 2.5          (batch of one)
    δ2 = y2 - t = [2, 1];  G2 = δ2 (identity)
    ∇W2 = G2 y1ᵀ = [[2, 4, 0], [1, 2, 0]],  ∇b2 = [2, 1]
    δ1 = W2ᵀ G2 = [2, 3, 1];  G1 = relu'(z1) ⊙ δ1 = [2, 3, 0]
    ∇W1 = G1 xᵀ = [[2, 4], [3, 6], [0, 0]],  ∇b1 = [2, 3, 0]
    after θ ← θ − 0.5 ∇θ:
    W1 = [[0, -2], [-1.5, -2], [1, -1]],  b1 = [-1, -1.5, 0.5]
    W2 = [[0, -1, 1], [-0.5, 0, -1]],     b2 = [-1, -1.5]
    """
    W1 = np.array([[1.0, 0], [0, 1], [1, -1]])
    b1 = np.array([0, 0, 0.5])
    W2 = np.array([[1.0, 1, 1], [0, 1, -1]])
    b2 = np.array([0, -1.0])
    model = bpcore.MLP([2, 3, 2], "relu", backend=backend, dtype="float64",
                       params=[(W1, b1), (W2, b2)])
    x, t = np.array([[1.0, 2.0]]), np.array([[1.0, 0.0]])
    value, grads = bpcore.value_and_grad(model, x, t, loss="mse")
    assert float(value) == 2.5
    expect = [([[2, 4], [3, 6], [0, 0]], [2, 3, 0]), ([[2, 4, 0], [1, 2, 0]], [2, 1])]
    for (gW, gb), (eW, eb) in zip(grads, expect):
        np.testing.assert_array_equal(tonp(backend, gW), eW)
        np.testing.assert_array_equal(tonp(backend, gb), eb)
    trainer = bpcore.Trainer(model, loss="mse", optimizer=bpcore.optim.sgd(lr=0.5))
    assert float(trainer.step(x, t)) == 2.5
    after = params_np(model)
    np.testing.assert_array_equal(after[0][0], [[0, -2], [-1.5, -2], [1, -1]])
    np.testing.assert_array_equal(after[0][1], [-1, -1.5, 0.5])
    np.testing.assert_array_equal(after[1][0], [[0, -1, 1], [-0.5, 0, -1]])
    np.testing.assert_array_equal(after[1][1], [-1, -1.5])


def test_input_gradient_only_on_request(backend, rng):
    model = bpcore.MLP([3, 4, 2], "tanh", backend=backend, dtype="float64")
    x = rng.standard_normal((5, 3))
    out = bpcore.value_and_grad(model, x, rng.standard_normal((5, 2)), loss="mse")
    assert len(out) == 2
    value, grads, dx = bpcore.value_and_grad(model, x, rng.standard_normal((5, 2)), loss="mse",
                                             input_grad=True)
    assert dx.shape == (5, 3) and backend.is_native(dx)


def test_user_gradcheck_passes_and_catches_a_wrong_gradient(backend, rng):
    model = bpcore.MLP([3, 5, 2], "gelu", backend=backend, dtype="float32", seed=1)
    x, y = rng.standard_normal((4, 3)), rng.integers(0, 2, size=4)
    result = bpcore.gradcheck(model, x, y, loss="softmax_cross_entropy")
    assert result and result.mode == "entries" and result.n_checked == 3 * 5 + 5 + 5 * 2 + 2
    big = bpcore.gradcheck(model, x, y, loss="softmax_cross_entropy", max_entries=10)
    assert big and big.mode == "directions"
    assert model.params[0][0].dtype == backend.dtype("float32")  # the model was not touched

    broken = bpcore.Activation("tanh_wrong", ACTIVATIONS["tanh"].forward,
                               lambda Z, Y, D: D * (1.0 - Y))  # wrong derivative
    bad = bpcore.MLP([3, 5, 2], [broken], backend=backend, dtype="float32", seed=1)
    result = bpcore.gradcheck(bad, x, y, loss="softmax_cross_entropy")
    assert not result and "FAILED" in str(result)
