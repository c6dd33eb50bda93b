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

try:  # (one clear error when scikit-learn or SciPy is missing)
    import scipy.optimize
    import sklearn.neural_network
    from sklearn.utils.validation import validate_data  # (scikit-learn >= 1.6)
except ImportError as _e:  # pragma: no cover - depends on the installation
    raise ImportError(f"bpcore.sklearn needs scikit-learn >= 1.6 and SciPy ({_e}). Install "
                      "them with: pip install \"bpcore[sklearn]\"") from None
del scipy, sklearn, validate_data

from ._estimators import MLPClassifier, MLPRegressor

__all__ = ["MLPClassifier", "MLPRegressor"]
