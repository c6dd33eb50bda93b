"""`MLP`: the parameters and the names that define a network, around the math of
:mod:`bpcore.nn.mlp`; and the one place for the parameters' naming and shape rule."""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from .. import backends as _backends
from .._array import Array, Params
from .._checks import prepare_input
from .activations import ACTIVATIONS, Activation, get_activation
from ..backends._base import dtype_name
from ..errors import ConfigError, ShapeError
from .init import init_params
from .losses import Loss, get_loss
from .mlp import forward, loss_and_grad
from .targets import prepare_target

TASKS = (None, "classes", "binary", "values")  # what the outputs mean (from the loss)

__all__ = ["MLP", "value_and_grad", "param_shapes", "params_to_dict", "params_from_dict",
           "shape_mismatches", "TASKS"]


class MLP:
    """A multilayer perceptron: plain parameters plus the names that define it.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths ``[n_0, n_1, ..., n_K]``: inputs, hidden layers, outputs.
    activation : str or sequence of str
        Hidden-layer activation (one name, or one per hidden layer), from ``ACTIVATIONS``.
    output_activation : str
        Activation of the last layer. Keep ``"identity"`` with the cross-entropy losses:
        they take logits.
    backend : str or Backend
        Where the parameters live (``bpcore.backends.available()``).
    dtype : {"float32", "float64"}
    seed : int or None
        Seed of the host-side initialisation; the same seed gives bit-identical parameters
        on every backend.
    init : {"auto", "he", "glorot"}
        ``auto`` uses He for relu-like layers and Glorot for the rest.
    """

    def __init__(self, sizes: Sequence[int], activation: str | Sequence[str] = "relu",
                 output_activation: str = "identity", *, backend: Any = "numpy",
                 dtype: str = "float32", seed: int | None = 0, init: str = "auto",
                 params: Params | None = None, task: str | None = None):
        self.sizes = _check_sizes(sizes)
        if task not in TASKS:
            raise ConfigError(f"task: expected one of {list(TASKS)}, got {task!r}")
        self.task = task
        n_hidden = len(self.sizes) - 2
        if isinstance(activation, (str, Activation)):
            get_activation(activation, argument="activation")  # a typo is an error even
            hidden = [activation] * n_hidden                   # without hidden layers
        else:
            hidden = list(activation)
            if len(hidden) != n_hidden:
                raise ConfigError(
                    f"activation: got {len(hidden)} names for {n_hidden} hidden layers; pass "
                    "one name, or exactly one per hidden layer."
                )
        acts = [get_activation(a, argument="activation") for a in hidden]
        acts.append(get_activation(output_activation, argument="output_activation"))
        self.activations: tuple[Activation, ...] = tuple(acts)
        self.backend = _backends.get(backend)
        self.dtype_name = dtype_name(dtype)  # "float64" for np.float64, torch.float64, ...
        self.dtype = self.backend.dtype(self.dtype_name)
        if init not in ("auto", "he", "glorot"):
            raise ConfigError(f"init: expected 'auto', 'he' or 'glorot', got {init!r}")
        self.init = init
        self.seed = seed
        if params is None:
            schemes = [a.init if init == "auto" else init for a in self.activations]
            params = init_params(self.sizes, schemes, seed, self.dtype_name)
        self.params = self._import_params(params)
        self._compiled: dict[Any, Any] = {}
        # A Trainer holds it for each step; a save holds it while it copies the parameters,
        # so a snapshot taken from another thread is never half of one step, half another's.
        self._lock = threading.RLock()

    # -- structure ------------------------------------------------------------------------
    @property
    def activation_names(self) -> list[str]:
        return [a.name for a in self.activations]

    @property
    def n_params(self) -> int:
        return sum((i + 1) * o for i, o in zip(self.sizes[:-1], self.sizes[1:]))

    def __repr__(self) -> str:
        hidden = sorted({a.name for a in self.activations[:-1]}) or ["-"]
        return (f"MLP({self.sizes}, activation={'/'.join(hidden)}, output_activation="
                f"{self.activations[-1].name!r}, backend={self.backend.name!r}, "
                f"dtype={self.dtype_name!r})")

    # -- running ----------------------------------------------------------------------------
    def __call__(self, x: Any) -> Array:
        """Forward pass: ``(batch, n_0)`` -> ``(batch, n_K)`` on this model's backend."""
        x = prepare_input(self.backend, x, self.sizes[0], self.dtype)
        x = self.backend.place_like(x, self.params[0][0])
        return self._forward_fn()(self.params, x)

    def _forward_fn(self):
        return self.compiled("forward", lambda: self.backend.jit(
            lambda p, x: forward(p, x, self.activations)))

    def compiled(self, key: Any, build):
        """A per-model cache of (jit-)compiled pure functions, built on first use."""
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = build()
        return fn

    # -- parameters in and out ---------------------------------------------------------------
    def _import_params(self, params: Params) -> Params:
        if len(params) != len(self.sizes) - 1:
            raise ShapeError(f"params: expected {len(self.sizes) - 1} (W, b) pairs for sizes "
                             f"{self.sizes}, got {len(params)}.")
        named = params_to_dict(params)
        bad = shape_mismatches(named, self.sizes)
        if bad:
            raise ShapeError("params: shape mismatch: " + "; ".join(bad))
        be, xp = self.backend, self.backend.xp
        out = []
        for k, layer in enumerate(params, start=1):
            pair = []
            for name, a in zip("Wb", layer):
                arr = be.asarray(np.array(a) if isinstance(a, np.ndarray) else a, dtype=self.dtype)
                if arr is a:  # the caller's own device array: never share memory with it (later
                    arr = xp.asarray(arr, copy=True)  # steps update or donate the model's)
                # Parameters are finite when they enter; the step's guard keeps them so.
                if not bool(xp.all(xp.isfinite(arr))):
                    raise ConfigError(f"params: {name}{k} holds NaN or inf; parameters must be "
                                      "finite (check where they came from, or re-initialise)")
                pair.append(arr)
            out.append(tuple(pair))
        return out

    def copy_params(self) -> Params:
        """A copy of the parameters on the device (safe against any in-place update)."""
        xp = self.backend.xp
        return [tuple(xp.asarray(a, copy=True) for a in layer) for layer in self.params]

    def set_params(self, params: Params) -> None:
        """Replace the parameters (checked against the layer sizes, moved to the backend)."""
        self.params = self._import_params(params)

    def state_dict(self) -> dict[str, Any]:
        """Parameters as a dict ``{"W1": ndarray, "b1": ndarray, ...}`` of host NumPy arrays
        (copies: later in-place training steps do not change them; taken between two steps
        of a Trainer training this model in another thread)."""
        with self._lock:
            return {k: np.array(self.backend.to_numpy(a), copy=True)
                    for k, a in params_to_dict(self.params).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; any array type is accepted."""
        want = set(param_shapes(self.sizes))
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        if missing or extra:
            raise ShapeError(f"state: expected keys {sorted(want)}; missing {missing}, "
                             f"unexpected {extra}.")
        self.set_params(params_from_dict(state, len(self.sizes) - 1))

    def to(self, backend: Any = None, dtype: str | None = None) -> "MLP":
        """A copy on another backend and/or dtype (default: this one), same parameter values."""
        host = [(self.backend.to_numpy(W), self.backend.to_numpy(b)) for W, b in self.params]
        return MLP(self.sizes, list(self.activations[:-1]), self.activations[-1],
                   backend=self.backend if backend is None else backend,
                   dtype=dtype or self.dtype_name, seed=self.seed, init=self.init,
                   params=host, task=self.task)

    # -- predictions, as NumPy ---------------------------------------------------------------
    def _outputs(self, X: Any, batch_size: int) -> np.ndarray:
        x = prepare_input(self.backend, X, self.sizes[0], self.dtype)
        x = self.backend.place_like(x, self.params[0][0])
        fn = self._forward_fn()
        n = x.shape[0]
        out = np.concatenate([self.backend.to_numpy(fn(self.params, x[i:min(i + batch_size, n),
                                                                      ...]))
                              for i in range(0, n, batch_size)])
        # Rows with NaN or inf in, or out, get no answer: a NaN row would come out as class 0,
        # and an inf one through a saturating layer as some class (scikit-learn refuses both).
        xp = self.backend.xp
        ok_in = self.backend.to_numpy(xp.all(xp.isfinite(x), axis=1))
        bad = np.flatnonzero(~(ok_in & np.isfinite(out).all(axis=1)))
        if bad.size:
            raise ShapeError(
                f"predict: {bad.size} of {n} rows hold NaN or inf or give non-finite outputs "
                f"(rows {bad[:10].tolist()}{', ...' if bad.size > 10 else ''}, counted from 0): "
                "clean or drop those rows (scikit-learn refuses them too).")
        return out

    def _output_builtin(self) -> str | None:
        """The output activation's name if it is that built-in itself (by the object: an
        activation of your own called "softmax" is not bpcore's softmax), else None."""
        out = self.activations[-1]
        return out.name if ACTIVATIONS.get(out.name) is out else None

    def _kind(self, what: str) -> str:
        task = self.task or {"softmax": "classes", "sigmoid": "binary"}.get(
            self._output_builtin())
        if task is None:
            raise ConfigError(
                f"{what}: the model does not know what it predicts (classes, binary labels or "
                "values): train it with a bpcore.Trainer (the loss tells it), load it from a "
                "checkpoint that names its loss, or build it with MLP(..., task='classes' / "
                "'binary' / 'values').")
        return task

    def predict_proba(self, X: Any, batch_size: int = 4096) -> np.ndarray:
        """Class probabilities as a NumPy array: ``(n, n_classes)`` rows summing to 1 for a
        classifier (softmax of the logits), ``(n, n_outputs)`` per-label probabilities for
        binary/multi-label (sigmoid). On every backend."""
        task = self._kind("predict_proba")
        if task == "values":
            raise ConfigError("predict_proba: a regression model (task 'values') has no "
                              "probabilities; use predict")
        Y = self._outputs(X, batch_size).astype(np.float64)
        out = self._output_builtin()
        if task == "classes" and out != "softmax":
            e = np.exp(Y - Y.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        if task == "binary" and out != "sigmoid":
            return 0.5 * (1.0 + np.tanh(0.5 * Y))  # sigmoid, without overflow
        return Y

    def predict(self, X: Any, batch_size: int = 4096) -> np.ndarray:
        """Predictions as a NumPy array: class indices ``(n,)`` for a classifier, 0/1 per
        label ``(n, n_outputs)`` for binary/multi-label, the outputs for regression."""
        task = self._kind("predict")
        if task == "values":
            return self._outputs(X, batch_size)
        P = self.predict_proba(X, batch_size)
        return (P.argmax(axis=1) if task == "classes" else (P > 0.5)).astype(np.int64)


# ---- the parameters' names and shapes: W1, b1, W2, b2, ... (one place for the rule) --------
def param_shapes(sizes: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """``{"W1": (n_1, n_0), "b1": (n_1,), "W2": ...}`` in layer order, for layer ``sizes``."""
    out: dict[str, tuple[int, ...]] = {}
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        out[f"W{k}"], out[f"b{k}"] = (n_out, n_in), (n_out,)
    return out


def params_to_dict(params: Params) -> dict[str, Array]:
    """``[(W1, b1), ...]`` as ``{"W1": W1, "b1": b1, ...}`` (the same arrays)."""
    return {f"{p}{k}": a for k, layer in enumerate(params, start=1) for p, a in zip("Wb", layer)}


def params_from_dict(named: dict[str, Any], n_layers: int) -> Params:
    """Inverse of :func:`params_to_dict`."""
    return [(named[f"W{k}"], named[f"b{k}"]) for k in range(1, n_layers + 1)]


def shape_mismatches(named: dict[str, Any], sizes: Sequence[int]) -> list[str]:
    """``"W2: expected (4, 3), got (4, 2)"`` for each parameter missing or of the wrong shape."""
    return [f"{name}: expected {want}, got "
            f"{tuple(named[name].shape) if name in named else 'nothing (missing)'}"
            for name, want in param_shapes(sizes).items()
            if name not in named or tuple(named[name].shape) != want]


def _check_sizes(sizes: Any) -> list[int]:
    try:
        sizes = list(sizes)
    except TypeError:
        raise ConfigError(f"sizes: expected a list of layer widths like [784, 256, 10], "
                          f"got {sizes!r}") from None
    if len(sizes) < 2:
        raise ConfigError(f"sizes: expected at least 2 widths (inputs and outputs), "
                          f"got {sizes}")
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not hasattr(n, "__index__") or int(n) < 1:
            raise ConfigError(f"sizes[{i}]: layer widths must be positive integers, got {n!r} "
                              f"in {sizes}")
    return [int(n) for n in sizes]


def value_and_grad(model: MLP, x: Any, y: Any, loss: str | Loss = "mse", *,
                   input_grad: bool = False):
    """Loss and exact gradients of ``model`` on one batch, from the hand-written backward.

    Parameters
    ----------
    model : MLP
    x : array, shape (batch, n_0)
        Any array library or a NumPy array; moved to the model's backend.
    y : array
        Targets: ``(batch, n_K)`` values, or integer labels ``(batch,)`` for
        ``softmax_cross_entropy``. Host labels are range-checked at once; labels already on
        an asynchronous device are not read back, and one out of range makes the loss NaN
        (``Trainer`` reports it as an error).
    loss : str or Loss
        A name from ``LOSSES``.
    input_grad : bool
        Also return ``∂g/∂x`` (costs one more matrix product).

    Returns
    -------
    loss : 0-d array on the backend's device
    grads : list of (dW, db), shaped like ``model.params``
    dx : array (batch, n_0), only when ``input_grad`` is true
    """
    lossf = get_loss(loss)
    be = model.backend
    xb = prepare_input(be, x, model.sizes[0], model.dtype)
    T = prepare_target(lossf, be, y, model.sizes[-1], xb.shape[0], model.dtype_name)
    fn = model.compiled(("value_and_grad", lossf, input_grad), lambda: be.jit(  # (the object:
        #   a loss of your own may share a built-in name)
        lambda p, x, t: loss_and_grad(p, model.activations, lossf, x, t,
                                      input_grad=input_grad)))
    value, grads, dX = fn(model.params, xb, T)
    return (value, grads, dX) if input_grad else (value, grads)
