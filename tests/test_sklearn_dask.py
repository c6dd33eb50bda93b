"""bpcore's estimators under Dask-ML's ``Incremental`` wrapper: ``partial_fit`` over the blocks
of a dask array (data larger than memory), as with scikit-learn's own estimators.

With ``shuffle_blocks=False`` the wrapper calls ``partial_fit`` on each block in order, so
bpcore's estimator must end exactly where scikit-learn's ends under the same wrapper (float64,
NumPy: to 1e-16).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
Incremental = pytest.importorskip("dask_ml.wrappers").Incremental

from sklearn.datasets import make_classification, make_regression  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkClassifier  # noqa: E402
from sklearn.neural_network import MLPRegressor as SkRegressor  # noqa: E402

from bpcore.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

CASES = {
    "classifier": (MLPClassifier, SkClassifier, "accuracy",
                   lambda: make_classification(2000, 20, n_classes=3, n_informative=8,
                                               random_state=0)),
    "regressor": (MLPRegressor, SkRegressor, "r2",
                  lambda: make_regression(2000, 20, noise=0.1, random_state=0)),
}


@pytest.mark.parametrize("solver", ["adam", "sgd"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_incremental_over_blocks_equals_scikit_learn(case, solver):
    ours, theirs, scoring, data = CASES[case]
    X, y = data()
    if case == "regressor":
        y = y / np.abs(y).max()
    Xd, yd = da.from_array(X, chunks=400), da.from_array(y, chunks=400)
    kw = {"classes": np.unique(y)} if case == "classifier" else {}
    fitted = []
    for cls in (theirs, ours):
        est = cls(hidden_layer_sizes=(32,), solver=solver, random_state=0)
        inc = Incremental(est, scoring=scoring, shuffle_blocks=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (dask's and scikit-learn's convergence notes)
            inc.fit(Xd, yd, **kw)
        fitted.append(inc.estimator_)
    sk, bp = fitted
    assert isinstance(bp, ours) and bp.n_iter_ == sk.n_iter_ and bp.t_ == sk.t_
    for a, b in zip(sk.coefs_ + sk.intercepts_, bp.coefs_ + bp.intercepts_):
        np.testing.assert_allclose(b, a, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(bp.loss_curve_, sk.loss_curve_, rtol=1e-14)
