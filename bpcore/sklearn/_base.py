"""What the classifier and the regressor share: settings, parameters between host and
device, the forward pass, ``fit`` and scikit-learn's public surface."""

from __future__ import annotations

import copy
import numbers
import warnings
from typing import Any

import numpy as np

import scipy.optimize
import scipy.sparse
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin, is_classifier
from sklearn.neural_network import MLPClassifier as _SkMLPClassifier
from sklearn.neural_network import MLPRegressor as _SkMLPRegressor
from sklearn.utils import check_random_state
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .. import backends as _backends
from .._array import Params, nested_map
from ..backends._base import Backend
from ..errors import BackendUnavailableError, DTypeError
from ..nn.mlp import forward
from ..training import interrupts

from ._engine import _Diverged, _bucket, _compiled, _host, _padded
from ._rules import (_PREDICT_CHUNK, _STOCHASTIC, OptimizerState, _Hyper, _acts,
                     _out_activation_host)
from ._solvers import _Solvers

# ---- the estimators ------------------------------------------------------------------------
class _BaseMLP(_Solvers, BaseEstimator):
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
            xb = be.place_like(be.asarray(xb), params[0][0])  # (replicated: data parallel)
            out.append(be.to_numpy(fwd(params, xb))[:n])
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
            # As scikit-learn's own fit (its _fit_context(prefer_skip_nested_validation=True)):
            # the estimator's parameters were validated; the helpers it calls inside the loop
            # (gen_batches, shuffle) skip their own argument checks, ~1 ms an epoch.
            with sklearn.config_context(skip_parameter_validation=True):
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
        workers = self._workers(be, X, y, sample_weight)
        self._random_state = check_random_state(self.random_state)
        if workers.size > 1 and not isinstance(self.random_state, numbers.Integral):
            # every worker draws the same weights, batches and validation split: worker 0's
            self._random_state = np.random.RandomState(
                workers.agree(int(self._random_state.randint(np.iinfo(np.int32).max))))
        if first_pass:
            self._initialize(y, layer_units, X.dtype)
        else:
            self._check_weights(layer_units)
        params = workers.start(self._device_params(be, dtype))
        if self.solver in _STOCHASTIC:
            with interrupts.scope():  # (its steps' commits then cost two counter updates)
                params = self._fit_stochastic(be, dtype, params, X, y, sample_weight,
                                              incremental, workers)
        else:
            params = self._fit_lbfgs(be, dtype, params, X, y, sample_weight, layer_units,
                                     workers)
        workers.check_identical(params)  # (MPI: the ranks still hold the same bits)
        self.parallel_ = workers.describe()
        self._store_params(be, params)
        if not all(np.isfinite(w).all() for w in self.coefs_ + self.intercepts_):
            raise _Diverged("Solver produced non-finite parameter weights. The input data "
                            "may contain large values and need to be preprocessed.")
        return self

    def _workers(self, be: Backend, X: Any, y: Any, sample_weight: Any) -> Any:
        """The data-parallel engine for ``data_parallel`` (:mod:`bpcore.parallel`; the single
        worker when there is nothing to split). Every MPI rank must pass the same data:
        checked here, on every rank at once, before any step."""
        from .. import parallel

        workers = parallel.setup(be, self.data_parallel) or parallel.SINGLE
        workers.check_same("fit", workers.data_settings(np.asarray, X, y, sample_weight))
        return workers

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
            opt = OptimizerState(opt)
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
                est._optimizer = OptimizerState(solver="sgd",
                                                learning_rate=float(sk_opt.learning_rate),
                                                state=pairs(sk_opt.velocities))
            else:
                est._optimizer = OptimizerState(solver="adam",
                                                learning_rate=float(sk_opt.learning_rate),
                                                t=int(sk_opt.t),
                                                state=(pairs(sk_opt.ms), pairs(sk_opt.vs)))
        return est
