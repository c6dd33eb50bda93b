"""``MLPClassifier`` and ``MLPRegressor``: scikit-learn's estimators, trained by bpcore."""

from __future__ import annotations


import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.metrics import accuracy_score, r2_score
from sklearn.neural_network import MLPClassifier as _SkMLPClassifier
from sklearn.neural_network import MLPRegressor as _SkMLPRegressor
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import column_or_1d
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import (_check_partial_fit_first_call, type_of_target,
                                      unique_labels)
from sklearn.utils.validation import check_is_fitted, validate_data

from ..backends._base import Backend

from ._base import _BaseMLP
from ._engine import _host

_BACKEND_DOC = """
    backend : str or bpcore Backend, default="numpy"
        Where training and prediction run: ``"numpy"``, ``"jax"``, ``"torch"``, ``"cupy"``
        (``bpcore.backends.available()``). Results are NumPy arrays on every backend.
    dtype : {"float32", "float64"} or None, default=None
        The compute dtype. None: as scikit-learn, float32 for float32 ``X`` and float64
        otherwise; on JAX without ``jax_enable_x64``, float32 with a warning.
        ``"float64"`` on JAX needs ``jax_enable_x64``.
    data_parallel : bool, default=False
        Split every batch (every full-batch pass, for lbfgs) across workers
        (:mod:`bpcore.parallel`): on the jax backend across every JAX device (the batch
        sharded, XLA's all-reduce inside the compiled step); on numpy, torch and cupy across
        the ranks of ``mpiexec -n N`` (each rank sums its rows, one ``Allreduce`` adds them).
        Every rank calls ``fit`` with the same data and gets the same model: the one a
        single process fits, to round-off. Without ``mpiexec`` or with one JAX device it
        changes nothing. After ``fit``, ``parallel_`` says how it was split ("one worker",
        "MPI, rank 0 of 2", "JAX sharding over 4 devices in 1 process(es)").
"""

_EXTRA_CONSTRAINTS = {"backend": [str, Backend],
                      "dtype": [StrOptions({"float32", "float64"}), None],
                      "data_parallel": ["boolean"]}


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """scikit-learn's ``MLPClassifier``, trained by bpcore on any backend.

    Every parameter of ``sklearn.neural_network.MLPClassifier`` with its meaning and
    default, plus ``backend``, ``dtype`` and ``data_parallel``.
    """ + _BACKEND_DOC

    _parameter_constraints: dict = {**_SkMLPClassifier._parameter_constraints,
                                    **_EXTRA_CONSTRAINTS}

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 backend="numpy", dtype=None, data_parallel=False):
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
    or "poisson") with its meaning and default, plus ``backend``, ``dtype`` and
    ``data_parallel``.
    """ + _BACKEND_DOC

    _parameter_constraints: dict = {**_SkMLPRegressor._parameter_constraints,
                                    **_EXTRA_CONSTRAINTS}

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 backend="numpy", dtype=None, data_parallel=False):
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
