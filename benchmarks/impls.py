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
FIT_BATCHES, FIT_EPOCHS = 20, 3  # the "fit" kind (bpcore only): SGD, per call
PEERS = ("torch", "jax", "sklearn")


class Unavailable(Exception):
    """This implementation cannot run here (library missing, no such kind); says why."""


@dataclass
class Runner:
    run: Callable[[int], Any]
    sync: Callable[[list], None]
    label: str
    # Optional: memory figures of one step (measured after the timing), see step_memory.
    memory: Callable[[], dict] | None = None
    # False where results are ready when run() returns (NumPy, PyTorch on the CPU): the timer
    # then drops each output at once instead of keeping it for a final sync.
    asynchronous: bool = True
    # How many units (training steps) one run() does: times are reported per unit.
    per_call: int = 1


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


def bpcore_runner(backend: str, kind: str, case: Case, dtype: str, path: str = "prepared"
                  ) -> Runner:
    """bpcore doing ``kind`` on ``backend``. Training steps (sgd, adam) go through
    ``Trainer.step_prepared`` (``path="prepared"``: batches already validated and in the
    loss's form) or ``Trainer.step`` (``path="step"``: what a user's loop calls, with ``x`` and
    integer labels already on the device, so the boundary's checks are timed too) or, with
    ``path="generic"``, ``step_prepared`` of ``Trainer(inplace=False)``: the generic step,
    for comparison with the buffered executors."""
    import bpcore

    be = _backend(backend, dtype)
    model = bpcore.MLP(list(case.sizes), ACTIVATION, "identity", backend=be, dtype=dtype,
                       params=host_params(case, dtype))
    loss = bpcore.LOSSES["softmax_cross_entropy"]
    sync = lambda outs: be.synchronize(*outs)  # noqa: E731
    opt = bpcore.optim.adam(LR_ADAM) if kind == "adam" else bpcore.optim.sgd(LR_SGD)  # fit: SGD
    trainer = bpcore.Trainer(model, loss, opt, inplace=False if path == "generic" else None)
    host = make_batches(case, dtype)
    data = [trainer.prepare_batch(X, y) for X, y in host]  # on device
    if kind in ("sgd", "adam") and path == "step":
        raw = [(be.asarray(X), be.asarray(y)) for X, y in host]

        def run(i):
            return trainer.step(*raw[i % len(raw)])
        return Runner(run, sync, f"bpcore/{backend} Trainer.step",
                      memory=lambda: step_memory(trainer, *raw[0]), asynchronous=be.asynchronous)
    if kind in ("sgd", "adam"):
        def run(i):  # the loss: the parameters are donated to the next step on JAX
            return trainer.step_prepared(*data[i % len(data)])[0]
        return Runner(run, sync, f"bpcore/{backend}" + (" generic" if path == "generic" else ""),
                      asynchronous=be.asynchronous)
    acts = model.activations
    if kind == "forward":
        fn = be.jit(lambda p, x: bpcore.forward(p, x, acts))
        return Runner(lambda i: fn(model.params, data[i % len(data)][0]), sync,
                      f"bpcore/{backend}", asynchronous=be.asynchronous)
    if kind == "value_and_grad":
        fn = be.jit(lambda p, x, t: bpcore.loss_and_grad(p, acts, loss, x, t)[:2])
        return Runner(lambda i: fn(model.params, *data[i % len(data)]), sync,
                      f"bpcore/{backend}", asynchronous=be.asynchronous)
    if kind == "fit":  # Trainer.fit: FIT_EPOCHS epochs of FIT_BATCHES batches, per batch
        rng = np.random.default_rng(5)
        n = FIT_BATCHES * case.batch
        X = rng.standard_normal((n, case.sizes[0])).astype(dtype)
        y = rng.integers(0, case.sizes[-1], n)

        def run(i):  # fit reads each epoch's loss: it has waited for the device already
            trainer.fit(X, y, epochs=FIT_EPOCHS, batch_size=case.batch, verbose=0, seed=i)
        return Runner(run, lambda outs: None, f"bpcore/{backend} fit",
                      asynchronous=False, per_call=FIT_EPOCHS * FIT_BATCHES)
    raise Unavailable(f"unknown kind {kind}")


def step_memory(trainer: Any, x: Any, y: Any) -> dict:
    """Memory of one steady-state ``trainer.step(x, y)``, where it can be seen (NumPy arrays
    are traced by ``tracemalloc``; other libraries allocate outside it): the bytes allocated
    during the step and freed by its end (``mem_transient_bytes``), the buffers the in-place
    step keeps, and the peak (kept buffers + transient) over what any step must hold:
    parameters, gradients, optimizer state and the layers' activations."""
    import tracemalloc

    if trainer.model.backend.name != "numpy":  # only NumPy allocations are traced
        return {}
    import bpcore

    trainer.step(x, y)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        trainer.step(x, y)
        transient = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    item = np.dtype(trainer.model.dtype_name).itemsize
    n_params = trainer.model.n_params
    n_state = sum(int(a.size) for a in bpcore._array.nested_leaves(trainer.state.opt_state))
    activations = x.shape[0] * sum(trainer.model.sizes[1:])
    must = (2 * n_params + n_state + activations) * item
    kept = trainer._inplace.buffer_bytes() if trainer._inplace is not None else 2 * n_params * item
    return {"mem_transient_bytes": transient, "mem_kept_bytes": kept, "mem_must_bytes": must,
            "mem_peak_ratio": (kept + transient) / must}


PEAK_N = 2048


@functools.lru_cache(maxsize=8)
def _peak_runner(backend: str, dtype: str) -> Runner:
    be = _backend(backend, dtype)
    rng = np.random.default_rng(3)
    A, B = (be.asarray(rng.standard_normal((PEAK_N, PEAK_N), dtype=dtype)) for _ in range(2))
    fn = be.jit(lambda a, b: a @ b) if be.compiles else (lambda a, b: a @ b)
    return Runner(lambda i: fn(A, B), lambda outs: be.synchronize(*outs), f"peak/{backend}/{dtype}",
                  asynchronous=be.asynchronous)


def floor_runner(backend: str, case: Case, dtype: str) -> Runner:
    """The GEMMs of one training step in one (compiled) call: a quick stand-in used by the
    pytest-benchmark smoke tests. Not a lower bound on JAX: a jitted function returning every
    product pays for output buffers a fused step never makes (see :func:`floor_parts`)."""
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


def floor_parts(backend: str, case: Case, dtype: str
                ) -> tuple[list[tuple[str, Runner, int]], Runner | None, Runner | None]:
    """The GEMM floor's parts: every matrix product of a training step timed alone
    (``Y W^T``, ``G^T Y``, ``G W`` per layer, the last skipped for the first layer) with its
    FLOP count, a runner for the backend's GEMM peak (a 2048-square product), and (where
    each operation is its own call) a runner of the same products back to back in a step's
    order (forward, then backward from the last layer), with nothing between them.

    The sequence is no floor: it says what part of a step's distance to the floor is the
    products' own (a BLAS's threads woken per call, caches that a product alone keeps warm
    for itself) and what part the executor's work between them.

    Where each operation is its own call (NumPy, PyTorch, CuPy), a step runs its products one
    after another, so the floor is the sum of their best times alone. A compiled step (JAX)
    may overlap independent products on several cores and beat that sum (it does, by ~10 % on
    `large` here), so there the floor is the step's FLOPs at the best rate measured on that
    backend (the peak product or any of the step's own). Either way no step can be faster.
    (Timing all products in one compiled call, as :func:`floor_runner` does, is no bound.)
    """
    be = _backend(backend, dtype)
    sets = [[tuple(be.asarray(a) for a in layer) for layer in layers]
            for layers in _floor_host_sets(case, dtype)]
    sync = lambda outs: be.synchronize(*outs)  # noqa: E731
    parts = []
    for k, (n_in, n_out) in enumerate(zip(case.sizes[:-1], case.sizes[1:])):
        flops = 2 * case.batch * n_in * n_out  # every product of a layer has the same count
        products = {"Y@W.T": lambda Y, W, G: Y @ W.T, "G.T@Y": lambda Y, W, G: G.T @ Y}
        if k > 0:
            products["G@W"] = lambda Y, W, G: G @ W
        layer_sets = [layers[k] for layers in sets]
        for name, fn in products.items():
            # compiled where the backend compiles; else the bare operation (a wrapper's
            # overhead would inflate the floor)
            jf = be.jit(fn) if be.compiles else fn
            parts.append((f"layer{k + 1} {name}",
                          Runner(lambda i, jf=jf, ls=layer_sets: jf(*ls[i % len(ls)]), sync,
                                 f"floor/{backend}", asynchronous=be.asynchronous), flops))
    # the machine's GEMM peak as this backend reaches it: a square product big enough for
    # any BLAS to run at full speed (cached per backend and dtype for the whole run)
    peak = _peak_runner(backend, dtype)
    sequence = None
    if not be.compiles:
        n_layers = len(case.sizes) - 1
        order = ([f"layer{k} Y@W.T" for k in range(1, n_layers + 1)] +
                 [f"layer{k} {p}" for k in range(n_layers, 0, -1) for p in ("G.T@Y", "G@W")])
        by_name = {name: r.run for name, r, _ in parts}
        calls = [by_name[name] for name in order if name in by_name]

        def run_sequence(i):
            return [run(i) for run in calls]
        sequence = Runner(run_sequence, lambda outs: be.synchronize(*[o for out in outs
                                                                        for o in out]),
                          f"sequence/{backend}", asynchronous=be.asynchronous)
    return parts, peak, sequence


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
        return Runner(run, sync, "torch", asynchronous=device == "cuda")
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
    return Runner(run, sync, "torch autograd", asynchronous=device == "cuda")


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
    return Runner(run, lambda outs: None, "sklearn partial_fit", asynchronous=False)


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
