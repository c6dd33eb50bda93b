"""What gets timed: bpcore on each backend, the GEMM floor, and the peers.

Every builder returns a :class:`Runner`: ``run(i)`` does one unit of work (a training step,
a forward pass, ...) on rotated batch ``i`` that already lives on the device, and
``sync(outputs)`` waits for the device. Building (including JAX compilation, via the
warm-up in ``timing.measure``) is never timed.

Kinds: ``sgd`` and ``adam`` (a full training step: forward, backward, update), ``forward``,
``value_and_grad`` (forward + backward, no update), ``floor`` (the step's matrix products
alone: ``Y W^T``, ``G^T Y``, ``G W``, the last skipped for the first layer).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .cases import ACTIVATION, LR_ADAM, LR_SGD, N_ROTATE, Case, host_params, make_batches

KINDS = ("sgd", "adam", "forward", "value_and_grad")
PEERS = ("torch", "jax", "sklearn")


class Unavailable(Exception):
    """This implementation cannot run here (library missing, no such kind); says why."""


@dataclass
class Runner:
    run: Callable[[int], Any]
    sync: Callable[[list], None]
    label: str


# ---- bpcore ------------------------------------------------------------------------------
def _backend(name: str, dtype: str):
    """The bpcore backend ``name``, able to hold ``dtype``, or :class:`Unavailable`."""
    import bpcore
    from bpcore.errors import BackendUnavailableError

    try:
        be = bpcore.backends.get(name)
        be.dtype(dtype)
    except (BackendUnavailableError, TypeError) as e:
        raise Unavailable(str(e)) from None
    return be


def bpcore_runner(backend: str, kind: str, case: Case, dtype: str) -> Runner:
    import bpcore

    be = _backend(backend, dtype)
    model = bpcore.MLP(list(case.sizes), ACTIVATION, "identity", backend=be, dtype=dtype,
                       params=host_params(case, dtype))
    loss = bpcore.LOSSES["softmax_cross_entropy"]
    sync = lambda outs: be.synchronize(*outs)  # noqa: E731
    opt = bpcore.optim.adam(LR_ADAM) if kind == "adam" else bpcore.optim.sgd(LR_SGD)
    trainer = bpcore.Trainer(model, loss, opt)
    data = [trainer.prepare_batch(X, y) for X, y in make_batches(case, dtype)]  # on device
    if kind in ("sgd", "adam"):
        def run(i):
            trainer.step_prepared(*data[i % len(data)])
            return trainer.model.params
        return Runner(run, sync, f"bpcore/{backend}")
    acts = model.activations
    if kind == "forward":
        fn = be.jit(lambda p, x: bpcore.forward(p, x, acts))
        return Runner(lambda i: fn(model.params, data[i % len(data)][0]), sync,
                      f"bpcore/{backend}")
    if kind == "value_and_grad":
        fn = be.jit(lambda p, x, t: bpcore.loss_and_grad(p, acts, loss, x, t)[:2])
        return Runner(lambda i: fn(model.params, *data[i % len(data)]), sync,
                      f"bpcore/{backend}")
    raise Unavailable(f"unknown kind {kind}")


def floor_runner(backend: str, case: Case, dtype: str) -> Runner:
    """The GEMMs of one training step, alone, on the same backend and dtype."""
    be = _backend(backend, dtype)
    sets = [[tuple(be.asarray(a) for a in layer) for layer in layers]
            for layers in _floor_host_sets(case, dtype)]

    def gemms(layers):
        out = []
        for k, (Y, W, G) in enumerate(layers):
            out.append(Y @ W.T)          # forward
            out.append(G.T @ Y)          # weight gradient
            if k > 0:
                out.append(G @ W)        # back-propagated error (none for the first layer)
        return out

    fn = be.jit(gemms)
    return Runner(lambda i: fn(sets[i % len(sets)]), lambda outs: be.synchronize(*outs),
                  f"floor/{backend}")


@functools.lru_cache(maxsize=2)
def _floor_host_sets(case: Case, dtype: str) -> tuple:
    """Random ``(Y, W, G)`` per layer, drawn once per case for every backend (read-only).

    ``N_ROTATE`` sets, or 2 where one set alone is far larger than any cache (the wide case:
    300 M numbers a set would take seconds to draw on every backend of a short GPU run).
    """
    rng = np.random.default_rng(1)
    shapes = [((case.batch, n_in), (n_out, n_in), (case.batch, n_out))
              for n_in, n_out in zip(case.sizes[:-1], case.sizes[1:])]
    per_set = sum(math.prod(s) for layer in shapes for s in layer) * np.dtype(dtype).itemsize
    sets = []
    for _ in range(N_ROTATE if per_set < 256 * 2**20 else 2):
        layers = []
        for layer in shapes:
            arrays = tuple(rng.standard_normal(s, dtype=np.dtype(dtype)) for s in layer)
            for a in arrays:
                a.flags.writeable = False
            layers.append(arrays)
        sets.append(tuple(layers))
    return tuple(sets)


# ---- peers -------------------------------------------------------------------------------
def torch_runner(kind: str, case: Case, dtype: str, device: str = "cpu") -> Runner:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        raise Unavailable(f"PyTorch is not installed ({e})") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("no CUDA device for torch")
    tdt = getattr(torch, dtype)
    layers = []
    for W, b in host_params(case, dtype):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=tdt, device=device)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    data = [(torch.from_numpy(X).to(device), torch.from_numpy(y).to(device))
            for X, y in make_batches(case, dtype)]
    sync = (lambda outs: torch.cuda.synchronize()) if device == "cuda" else (lambda outs: None)
    if kind == "forward":
        def run(i):
            with torch.no_grad():
                return net(data[i % len(data)][0])
        return Runner(run, sync, "torch")
    opt = None
    if kind in ("sgd", "adam"):
        opt = (torch.optim.SGD(net.parameters(), lr=LR_SGD) if kind == "sgd" else
               torch.optim.Adam(net.parameters(), lr=LR_ADAM))

    def run(i):
        x, y = data[i % len(data)]
        for p in net.parameters():
            p.grad = None
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
        return loss
    return Runner(run, sync, "torch autograd")


def jax_runner(kind: str, case: Case, dtype: str) -> Runner:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        raise Unavailable(f"JAX is not installed ({e})") from None
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise Unavailable("float64 on JAX needs jax_enable_x64")
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in host_params(case, dtype)]
    data = [(jnp.asarray(X), jnp.asarray(y)) for X, y in make_batches(case, dtype)]

    def logits(params, x):
        h = x
        for W, b in params[:-1]:
            h = jax.nn.relu(h @ W.T + b[None, :])
        W, b = params[-1]
        return h @ W.T + b[None, :]

    def loss_fn(params, x, y):
        z = logits(params, x)
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0])

    sync = lambda outs: jax.block_until_ready(outs)  # noqa: E731
    if kind == "forward":
        f = jax.jit(logits)
        return Runner(lambda i: f(params, data[i % len(data)][0]), sync, "jax")
    if kind == "value_and_grad":
        f = jax.jit(jax.value_and_grad(loss_fn))
        return Runner(lambda i: f(params, *data[i % len(data)]), sync, "jax.grad")
    try:
        import optax
    except ImportError as e:
        raise Unavailable(f"optax is not installed ({e})") from None
    opt = optax.sgd(LR_SGD) if kind == "sgd" else optax.adam(LR_ADAM)
    state = {"p": params, "s": opt.init(params)}

    @jax.jit
    def step(p, s, x, y):
        # optax relies on implicit promotion; bpcore's own tests switch JAX to strict mode
        with jax.numpy_dtype_promotion("standard"):
            loss, g = jax.value_and_grad(loss_fn)(p, x, y)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

    def run(i):
        state["p"], state["s"], loss = step(state["p"], state["s"], *data[i % len(data)])
        return state["p"]
    return Runner(run, sync, "jax.grad+jit")


def sklearn_runner(kind: str, case: Case, dtype: str) -> Runner:
    if kind not in ("sgd", "adam"):
        raise Unavailable("scikit-learn's MLP has no separate forward/value-and-grad step")
    try:
        from sklearn.neural_network import MLPClassifier
    except ImportError as e:
        raise Unavailable(f"scikit-learn is not installed ({e})") from None
    import warnings

    clf = MLPClassifier(hidden_layer_sizes=case.sizes[1:-1], activation="relu", solver=kind,
                        learning_rate_init=LR_SGD if kind == "sgd" else LR_ADAM, alpha=0.0,
                        batch_size=case.batch, momentum=0.0, nesterovs_momentum=False,
                        shuffle=False, max_iter=1, random_state=0)
    data = make_batches(case, dtype)
    classes = np.arange(case.sizes[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.partial_fit(*data[0], classes=classes)  # initialises; excluded from timing

    def run(i):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.partial_fit(*data[i % len(data)])
        return None
    return Runner(run, lambda outs: None, "sklearn partial_fit")


def peer_runner(peer: str, kind: str, case: Case, dtype: str, gpu: bool = False) -> Runner:
    if peer == "torch":
        return torch_runner(kind, case, dtype, "cuda" if gpu else "cpu")
    if peer == "jax":
        return jax_runner(kind, case, dtype)
    if peer == "sklearn":
        if gpu:
            raise Unavailable("scikit-learn runs on the CPU only")
        return sklearn_runner(kind, case, dtype)
    raise Unavailable(f"unknown peer {peer}")
