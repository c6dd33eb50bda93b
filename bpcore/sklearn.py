"""scikit-learn's ``MLPClassifier`` and ``MLPRegressor``, trained by bpcore on any backend.

The estimators take the parameters of the installed scikit-learn's MLP estimators, with
the same meanings, and two more: ``backend`` (where the arrays live: ``"numpy"``, ``"jax"``,
``"torch"``, ``"cupy"``) and ``dtype``. They fit the same model: the same initial weights and
batch order for the same ``random_state``, the same loss (data term and L2 penalty), the same
gradient, the same SGD/Nesterov/Adam updates and learning-rate schedules, and L-BFGS through
SciPy's L-BFGS-B on the same flat parameter vector. In float64 on NumPy an unchanged script
gives scikit-learn's fitted ``coefs_`` to rounding (``tests/test_sklearn.py`` holds it to
1e-10); the other backends run the same arithmetic on their devices.

What is bpcore's here: the forward and hand-written backward pass (:mod:`bpcore.nn.mlp`), run
as one compiled step per batch on the backend (``jax.jit`` on JAX), with the data kept on the
device for the whole fit and each batch gathered there. A step whose loss or update is not
finite is refused, the parameters stay those of the last good step, and ``fit`` raises
scikit-learn's ``ValueError`` for non-finite weights (scikit-learn raises it after the fact,
with the broken weights already stored).

>>> from bpcore.sklearn import MLPClassifier                      # doctest: +SKIP
>>> clf = MLPClassifier(hidden_layer_sizes=(64,), backend="jax")  # doctest: +SKIP

Fitted attributes are host NumPy arrays and Python numbers (``coefs_[i]`` has scikit-learn's
``(n_in, n_out)`` layout), so fitted estimators pickle and unpickle anywhere; the
backend's arrays are built from them when needed. ``coefs_`` and ``intercepts_`` are the
truth: assign them (with ``warm_start=True``) to continue from given weights, or use
:meth:`MLPClassifier.from_sklearn` to move a fitted scikit-learn model over, optimizer state
included.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, NamedTuple

import numpy as np

try:
    import scipy.optimize
    import scipy.sparse
    from scipy.special import expit
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, is_classifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier as _SkMLPClassifier
    from sklearn.neural_network import MLPRegressor as _SkMLPRegressor
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils import check_random_state, column_or_1d, gen_batches
    from sklearn.utils import shuffle as _sk_shuffle
    from sklearn.utils._param_validation import StrOptions
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import (_check_partial_fit_first_call, type_of_target,
                                          unique_labels)
    from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
except ImportError as _e:  # pragma: no cover - depends on the installation
    raise ImportError(f"bpcore.sklearn needs scikit-learn >= 1.6 and SciPy ({_e}). Install "
                      "them with: pip install \"bpcore[sklearn]\"") from None

from . import backends as _backends
from ._array import Params, array_namespace, nested_map
from .nn.activations import get_activation
from .backends._base import Backend, cpu_array_to_numpy, on_cpu
from .errors import BackendUnavailableError, DTypeError
from .nn.losses import Loss
from .nn.mlp import forward, loss_grad_output
from .training.step import step_is_finite, tree_sq_norm, where_select

__all__ = ["MLPClassifier", "MLPRegressor"]

# scikit-learn's hidden activations by bpcore's names (the math is the same; bpcore's
# sigmoid is computed without overflow, which scikit-learn's expit also does).
_HIDDEN = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
_STOCHASTIC = ("sgd", "adam")
_PREDICT_CHUNK = 8192  # rows per device call in predict (bounded memory on any X)
_BATCH_DENSE = 2048    # rows densified at a time for sparse X in full-batch (lbfgs) passes


# ---- the output layer and loss, exactly as scikit-learn computes them ---------------------
# Each takes the last layer's pre-activation Z (the network's output activation is identity)
# and targets T = (Y, sw): Y (B, n_out) in the compute dtype, sw (B, 1) sample weights. It
# returns the *weighted sum* of the per-sample losses (divided by Σ sw later, so full-batch
# passes can be split into chunks) and D = ∂(that sum)/∂Z = sw ⊙ (act(Z) - Y): scikit-learn's
# canonical-link delta, multiplied by the weights as scikit-learn multiplies it.
def _eps(Z: Any) -> float:
    return float(np.finfo(str(Z.dtype).split(".")[-1]).eps)


def _softmax_rows(Z: Any) -> Any:
    xp = array_namespace(Z)
    e = xp.exp(Z - xp.max(Z, axis=1, keepdims=True))
    return e / xp.sum(e, axis=1, keepdims=True)


def _clip(P: Any, eps: float) -> Any:
    xp = array_namespace(P)
    return xp.where(P < eps, eps, xp.where(P > 1.0 - eps, 1.0 - eps, P))


def _log_loss_softmax(Z, T):
    Y, sw = T
    xp = array_namespace(Z)
    P = _softmax_rows(Z)
    # scikit-learn's log_loss clips the probabilities to [eps, 1 - eps] (for the value only;
    # its gradient is the unclipped P - Y), so a confident wrong answer costs at most -log eps.
    value = -xp.sum(sw * (Y * xp.log(_clip(P, _eps(Z)))))
    return value, sw * (P - Y)


def _log_loss_logistic(Z, T):
    Y, sw = T
    xp = array_namespace(Z)
    P = get_activation("sigmoid").forward(Z)
    Pc = _clip(P, _eps(Z))
    value = -xp.sum(sw * (Y * xp.log(Pc) + (1.0 - Y) * xp.log(1.0 - Pc)))
    return value, sw * (P - Y)


def _squared_error(Z, T):
    Y, sw = T
    xp = array_namespace(Z)
    R = Y - Z
    # scikit-learn reports 0.5 * mean over the outputs of the mean squared error, but its
    # gradient (delta = y_pred - y) is that of the *sum* over the outputs: for n_outputs > 1
    # its loss_ is the descended loss divided by n_outputs. Matched, value and gradient alike.
    value = 0.5 * xp.sum(sw * (R * R)) / Z.shape[1]
    return value, sw * (Z - Y)


def _poisson(Z, T):
    Y, sw = T
    xp = array_namespace(Z)
    E = xp.exp(Z)  # the "exp" output activation: the mean of the Poisson distribution
    # half Poisson deviance: xlogy(y, y / mu) - y + mu (0 where y = 0)
    ylog = xp.where(Y > 0, Y * xp.log(xp.where(Y > 0, Y, 1.0) / E), 0.0)
    return xp.sum(sw * (ylog - Y + E)), sw * (E - Y)


_LOSSES = {
    "softmax": Loss("sklearn_log_loss", _log_loss_softmax, "values"),
    "logistic": Loss("sklearn_binary_log_loss", _log_loss_logistic, "values"),
    "identity": Loss("sklearn_squared_error", _squared_error, "values"),
    "exp": Loss("sklearn_poisson", _poisson, "values"),
}


def _out_activation_host(name: str, Z: np.ndarray) -> np.ndarray:
    """scikit-learn's output activation on host logits (its own functions' arithmetic)."""
    if name == "softmax":
        tmp = Z - Z.max(axis=1)[:, np.newaxis]
        np.exp(tmp, out=Z)
        Z /= Z.sum(axis=1)[:, np.newaxis]
        return Z
    if name == "logistic":
        return expit(Z, out=Z)
    if name == "exp":
        return np.exp(Z, out=Z)
    return Z


# ---- the pure functions the backend compiles ----------------------------------------------
def _acts(hidden: str, n_layers: int):
    return [get_activation(_HIDDEN[hidden])] * (n_layers - 2) + [get_activation("identity")]


def _grad_sums(params: Params, acts, loss: Loss, x, Y, sw):
    """Σ_b sw_b loss_b and its gradient sums (no L2, not yet divided by Σ sw)."""
    value, grads, _, _ = loss_grad_output(params, acts, loss, x, (Y, sw))
    return value, grads


def _finish(value, grads: Params, params: Params, S, alpha):
    """scikit-learn's L2 penalty and normalisation: loss = value/S + α/2 Σ‖W‖²/S, and
    ∇W = (Σ sw δ aᵀ + α W)/S, ∇b = Σ sw δ / S."""
    sq = tree_sq_norm([W for W, _ in params])
    value = value / S + (0.5 * alpha) * sq / S
    grads = [((gW + alpha * W) / S, gb / S) for (gW, gb), (W, _) in zip(grads, params)]
    return value, grads


class _Hyper(NamedTuple):
    """The step's scalars, passed at run time (a new value never recompiles)."""

    lr: float
    alpha: float
    momentum: float
    b1: float
    one_minus_b1: float
    b2: float
    one_minus_b2: float
    eps: float


def _sgd_update(grads, velocities, params, h: _Hyper, nesterov: bool):
    # scikit-learn's SGDOptimizer: the velocity is the update itself, v ← μ v - lr g, so a
    # learning rate changed between epochs (invscaling, adaptive) leaves the velocity as it
    # was made. Nesterov applies μ v - lr g once more with the new v.
    v = nested_map(lambda vel, g: h.momentum * vel - h.lr * g, velocities, grads)
    u = nested_map(lambda vel, g: h.momentum * vel - h.lr * g, v, grads) if nesterov else v
    return u, v


def _adam_update(grads, state, params, h: _Hyper):
    # scikit-learn's AdamOptimizer: lr already holds lr_init·sqrt(1-β2^t)/(1-β1^t) (computed on
    # the host in float64, as scikit-learn does), and eps is added to sqrt(v) of the raw
    # moments (not of the bias-corrected ones, as in Kingma & Ba's algorithm 1).
    ms, vs = state
    ms = nested_map(lambda m, g: h.b1 * m + h.one_minus_b1 * g, ms, grads)
    vs = nested_map(lambda v, g: h.b2 * v + h.one_minus_b2 * (g * g), vs, grads)
    xp = array_namespace(params[0][0])
    u = nested_map(lambda m, v: -h.lr * m / (xp.sqrt(v) + h.eps), ms, vs)
    return u, (ms, vs)


def _make_step(acts, loss: Loss, solver: str, nesterov: bool, select_on_host: bool):
    """One guarded stochastic step: ``(params, opt, bad, x, Y, sw, h) -> (params, opt, bad,
    loss)``. ``bad`` (0-d bool) turns true at the first step whose loss or update is not
    finite; that step and every later one leave parameters and optimizer state as they were.

    ``select_on_host``: for backends whose values are read without waiting for a device
    (NumPy, PyTorch on the CPU), the guard's decision is read and the old or new arrays
    returned; elsewhere (JAX, CUDA) an elementwise ``where`` decides on the device."""

    def step(params, opt, bad, x, Y, sw, h):
        xp = array_namespace(x)
        value, grads = _grad_sums(params, acts, loss, x, Y, sw)
        value, grads = _finish(value, grads, params, xp.sum(sw), h.alpha)
        if solver == "sgd":
            u, new_opt = _sgd_update(grads, opt, params, h, nesterov)
        else:
            u, new_opt = _adam_update(grads, opt, params, h)
        # bpcore's guard rule (bpcore.training.step.step_is_finite): a finite loss, a bounded update
        # and a finite optimizer state
        ok = step_is_finite(value, u, new_opt) & ~bad
        if select_on_host:
            if not bool(ok):
                return params, opt, ~ok, value
            return [(W + uW, b + ub) for (W, b), (uW, ub) in zip(params, u)], new_opt, ~ok, value
        new_params = [(W + uW, b + ub) for (W, b), (uW, ub) in zip(params, u)]
        params, opt = where_select(ok, lambda: (new_params, new_opt), lambda: (params, opt))
        return params, opt, ~ok, value

    def step_indexed(params, opt, bad, X, Y, SW, idx, h):
        xp = array_namespace(X)
        return step(params, opt, bad, xp.take(X, idx, axis=0), xp.take(Y, idx, axis=0),
                    xp.take(SW, idx, axis=0), h)

    return step, step_indexed


def _make_value_and_grad(acts, loss: Loss):
    """Full-batch (L-BFGS) pieces: per-chunk sums, and :func:`_finish` over their total."""
    return (lambda params, x, Y, sw: _grad_sums(params, acts, loss, x, Y, sw)), _finish


_COMPILED: dict[Any, Any] = {}


class _Diverged(ValueError):
    """scikit-learn's ValueError for non-finite weights (a fit that keeps its progress)."""


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of 2^(bits(n) - 4): sizes within ~12% share it."""
    q = 1 << max(0, int(n).bit_length() - 4)
    return -(-int(n) // q) * q


def _padded(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``rows``."""
    if a.shape[0] >= rows:
        return a
    out = np.zeros((rows,) + a.shape[1:], dtype=a.dtype)
    out[:a.shape[0]] = a
    return out


def _compiled(be: Backend, key: tuple, build):
    """Compiled functions shared by every estimator with the same structure (so a
    ``partial_fit`` loop or a grid search compiles once per backend and shape)."""
    full = (be.name, id(be)) + key
    fn = _COMPILED.get(full)
    if fn is None:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        fn = _COMPILED[full] = tuple(be.jit(f) for f in build())
    return fn


# ---- inputs from any array library -------------------------------------------------------
def _host(a: Any) -> Any:
    """NumPy (or SciPy sparse, or a pandas object) for scikit-learn's validation: arrays of
    other libraries are brought to the host (a device array by its library's own copy)."""
    if a is None or isinstance(a, (np.ndarray, list, tuple)) or scipy.sparse.issparse(a):
        return a
    mod = type(a).__module__.split(".")[0]
    if mod == "pandas" or not hasattr(a, "__dlpack__"):
        return a
    if on_cpu(a):
        return cpu_array_to_numpy(a)
    if hasattr(a, "get"):            # CuPy
        return a.get()
    if hasattr(a, "cpu"):            # a CUDA torch tensor
        return a.detach().cpu().numpy()
    return np.asarray(a)             # JAX on an accelerator


# ---- the estimators ------------------------------------------------------------------------
class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: scikit-learn's training loop around
    bpcore's compiled step."""

    # -- settings ------------------------------------------------------------------------
    def _keep_arguments(self, arguments: dict) -> None:
        """What scikit-learn's ``__init__`` does, and only that: each argument stored under its
        own name (``get_params`` reads them back through the signature)."""
        for name in self._get_param_names():
            setattr(self, name, arguments[name])

    def _dtype_for(self, X_dtype: Any, be: Backend) -> str:
        """The compute dtype: ``dtype``, else X's as scikit-learn does. One exception, so that
        changing ``backend="jax"`` alone never breaks a working script: float64 data on a JAX
        without 64-bit mode trains in JAX's own float32, with a one-line warning."""
        if self.dtype:
            return self.dtype
        if np.dtype(X_dtype) == np.float32:
            return "float32"
        if be.float64_error() is not None:
            warnings.warn(f"{type(self).__name__}(backend={be.name!r}): float64 data, trained "
                          f"in float32 ({be.name} computes in float32 unless 64-bit mode is "
                          "on: jax.config.update('jax_enable_x64', True)); pass "
                          "dtype='float32' to silence this", UserWarning, stacklevel=4)
            return "float32"
        return "float64"

    def _backend(self) -> Backend:
        try:
            return _backends.get(self.backend)
        except BackendUnavailableError as e:
            fitted = " (its fitted weights are NumPy arrays: set_params(backend='numpy') " \
                     "predicts and keeps training on the CPU)" if hasattr(self, "coefs_") else ""
            raise BackendUnavailableError(f"{type(self).__name__}: {e}{fitted}") from None

    def _check_dtype(self, be: Backend, dtype: str) -> None:
        try:
            be.dtype(dtype)
        except DTypeError as e:
            raise DTypeError(f"{type(self).__name__}(backend={be.name!r}, dtype={self.dtype!r}) "
                             f"computes in {dtype} here (dtype=None follows X's dtype, as "
                             f"scikit-learn does): {e}") from None

    def _check_weights(self, layer_units: list[int]) -> None:
        """Weights set from outside (warm start, partial_fit) must fit the layers."""
        want = [(a, b) for a, b in zip(layer_units[:-1], layer_units[1:])]
        got_c = [tuple(np.shape(c)) for c in self.coefs_]
        got_b = [tuple(np.shape(b)) for b in self.intercepts_]
        if got_c != want or got_b != [(b,) for _, b in want]:
            raise ValueError(
                f"{type(self).__name__}: coefs_ {got_c} and intercepts_ {got_b} do not fit "
                f"the layers {layer_units} (inputs, hidden_layer_sizes, outputs): expected "
                f"coefs_ {want} (n_in, n_out) and intercepts_ {[(b,) for _, b in want]}. "
                "Fit without warm_start to start afresh, or set weights of these shapes.")

    def _hyper(self, lr: float) -> _Hyper:
        return _Hyper(float(lr), float(self.alpha), float(self.momentum), float(self.beta_1),
                      1.0 - self.beta_1, float(self.beta_2), 1 - self.beta_2,
                      float(self.epsilon))

    # -- parameters between host and device -------------------------------------------------
    def _device_params(self, be: Backend, dtype: str) -> Params:
        """``coefs_``/``intercepts_`` (the truth) as bpcore's ``[(W, b)]`` on the backend,
        ``W = coefᵀ`` in C order (the layout every update keeps: a transposed view would make
        each elementwise update a strided pass)."""
        out = []
        for c, b in zip(self.coefs_, self.intercepts_):
            W = be.asarray(np.ascontiguousarray(np.asarray(c, dtype=dtype).T))
            out.append((W, be.asarray(np.asarray(b, dtype=dtype))))
        return out

    def _store_params(self, be: Backend, params: Params) -> None:
        self.coefs_ = [np.ascontiguousarray(be.to_numpy(W).T) for W, _ in params]
        self.intercepts_ = [np.array(be.to_numpy(b), copy=True) for _, b in params]

    # -- forward -------------------------------------------------------------------------------
    def _logits(self, be: Backend, params: Params, X: Any, dtype: str) -> np.ndarray:
        acts = _acts(self.activation, len(params) + 1)
        (fwd,) = _compiled(be, ("forward", self.activation, len(params) + 1),
                           lambda: (lambda p, x: forward(p, x, acts),))
        out = []
        for i in range(0, X.shape[0], _PREDICT_CHUNK):
            xb = X[i:i + _PREDICT_CHUNK]
            xb = np.asarray(xb.toarray() if scipy.sparse.issparse(xb) else xb, dtype=dtype)
            n = xb.shape[0]
            if be.compiles:  # a few compiled shapes for any number of rows
                xb = _padded(xb, _bucket(n))
            out.append(be.to_numpy(fwd(params, be.asarray(xb)))[:n])
        return np.concatenate(out) if out else np.empty((0, params[-1][1].shape[0]), dtype)

    def _forward_pass_fast(self, X: Any, check_input: bool = True,
                           params: Params | None = None) -> np.ndarray:
        if check_input:
            X = validate_data(self, _host(X), accept_sparse=["csr", "csc"], reset=False)
        be = self._backend()
        # the fit's dtype (scikit-learn computes in the weights' precision or wider)
        dtype = self.dtype or ("float32" if np.asarray(self.coefs_[0]).dtype == np.float32
                               else "float64")
        if params is None:
            params = self._device_params(be, dtype)
        Z = np.array(self._logits(be, params, X, dtype), copy=True)
        return _out_activation_host(self.out_activation_, Z)

    # -- fit --------------------------------------------------------------------------------
    def _fit(self, X, y, sample_weight=None, incremental=False):
        hidden = self.hidden_layer_sizes
        if not hasattr(hidden, "__iter__"):
            hidden = [hidden]
        hidden = list(hidden)
        if np.any(np.array(hidden) <= 0):
            raise ValueError("hidden_layer_sizes must be > 0, got %s." % hidden)
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        # A call that fails leaves the estimator as it was (unfitted stays unfitted, a fitted
        # model keeps its weights and counters), except for a diverged fit, which keeps the
        # progress up to the last good step, as documented.
        before = {k: copy.copy(v) for k, v in vars(self).items()}
        try:
            return self._fit_checked(X, y, sample_weight, incremental, first_pass, hidden)
        except _Diverged:
            raise
        except BaseException:
            vars(self).clear()
            vars(self).update(before)
            raise

    def _fit_checked(self, X, y, sample_weight, incremental, first_pass, hidden):
        X, y = self._validate_input(_host(X), _host(y), incremental, reset=first_pass)
        n_features = X.shape[1]
        if sample_weight is not None:
            sample_weight = _check_sample_weight(_host(sample_weight), X)
        if y.ndim == 1:
            y = y.reshape((-1, 1))
        be = self._backend()
        dtype = self._dtype_for(X.dtype, be)
        self._check_dtype(be, dtype)  # a clear error now (float64 on JAX without x64, say)
        self.n_outputs_ = y.shape[1]
        layer_units = [n_features] + hidden + [self.n_outputs_]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(y, layer_units, X.dtype)
        else:
            self._check_weights(layer_units)
        params = self._device_params(be, dtype)
        if self.solver in _STOCHASTIC:
            params = self._fit_stochastic(be, dtype, params, X, y, sample_weight,
                                          incremental)
        else:
            params = self._fit_lbfgs(be, dtype, params, X, y, sample_weight, layer_units)
        self._store_params(be, params)
        if not all(np.isfinite(w).all() for w in self.coefs_ + self.intercepts_):
            raise _Diverged("Solver produced non-finite parameter weights. The input data "
                            "may contain large values and need to be preprocessed.")
        return self

    def _initialize(self, y, layer_units, dtype):
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(layer_units)
        if not is_classifier(self):
            self.out_activation_ = "exp" if self.loss == "poisson" else "identity"
        elif self._label_binarizer.y_type_ == "multiclass":
            self.out_activation_ = "softmax"
        else:
            self.out_activation_ = "logistic"
        self.coefs_, self.intercepts_ = [], []
        for fan_in, fan_out in zip(layer_units[:-1], layer_units[1:]):
            c, b = self._init_coef(fan_in, fan_out, dtype)
            self.coefs_.append(c)
            self.intercepts_.append(b)
        if self.solver in _STOCHASTIC:
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _init_coef(self, fan_in, fan_out, dtype):
        # scikit-learn's Glorot-uniform draw, from the same RandomState in the same order
        # (weights, then intercepts, layer by layer), so the same random_state starts from the
        # same weights; the factor is 2 for logistic hidden layers and 6 otherwise.
        factor = 2.0 if self.activation == "logistic" else 6.0
        bound = np.sqrt(factor / (fan_in + fan_out))
        coef = self._random_state.uniform(-bound, bound, (fan_in, fan_out))
        intercept = self._random_state.uniform(-bound, bound, fan_out)
        return coef.astype(dtype, copy=False), intercept.astype(dtype, copy=False)

    def _targets(self, y: np.ndarray, dtype: str) -> np.ndarray:
        return np.ascontiguousarray(y, dtype=dtype)

    def _new_optimizer(self, be, params: Params) -> dict:
        xp = be.xp
        zeros = [tuple(xp.zeros_like(a) for a in layer) for layer in params]
        if self.solver == "sgd":
            return {"solver": "sgd", "learning_rate": float(self.learning_rate_init),
                    "state": zeros}
        return {"solver": "adam", "learning_rate": float(self.learning_rate_init), "t": 0,
                "state": (zeros, [tuple(xp.zeros_like(a) for a in layer) for layer in params])}

    def _fit_stochastic(self, be, dtype, params, X, y, sample_weight, incremental):
        # As scikit-learn: partial_fit goes on with the optimizer it has, even after
        # set_params(solver=...) (fit starts a new one).
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._new_optimizer(be, params)
        opt = self._optimizer
        # the optimizer state on this backend (it is host NumPy after unpickling)
        opt["state"] = nested_map(lambda a: be.asarray(a, dtype=dtype), opt["state"])
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        early_stopping = self.early_stopping
        if early_stopping:
            should_stratify = is_classifier(self) and self.n_outputs_ == 1
            stratify = y if should_stratify else None
            if sample_weight is None:
                X_train, X_val, y_train, y_val = train_test_split(
                    X, y, random_state=self._random_state,
                    test_size=self.validation_fraction, stratify=stratify)
                sw_train = sw_val = None
            else:
                X_train, X_val, y_train, y_val, sw_train, sw_val = train_test_split(
                    X, y, sample_weight, random_state=self._random_state,
                    test_size=self.validation_fraction, stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            if is_classifier(self):
                y_val = self._label_binarizer.inverse_transform(y_val)
        else:
            X_train, y_train, sw_train = X, y, sample_weight
            X_val = y_val = sw_val = None

        n_samples = X_train.shape[0]
        sample_idx = np.arange(n_samples, dtype=int)
        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is "
                              "going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n_samples))

        # The data go to the device once; each batch is gathered there, inside the compiled
        # step. Sparse X is densified one batch at a time on the host instead.
        # On a compiling backend (JAX) every batch is padded to the full batch size with a
        # zero row of weight 0, and the data to a nearby bucket size: one compiled step serves
        # the last batch and every data size within ~12% (a grid search's folds, say).
        sparse = scipy.sparse.issparse(X_train)
        pad = be.compiles
        rows = _bucket(n_samples + 1) if pad else n_samples
        Yd = be.asarray(_padded(self._targets(y_train, dtype), rows))
        SWd = be.asarray(_padded(np.ones((n_samples, 1), dtype) if sw_train is None else
                                 np.asarray(sw_train, dtype=dtype).reshape(-1, 1), rows))
        Xd = None if sparse else be.asarray(_padded(np.asarray(X_train, dtype=dtype), rows))
        step, step_indexed = _compiled(
            be, ("step", self.activation, len(params) + 1, self.out_activation_, opt["solver"],
                 bool(self.nesterovs_momentum)),
            lambda: _make_step(_acts(self.activation, len(params) + 1),
                               _LOSSES[self.out_activation_], opt["solver"],
                               bool(self.nesterovs_momentum),
                               select_on_host=not (be.compiles or be.asynchronous)))
        bad = be.asarray(np.zeros((), dtype=bool))
        index_dtype = np.int32 if n_samples < 2**31 else np.int64
        state = opt["state"]
        best = params
        try:
            self.n_iter_ = 0
            for _ in range(self.max_iter):
                if self.shuffle:
                    sample_idx = _sk_shuffle(sample_idx, random_state=self._random_state)
                values, sizes = [], []
                for batch_slice in gen_batches(n_samples, batch_size):
                    idx = sample_idx[batch_slice]
                    h = self._hyper(self._learning_rate_for_step(opt))
                    real = len(idx)
                    if pad and real < batch_size:  # n_samples: the zero row of weight 0
                        idx = np.concatenate([idx, np.full(batch_size - real, n_samples)])
                    if sparse:
                        xb = np.asarray(X_train[idx[:real]].toarray(), dtype=dtype)
                        xb = be.asarray(_padded(xb, len(idx)))
                        ib = be.asarray(idx.astype(index_dtype))
                        params, state, bad, v = step(
                            params, state, bad, xb, be.xp.take(Yd, ib, axis=0),
                            be.xp.take(SWd, ib, axis=0), h)
                    else:
                        params, state, bad, v = step_indexed(
                            params, state, bad, Xd, Yd, SWd,
                            be.asarray(idx.astype(index_dtype)), h)
                    values.append(v)
                    sizes.append(batch_slice.stop - batch_slice.start)
                # one host read per epoch: the batch losses and the guard
                host = be.to_numpy(be.xp.stack(values + [be.xp.astype(bad, values[0].dtype)]))
                # Under early stopping scikit-learn trains on with NaN weights, scores them NaN
                # and returns the best validation model (its issue 29504): so does this, with
                # every later step refused by the guard (the weights stay finite meanwhile).
                diverged = bool(host[-1])
                if diverged and not early_stopping:
                    opt["state"] = state
                    self._store_params(be, params)
                    raise _Diverged(
                        "Solver produced non-finite parameter weights. The input data may "
                        "contain large values and need to be preprocessed. (bpcore refused "
                        f"the first step with a non-finite loss or update, in epoch "
                        f"{self.n_iter_ + 1}; coefs_ and intercepts_ hold the weights before "
                        "it. Scale the inputs or lower learning_rate_init.)")
                accumulated_loss = 0.0
                for v, n in zip(host[:-1], sizes):
                    accumulated_loss += float(v) * n
                self.n_iter_ += 1
                self.loss_ = np.nan if diverged else accumulated_loss / X_train.shape[0]
                self.t_ += n_samples
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                if early_stopping:
                    best = self._early_stopping_update(be, dtype, params, best, X_val, y_val,
                                                       sw_val, diverged)
                else:
                    self._update_no_improvement_count_loss()
                self._iteration_ends(opt)
                if self._no_improvement_count > self.n_iter_no_change:
                    if early_stopping:
                        msg = ("Validation score did not improve more than tol=%f for %d "
                               "consecutive epochs." % (self.tol, self.n_iter_no_change))
                    else:
                        msg = ("Training loss did not improve more than tol=%f for %d "
                               "consecutive epochs." % (self.tol, self.n_iter_no_change))
                    if self._trigger_stopping(opt, msg):
                        break
                    self._no_improvement_count = 0
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and "
                                  "the optimization hasn't converged yet." % self.max_iter,
                                  ConvergenceWarning)
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")
        opt["state"] = state
        return best if early_stopping else params

    # scikit-learn's optimizers' host-side schedule, step by step
    def _learning_rate_for_step(self, opt: dict) -> float:
        if opt["solver"] == "sgd":
            return opt["learning_rate"]
        opt["t"] += 1
        t = opt["t"]
        opt["learning_rate"] = (self.learning_rate_init * np.sqrt(1 - self.beta_2 ** t)
                                / (1 - self.beta_1 ** t))
        return opt["learning_rate"]

    def _iteration_ends(self, opt: dict) -> None:
        if opt["solver"] == "sgd" and self.learning_rate == "invscaling":
            opt["learning_rate"] = float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t

    def _trigger_stopping(self, opt: dict, msg: str) -> bool:
        if opt["solver"] != "sgd" or self.learning_rate != "adaptive":
            if self.verbose:
                print(msg + " Stopping.")
            return True
        if opt["learning_rate"] <= 1e-6:
            if self.verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        opt["learning_rate"] /= 5.0
        if self.verbose:
            print(msg + " Setting learning rate to %f" % opt["learning_rate"])
        return False

    def _update_no_improvement_count_loss(self) -> None:
        if self.loss_curve_[-1] > self.best_loss_ - self.tol:
            self._no_improvement_count += 1
        else:
            self._no_improvement_count = 0
        if self.loss_curve_[-1] < self.best_loss_:
            self.best_loss_ = self.loss_curve_[-1]

    def _early_stopping_update(self, be, dtype, params, best, X_val, y_val, sw_val,
                               diverged=False):
        y_pred = None if diverged else self._predict_from(self._forward_pass_fast(
            X_val, check_input=False, params=params))
        if diverged or (np.issubdtype(np.asarray(y_pred).dtype, np.floating) and
                        not np.isfinite(y_pred).all()):
            score = np.nan  # (scikit-learn's score of NaN weights)
        else:
            score = self._score_function(y_val, y_pred, sample_weight=sw_val)
        self.validation_scores_.append(score)
        if self.verbose:
            print("Validation score: %f" % self.validation_scores_[-1])
        if score < self.best_validation_score_ + self.tol:
            self._no_improvement_count += 1
        else:
            self._no_improvement_count = 0
        if score > self.best_validation_score_:
            self.best_validation_score_ = score
            return params  # the step is functional: these arrays are never written again
        return best

    def _fit_lbfgs(self, be, dtype, params, X, y, sample_weight, layer_units):
        sums, finish = _compiled(
            be, ("lbfgs", self.activation, len(params) + 1, self.out_activation_),
            lambda: _make_value_and_grad(_acts(self.activation, len(params) + 1),
                                         _LOSSES[self.out_activation_]))
        n = X.shape[0]
        sw = np.ones((n, 1), dtype) if sample_weight is None else \
            np.asarray(sample_weight, dtype=dtype).reshape(-1, 1)
        S = float(sw.sum()) if sample_weight is not None else n
        Yh = self._targets(y, dtype)
        # the data on the device once (sparse X: densified chunk by chunk at each evaluation)
        if scipy.sparse.issparse(X):
            chunks = [(X[i:i + _BATCH_DENSE], be.asarray(Yh[i:i + _BATCH_DENSE]),
                       be.asarray(sw[i:i + _BATCH_DENSE])) for i in range(0, n, _BATCH_DENSE)]
        else:  # padded rows have weight 0 (one compiled shape for nearby data sizes)
            rows = _bucket(n) if be.compiles else n
            chunks = [(be.asarray(_padded(np.asarray(X, dtype=dtype), rows)),
                       be.asarray(_padded(Yh, rows)), be.asarray(_padded(sw, rows)))]
        shapes = [(a, b) for a, b in zip(layer_units[:-1], layer_units[1:])]
        sizes = [a * b for a, b in shapes] + [b for _, b in shapes]
        offsets = np.cumsum([0] + sizes)
        n_layers = len(shapes)

        def unpack(theta):
            out = []
            for i, (a, b) in enumerate(shapes):
                c = theta[offsets[i]:offsets[i + 1]].reshape(a, b)
                bi = theta[offsets[n_layers + i]:offsets[n_layers + i + 1]]
                out.append((be.asarray(np.ascontiguousarray(c, dtype=dtype).T),
                            be.asarray(np.asarray(bi, dtype=dtype))))
            return out

        def loss_grad(theta):
            p = unpack(theta)
            value, grads = None, None
            for xc, yc, swc in chunks:
                if scipy.sparse.issparse(xc):
                    xc = be.asarray(np.asarray(xc.toarray(), dtype=dtype))
                v, g = sums(p, xc, yc, swc)
                value = v if value is None else value + v
                grads = g if grads is None else [(a + c, b + d) for (a, b), (c, d)
                                                 in zip(grads, g)]
            value, grads = finish(value, grads, p, S, float(self.alpha))
            flat = np.hstack([be.to_numpy(gW).T.ravel() for gW, _ in grads] +
                             [be.to_numpy(gb).ravel() for _, gb in grads])
            return float(be.to_numpy(value)), flat

        theta0 = np.hstack([np.asarray(c).ravel() for c in self.coefs_] +
                           [np.asarray(b).ravel() for b in self.intercepts_])
        iprint = 1 if (self.verbose is True or self.verbose >= 1) else -1
        options = {"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol}
        try:  # scikit-learn passes iprint only to the SciPy versions that still take it
            from sklearn.utils.fixes import _get_additional_lbfgs_options_dict
            options.update(_get_additional_lbfgs_options_dict("iprint", iprint))
        except ImportError:  # pragma: no cover
            pass
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = scipy.optimize.minimize(loss_grad, theta0, method="L-BFGS-B", jac=True,
                                          options=options)
        n_iter = min(res.nit, self.max_iter)
        if res.status != 0:
            msg = (f"lbfgs failed to converge after {n_iter} iteration(s) "
                   f"(status={res.status}):\n{res.message}\n")
            if n_iter == self.max_iter:
                msg += ("\nIncrease the number of iterations to improve the convergence "
                        f"(max_iter={self.max_iter}).")
            warnings.warn(msg + "\nYou might also want to scale the data as shown in:\n"
                          "    https://scikit-learn.org/stable/modules/"
                          "preprocessing.html", ConvergenceWarning, stacklevel=3)
        self.n_iter_ = n_iter
        self.loss_ = res.fun
        return unpack(res.x)

    # -- the rest of scikit-learn's public surface --------------------------------------------
    def fit(self, X, y, sample_weight=None):
        """Fit the model to data matrix X and target(s) y (as scikit-learn's MLP ``fit``).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            NumPy, pandas, SciPy sparse, or an array of any library bpcore accepts.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self
        """
        self._validate_params()
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    def _check_solver(self):
        if self.solver not in _STOCHASTIC:
            raise AttributeError("partial_fit is only available for stochastic optimizers. "
                                 "%s is not stochastic." % self.solver)
        return True

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def __getstate__(self):
        state = super().__getstate__()
        # Optimizer state to host NumPy: a model fitted on a GPU or JAX unpickles anywhere.
        opt = state.get("_optimizer")
        if opt is not None:
            opt = dict(opt)
            opt["state"] = nested_map(lambda a: np.array(_host(a), copy=True), opt["state"])
            state["_optimizer"] = opt
        return state

    @classmethod
    def from_sklearn(cls, estimator: Any, **params: Any):
        """A bpcore estimator that continues from a fitted scikit-learn one.

        Takes ``estimator``'s parameters (``get_params()``), overridden by ``params`` (say
        ``backend="cupy"``), and its fitted state: weights, classes, counters, loss curve
        and, for sgd/adam, the optimizer's velocities or moments, so ``partial_fit`` (or
        ``fit`` with ``warm_start=True``) carries on where scikit-learn stopped.
        """
        want = _SkMLPClassifier if issubclass(cls, ClassifierMixin) else _SkMLPRegressor
        if not isinstance(estimator, want):
            raise TypeError(f"from_sklearn: expected a fitted sklearn {want.__name__}, got "
                            f"{type(estimator).__name__}")
        check_is_fitted(estimator)
        est = cls(**{**{k: v for k, v in estimator.get_params().items()
                        if k in cls().get_params()}, **params})
        # copies: training the new estimator never changes the old one (loss_curve_ grows)
        for k, v in vars(estimator).items():
            if k.endswith("_") and not k.startswith("__"):
                setattr(est, k, copy.deepcopy(v))
        for k in ("_label_binarizer", "_no_improvement_count"):
            if hasattr(estimator, k):
                setattr(est, k, copy.deepcopy(getattr(estimator, k)))
        sk_opt = getattr(estimator, "_optimizer", None)
        if sk_opt is not None and est.solver in _STOCHASTIC:
            n = len(estimator.coefs_)

            def pairs(arrays):  # scikit-learn's coefs_ + intercepts_ list -> [(W, b)]
                return [(np.array(arrays[i]).T.copy(), np.array(arrays[n + i], copy=True))
                        for i in range(n)]

            if hasattr(sk_opt, "velocities"):
                est._optimizer = {"solver": "sgd", "learning_rate": float(sk_opt.learning_rate),
                                  "state": pairs(sk_opt.velocities)}
            else:
                est._optimizer = {"solver": "adam", "learning_rate":
                                  float(sk_opt.learning_rate), "t": int(sk_opt.t),
                                  "state": (pairs(sk_opt.ms), pairs(sk_opt.vs))}
        return est


_BACKEND_DOC = """
    backend : str or bpcore Backend, default="numpy"
        Where training and prediction run: ``"numpy"``, ``"jax"``, ``"torch"``, ``"cupy"``
        (``bpcore.backends.available()``). Results are NumPy arrays on every backend.
    dtype : {"float32", "float64"} or None, default=None
        The compute dtype. None: as scikit-learn, float32 for float32 ``X`` and float64
        otherwise; on JAX without ``jax_enable_x64``, float32 with a warning.
        ``"float64"`` on JAX needs ``jax_enable_x64``.
"""

_EXTRA_CONSTRAINTS = {"backend": [str, Backend],
                      "dtype": [StrOptions({"float32", "float64"}), None]}


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """scikit-learn's ``MLPClassifier``, trained by bpcore on any backend.

    Every parameter of ``sklearn.neural_network.MLPClassifier`` with its meaning and
    default, plus ``backend`` and ``dtype``.
    """ + _BACKEND_DOC

    _parameter_constraints: dict = {**_SkMLPClassifier._parameter_constraints,
                                    **_EXTRA_CONSTRAINTS}

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 backend="numpy", dtype=None):
        self._keep_arguments(locals())

    loss = "log_loss"  # fixed, as in scikit-learn (not a parameter of the classifier)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if (not hasattr(self, "classes_")) or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in "
                        f"the previous call to fit. Previously got {self.classes_}, `y` has "
                        f"{classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError("`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {classes}.")
        y = self._label_binarizer.transform(y).astype(bool)
        return X, y

    def _predict_from(self, y_pred: np.ndarray) -> np.ndarray:
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        return self._label_binarizer.inverse_transform(y_pred)

    def _score_function(self, y, y_pred, sample_weight=None):
        return accuracy_score(y, y_pred, sample_weight=sample_weight)

    def predict(self, X):
        """Predicted classes, shape (n_samples,) or (n_samples, n_classes) for multilabel."""
        check_is_fitted(self)
        return self._predict_from(self._forward_pass_fast(X))

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y); ``classes`` (all the labels) is required on the first call."""
        self._validate_params()
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(_host(y)).startswith("multilabel"):
                self._label_binarizer.fit(_host(y))
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def predict_log_proba(self, X):
        """log of :meth:`predict_proba`."""
        y_prob = self.predict_proba(X)
        return np.log(y_prob, out=y_prob)

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes), in the order of ``classes_``."""
        check_is_fitted(self)
        y_pred = self._forward_pass_fast(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        if y_pred.ndim == 1:
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """scikit-learn's ``MLPRegressor``, trained by bpcore on any backend.

    Every parameter of ``sklearn.neural_network.MLPRegressor`` (``loss``: "squared_error"
    or "poisson") with its meaning and default, plus ``backend`` and ``dtype``.
    """ + _BACKEND_DOC

    _parameter_constraints: dict = {**_SkMLPRegressor._parameter_constraints,
                                    **_EXTRA_CONSTRAINTS}

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 backend="numpy", dtype=None):
        self._keep_arguments(locals())

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             y_numeric=True, dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        # scikit-learn's MLPRegressor trains on, with a NaN loss_curve_, where the Poisson
        # deviance is undefined; its Poisson estimators refuse, with this message. So do we.
        if self.loss == "poisson" and np.any(y < 0):
            raise ValueError("Some value(s) of y are negative which is not allowed for "
                             "Poisson regression.")
        return X, y

    def _predict_from(self, y_pred: np.ndarray) -> np.ndarray:
        return y_pred.ravel() if y_pred.shape[1] == 1 else y_pred

    def _score_function(self, y, y_pred, sample_weight=None):
        return r2_score(y, y_pred, sample_weight=sample_weight)

    def predict(self, X):
        """Predicted values, shape (n_samples,) or (n_samples, n_outputs)."""
        check_is_fitted(self)
        return self._predict_from(self._forward_pass_fast(X))

    # scikit-learn's own MLPRegressor guards partial_fit with ``_check_solver`` without calling
    # it (a bound method is always true), so its partial_fit exists for lbfgs too and then runs
    # a full L-BFGS fit. Matched: the same call does the same thing here.
    @available_if(lambda est: est._check_solver)
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y) (for lbfgs, as scikit-learn: a whole L-BFGS fit)."""
        self._validate_params()
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)
