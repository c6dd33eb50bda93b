"""bpcore.sklearn: scikit-learn's MLP estimators, the same fitted model on every backend.

The drop-in claim is tested against the installed scikit-learn itself: the same
hyperparameters and ``random_state`` give the same ``coefs_``, ``intercepts_`` and
``loss_curve_`` to 1e-10 in float64, on every backend.
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
import scipy.sparse  # noqa: E402
from sklearn import neural_network as sknn  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits, make_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils._param_validation import InvalidParameterError  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from bpcore.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

from .conftest import _backend_or_skip  # noqa: E402

# In the GPU check (BPCORE_TESTS=gpu) these tests run after every other GPU test.
pytestmark = pytest.mark.gpu_last

CHECK_BACKENDS = ["numpy", "jax", "torch", "cupy"]
EXACT = 1e-10
quiet = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _assert_same_fit(sk, bp, tol=EXACT):
    assert len(sk.coefs_) == len(bp.coefs_)
    for a, b in zip(sk.coefs_ + sk.intercepts_, bp.coefs_ + bp.intercepts_):
        assert isinstance(b, np.ndarray) and a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=tol)
    if hasattr(sk, "loss_curve_"):
        np.testing.assert_allclose(bp.loss_curve_, sk.loss_curve_, rtol=0, atol=tol)
    np.testing.assert_allclose(bp.loss_, sk.loss_, rtol=0, atol=tol)
    assert (bp.n_iter_, bp.t_) == (sk.n_iter_, sk.t_)
    for name in ("n_layers_", "n_outputs_", "out_activation_", "n_features_in_"):
        if hasattr(sk, name):
            assert getattr(bp, name) == getattr(sk, name), name
    for name in ("best_loss_", "best_validation_score_"):
        if getattr(sk, name, None) is not None:
            np.testing.assert_allclose(getattr(bp, name), getattr(sk, name), atol=tol)
    if getattr(sk, "validation_scores_", None) is not None:
        np.testing.assert_allclose(bp.validation_scores_, sk.validation_scores_, atol=tol)


def _both(est_sk, est_bp, X, y, **fit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", "Got `batch_size`", UserWarning)  # both clip it
        return est_sk.fit(X, y, **fit), est_bp.fit(X, y, **fit)


# ---- scikit-learn's own estimator checks, on every backend --------------------------------
@pytest.mark.gpu_last(per_backend=True)
@pytest.mark.extended(thin=["torch"])  # (numpy runs every check in the default run)
@pytest.mark.parametrize("backend_name", CHECK_BACKENDS)
@quiet
@parametrize_with_checks([MLPClassifier(max_iter=100), MLPRegressor(max_iter=100)])
def test_sklearn_estimator_checks(estimator, check, backend_name):
    """All of ``check_estimator``'s checks (max_iter=100, as scikit-learn runs its own MLPs
    through them); none is expected to fail, and we skip none. Three skip themselves, on
    scikit-learn's side, as they do for scikit-learn's own MLPs:
    ``check_array_api_input`` (both estimators: it runs only with ``SCIPY_ARRAY_API=1``) and
    ``check_classifiers_multilabel_output_format_decision_function`` (the MLP has no
    ``decision_function``)."""
    _backend_or_skip(backend_name)
    check(estimator.set_params(backend=backend_name))


# ---- the drop-in claim: scikit-learn's fitted model to 1e-10 -------------------------------
X3, y3 = make_classification(160, 8, n_informative=5, n_classes=3, random_state=0)
Xr, yr = make_regression(150, 6, n_targets=2, noise=0.1, random_state=1)
yr = yr / np.abs(yr).max()

SOLVERS = {
    "sgd-nesterov": dict(solver="sgd", momentum=0.9, nesterovs_momentum=True),
    "sgd-momentum": dict(solver="sgd", momentum=0.8, nesterovs_momentum=False),
    "sgd-invscaling": dict(solver="sgd", momentum=0.5, learning_rate="invscaling",
                           power_t=0.3),
    "adam": dict(solver="adam", beta_1=0.8, beta_2=0.99, epsilon=1e-7),
    "lbfgs": dict(solver="lbfgs"),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("task", ["binary", "multiclass", "regressor", "multioutput"])
def test_same_fit_as_sklearn(backend, solver, task):
    _skip_float64_unavailable(backend)
    common = dict(hidden_layer_sizes=(12, 7), activation="tanh", alpha=3e-3, max_iter=6,
                  random_state=3, batch_size=25, learning_rate_init=0.03, **SOLVERS[solver])
    if task in ("binary", "multiclass"):
        y = (y3 > 0).astype(int) if task == "binary" else y3
        sk, bp = _both(sknn.MLPClassifier(**common),
                       MLPClassifier(backend=backend.name, **common), X3, y)
        np.testing.assert_allclose(bp.predict_proba(X3), sk.predict_proba(X3), atol=EXACT)
        np.testing.assert_array_equal(bp.predict(X3), sk.predict(X3))
    else:
        y = yr[:, 0] if task == "regressor" else yr
        sk, bp = _both(sknn.MLPRegressor(**common), MLPRegressor(backend=backend.name, **common),
                       Xr, y)
        np.testing.assert_allclose(bp.predict(Xr), sk.predict(Xr), atol=EXACT)
    _assert_same_fit(sk, bp)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "cupy"])
def test_stochastic_solvers_run_the_buffered_executor(backend_name, monkeypatch):
    """On a backend with in-place operations every batch is a step of bpcore's buffered
    executor (the Trainer's), not a second engine; the 1e-10 tests above then hold it to
    scikit-learn (early stopping included: its best weights are copied out of the buffers)."""
    from bpcore.training.buffered import BufferedStep

    be = _backend_or_skip(backend_name)
    calls = []
    real = BufferedStep.step
    monkeypatch.setattr(BufferedStep, "step",
                        lambda self, *a: calls.append(1) or real(self, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier((8,), solver="sgd", batch_size=20, max_iter=2, random_state=0,
                            backend=be.name).fit(X3[:100], y3[:100])
    assert len(calls) == 2 * 5 and est.n_iter_ == 2


def _skip_float64_unavailable(backend):
    if backend.float64_error():
        pytest.skip(backend.float64_error())


@pytest.mark.parametrize("activation", ["identity", "logistic", "relu"])
@pytest.mark.parametrize("extra", [
    dict(sample_weight=True),
    dict(early_stopping=True, validation_fraction=0.2, n_iter_no_change=2, max_iter=12),
    dict(learning_rate="adaptive", n_iter_no_change=1, tol=10.0, solver="sgd", max_iter=8),
    dict(shuffle=False, batch_size=1000),
    dict(loss="poisson"),
])
def test_same_fit_as_sklearn_options(activation, extra):
    """Sample weights, early stopping (validation split, best weights restored), the
    adaptive learning rate, no shuffling with a clipped batch size, the Poisson loss."""
    extra = dict(extra)
    fit = {}
    if extra.pop("sample_weight", False):
        fit["sample_weight"] = np.random.default_rng(0).uniform(0.1, 3.0, len(X3))
    poisson = extra.pop("loss", None) == "poisson"
    common = dict(hidden_layer_sizes=(10,), activation=activation, alpha=1e-2, max_iter=5,
                  random_state=7, batch_size=32, learning_rate_init=0.02, momentum=0.9)
    common.update(extra)
    if poisson:
        y = np.random.default_rng(1).poisson(np.exp(0.3 * X3[:, 0]))
        sk, bp = _both(sknn.MLPRegressor(loss="poisson", **common),
                       MLPRegressor(loss="poisson", **common), X3, y, **fit)
        assert bp.out_activation_ == "exp"
    else:
        sk, bp = _both(sknn.MLPClassifier(**common), MLPClassifier(**common), X3, y3, **fit)
    _assert_same_fit(sk, bp)


def test_partial_fit_matches_sklearn_with_string_labels(backend):
    _skip_float64_unavailable(backend)
    labels = np.array(["cat", "dog", "eel"])[y3]
    common = dict(hidden_layer_sizes=(9,), solver="sgd", random_state=0, alpha=1e-3,
                  learning_rate_init=0.05)
    sk, bp = sknn.MLPClassifier(**common), MLPClassifier(backend=backend.name, **common)
    for i in range(0, len(X3), 40):
        kw = dict(classes=np.array(["cat", "dog", "eel", "fox"])) if i == 0 else {}
        sk.partial_fit(X3[i:i + 40], labels[i:i + 40], **kw)
        bp.partial_fit(X3[i:i + 40], labels[i:i + 40], **kw)
    _assert_same_fit(sk, bp)
    assert list(bp.classes_) == ["cat", "dog", "eel", "fox"]
    assert bp.predict(X3[:5]).dtype == sk.predict(X3[:5]).dtype
    np.testing.assert_array_equal(bp.predict(X3), sk.predict(X3))


def test_multilabel_and_sparse_inputs():
    Y = np.stack([y3 == 0, y3 == 1, X3[:, 0] > 0], axis=1).astype(int)
    common = dict(hidden_layer_sizes=(8,), max_iter=4, random_state=0, batch_size=40)
    sk, bp = _both(sknn.MLPClassifier(**common), MLPClassifier(**common), X3, Y)
    _assert_same_fit(sk, bp)
    assert bp.predict(X3).shape == Y.shape and bp.out_activation_ == "logistic"
    # sparse X (matrix and array, csr and csc) fits the model dense X fits
    for make in (scipy.sparse.csr_matrix, scipy.sparse.csc_array):
        for solver in ("adam", "lbfgs"):
            Xs = make(np.where(np.abs(X3) > 0.8, X3, 0.0))
            _, dense = _both(sknn.MLPClassifier(solver=solver, **common),
                             MLPClassifier(solver=solver, **common), Xs.toarray(), y3)
            sk, sparse = _both(sknn.MLPClassifier(solver=solver, **common),
                               MLPClassifier(solver=solver, **common), Xs, y3)
            _assert_same_fit(sk, sparse)
            _assert_same_fit(dense, sparse, tol=1e-12)
            np.testing.assert_allclose(sparse.predict_proba(Xs), dense.predict_proba(Xs))


def test_from_sklearn_continues_where_sklearn_stopped(backend):
    """A fitted scikit-learn model moved over keeps training exactly as scikit-learn would:
    weights, counters and the optimizer's moments travel."""
    _skip_float64_unavailable(backend)
    for solver in ("sgd", "adam"):
        sk = sknn.MLPClassifier(hidden_layer_sizes=(10,), solver=solver, random_state=0,
                                max_iter=3, learning_rate_init=0.05)
        with pytest.warns(ConvergenceWarning):
            sk.fit(X3, y3)
        bp = MLPClassifier.from_sklearn(sk, backend=backend.name)
        assert bp.loss_curve_ is not sk.loss_curve_ and bp.coefs_[0] is not sk.coefs_[0]
        assert bp.backend == backend.name and bp.get_params()["max_iter"] == 3
        np.testing.assert_array_equal(bp.predict(X3), sk.predict(X3))
        for _ in range(3):
            sk.partial_fit(X3, y3)
            bp.partial_fit(X3, y3)
        _assert_same_fit(sk, bp)
    with pytest.raises(TypeError, match="fitted sklearn MLPRegressor"):
        MLPRegressor.from_sklearn(sk)


def test_warm_start_from_assigned_weights():
    """coefs_/intercepts_ are the truth: assigned weights are what fit continues from."""
    common = dict(hidden_layer_sizes=(6,), max_iter=3, random_state=0, warm_start=True)
    sk, bp = _both(sknn.MLPClassifier(**common), MLPClassifier(**common), X3, y3)
    rng = np.random.default_rng(5)
    new = [rng.standard_normal(c.shape) * 0.1 for c in sk.coefs_]
    sk.coefs_, bp.coefs_ = [c.copy() for c in new], [c.copy() for c in new]
    sk.intercepts_[0][:] = 0.5
    bp.intercepts_[0][:] = 0.5  # modified in place: seen too
    _both(sk, bp, X3, y3)
    _assert_same_fit(sk, bp)


# ---- everything a pipeline user does --------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["numpy", "jax", "torch", "cupy"])
def test_pickle_clone_pipeline_and_search(backend_name):
    be = _backend_or_skip(backend_name)
    _skip_float64_unavailable(be)
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0,
                        backend=backend_name)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X3, y3)
    blob = pickle.dumps(clf)
    back = pickle.loads(blob)
    for a in back._optimizer["state"][0] + back._optimizer["state"][1]:
        assert type(a[0]) is np.ndarray and type(a[1]) is np.ndarray  # host arrays: unpickles where the backend is absent
    np.testing.assert_array_equal(back.predict_proba(X3), clf.predict_proba(X3))
    for est in (clf, back):  # both continue identically
        est.partial_fit(X3, y3)
    np.testing.assert_array_equal(back.coefs_[0], clf.coefs_[0])
    assert clone(clf).get_params() == clf.get_params() and not hasattr(clone(clf), "coefs_")
    settings = dict(hidden_layer_sizes=(8,), max_iter=150, random_state=0,
                    learning_rate_init=0.01)
    pipe = make_pipeline(StandardScaler(), MLPClassifier(backend=backend_name, **settings))
    sk_pipe = make_pipeline(StandardScaler(), sknn.MLPClassifier(**settings))
    grid = {"mlpclassifier__alpha": [1e-4, 1.0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(pipe, X3, y3, cv=3)
        search = GridSearchCV(pipe, grid, cv=2).fit(X3, y3)
        sk_search = GridSearchCV(sk_pipe, grid, cv=2).fit(X3, y3)
        np.testing.assert_allclose(scores, cross_val_score(sk_pipe, X3, y3, cv=3))
    assert np.all(scores > 0.6), scores  # chance is 1/3
    np.testing.assert_allclose(search.cv_results_["mean_test_score"],
                               sk_search.cv_results_["mean_test_score"])
    assert search.best_params_ == sk_search.best_params_


def test_inputs_from_pandas_and_other_array_libraries():
    pd = pytest.importorskip("pandas")
    torch = pytest.importorskip("torch")
    df = pd.DataFrame(X3, columns=[f"f{i}" for i in range(X3.shape[1])])
    reg = MLPRegressor(hidden_layer_sizes=(5,), max_iter=3, random_state=0)
    with pytest.warns(ConvergenceWarning):
        reg.fit(df, pd.Series(0.5 * X3[:, 1]))
    assert list(reg.feature_names_in_) == list(df.columns)
    with pytest.warns(UserWarning, match="feature names"):
        reg.predict(X3)  # as scikit-learn: fitted with names, predicted without
    with pytest.warns(UserWarning, match="feature names"):
        out = reg.predict(torch.from_numpy(X3.copy()))
    assert isinstance(out, np.ndarray) and out.shape == (len(X3),)
    np.testing.assert_array_equal(out, reg.predict(df))


# ---- errors and warnings: scikit-learn's, for the same misuse -------------------------------
def test_same_errors_as_sklearn():
    for Est, Sk in ((MLPClassifier, sknn.MLPClassifier), (MLPRegressor, sknn.MLPRegressor)):
        for bad in (dict(solver="newton"), dict(alpha=-1.0), dict(max_iter=0),
                    dict(momentum=1.5), dict(batch_size="big")):
            with pytest.raises(InvalidParameterError) as ours:
                Est(**bad).fit(X3, y3)
            with pytest.raises(InvalidParameterError) as theirs:
                Sk(**bad).fit(X3, y3)
            assert str(ours.value) == str(theirs.value)
        with pytest.raises(NotFittedError):
            Est().predict(X3)
        with pytest.raises(ValueError, match="hidden_layer_sizes must be > 0"):
            Est(hidden_layer_sizes=(4, 0)).fit(X3, y3)
        fitted = Est(hidden_layer_sizes=(3,), max_iter=1)
        with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
            fitted.fit(X3, y3)
        with pytest.raises(ValueError, match="features"):
            fitted.predict(X3[:, :5])
    for Est in (MLPClassifier, sknn.MLPClassifier):  # scikit-learn's available_if message
        with pytest.raises(AttributeError, match="has no attribute 'partial_fit'") as e:
            Est(solver="lbfgs").partial_fit(X3, y3, classes=[0, 1, 2])
        assert "not stochastic" in str(e.value.__cause__)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        MLPClassifier().partial_fit(X3, y3)
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X3, y3, classes=[0, 1, 2])
    with pytest.raises(InvalidParameterError, match="'dtype'"):
        MLPClassifier(dtype="float16").fit(X3, y3)
    with pytest.raises(ImportError, match="nonexistent"):
        MLPClassifier(backend="nonexistent").fit(X3, y3)


def test_lbfgs_convergence_warning_and_max_fun():
    for kw in (dict(max_iter=2), dict(max_fun=3)):
        with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge") as ours:
            bp = MLPClassifier(solver="lbfgs", random_state=0, **kw).fit(X3, y3)
        with pytest.warns(ConvergenceWarning) as theirs:
            sk = sknn.MLPClassifier(solver="lbfgs", random_state=0, **kw).fit(X3, y3)
        assert str(ours[0].message) == str(theirs[0].message)
        _assert_same_fit(sk, bp)


def test_lbfgs_runs_scipys_own_blas_on_one_thread_and_restores_it(monkeypatch):
    """Where SciPy bundles its own BLAS (``scipy.libs``), L-BFGS-B runs it on one thread (its
    spinning threads took the cores from NumPy's products: the fit 2.5x slower), and every
    library's thread count is as before afterwards. The fit is scikit-learn's to 1e-10."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.optimize as so

    def counts():
        return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}

    before = counts()
    seen = []
    real = so.minimize

    def spy(*a, **k):
        seen.append(counts())
        return real(*a, **k)

    monkeypatch.setattr(so, "minimize", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        bp = MLPClassifier(solver="lbfgs", max_iter=20, random_state=0).fit(X3, y3)
    monkeypatch.undo()
    assert seen and counts() == before
    scipys = [f for f in before if os.path.basename(os.path.dirname(f)) == "scipy.libs"]
    for f, n in seen[0].items():
        assert n == (1 if f in scipys else before[f]), (f, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = sknn.MLPClassifier(solver="lbfgs", max_iter=20, random_state=0).fit(X3, y3)
    _assert_same_fit(sk, bp)


def test_diverging_fit_raises_and_keeps_the_last_good_weights():
    """scikit-learn raises after storing non-finite weights; bpcore refuses the first
    non-finite step, raises scikit-learn's ValueError, and keeps the weights before it."""
    Xbig = X3 * 1e150
    clf = MLPClassifier(solver="sgd", learning_rate_init=1e6, momentum=0.0, max_iter=5,
                        random_state=0, hidden_layer_sizes=(5,))
    with pytest.raises(ValueError, match="non-finite parameter weights"):
        clf.fit(Xbig, y3)
    assert all(np.isfinite(a).all() for a in clf.coefs_ + clf.intercepts_)
    with pytest.raises(ValueError, match="non-finite"), np.errstate(all="ignore"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow, then "did not converge", then the error
        sknn.MLPClassifier(solver="sgd", learning_rate_init=1e6, momentum=0.0, max_iter=5,
                           random_state=0, hidden_layer_sizes=(5,)).fit(Xbig, y3)


# ---- accuracy on a real dataset, on every backend, in float32 -------------------------------
@pytest.mark.slow
def test_digits_accuracy_within_one_point_of_sklearn(backend):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0)
    common = dict(hidden_layer_sizes=(64,), max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = sknn.MLPClassifier(**common).fit(Xtr, ytr).score(Xte, yte)
        ours = MLPClassifier(backend=backend.name, dtype="float32", **common).fit(Xtr, ytr)
    assert ours.coefs_[0].dtype == np.float32
    assert abs(ours.score(Xte, yte) - ref) <= 0.01, (ours.score(Xte, yte), ref)


def test_clear_errors_for_what_scikit_learn_leaves_to_a_traceback():
    """Weights that do not fit the layers, and a fitted model moved to a machine without its
    backend, are explained; scikit-learn would fail inside a matrix product."""
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0, warm_start=True)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X3, y3)
    clf.coefs_[0] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"coefs_ \[\(3, 4\), \(4, 3\)\].*expected coefs_ "
                                         r"\[\(8, 4\), \(4, 3\)\]"):
        clf.fit(X3, y3)
    try:
        import bpcore

        bpcore.backends.get("cupy")
        pytest.skip("CuPy is usable here")
    except ImportError:
        pass
    fitted = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0)
    with pytest.warns(ConvergenceWarning):
        fitted.fit(X3, y3)
    fitted.set_params(backend="cupy")
    with pytest.raises(ImportError, match=r"set_params\(backend='numpy'\)"):
        fitted.predict(X3)
    assert fitted.set_params(backend="numpy").predict(X3).shape == y3.shape


def test_float64_on_jax_without_x64_trains_in_float32_with_a_warning():
    """JAX computes in float32 unless 64-bit mode is on. A drop-in user who changes only
    ``backend="jax"`` on float64 X (scikit-learn's default) gets a working fit in JAX's
    float32 and a one-line warning that names both ways to choose; an explicit
    ``dtype="float64"`` is still a clear error."""
    pytest.importorskip("jax")
    import subprocess
    import sys

    code = ("import warnings, numpy as np\n"
            "from bpcore.sklearn import MLPClassifier\n"
            "X, y = np.random.default_rng(0).standard_normal((40, 3)), [0, 1] * 20\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    c = MLPClassifier(backend='jax', max_iter=3).fit(X, y)\n"
            "mine = [x for x in w if 'trained in float32' in str(x.message)]\n"
            "print(c.coefs_[0].dtype, c.predict(X).shape, len(mine))\n"
            "print(mine[0].message)\n"
            "try:\n"
            "    MLPClassifier(backend='jax', dtype='float64').fit(X, y)\n"
            "except TypeError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    lines = out.stdout.splitlines()
    assert lines[0] == "float32 (40,) 1", out
    assert "trained in float32" in lines[1] and "dtype='float32'" in lines[1]
    assert "jax_enable_x64" in lines[1]
    assert "MLPClassifier(backend='jax', dtype='float64') computes in float64" in out.stdout


def test_jax_compiles_one_step_for_nearby_data_sizes_and_the_last_batch():
    """A grid search's folds differ in size by a few rows, and most epochs end with a short
    batch: on JAX each would otherwise be a new compilation (about a second each)."""
    jax = pytest.importorskip("jax")
    import bpcore.sklearn._engine as bsk

    bsk._COMPILED.clear()
    common = dict(hidden_layer_sizes=(5,), max_iter=2, batch_size=32, random_state=0,
                  backend="jax")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for n in (150, 151, 157):  # 150 = 4 x 32 + 22: a short last batch
            MLPClassifier(**common).fit(X3[:n], y3[:n]).predict(X3[:n])
    steps = [fns[1] for key, fns in bsk._COMPILED.items() if "step" in key]
    assert len(steps) == 1
    if not hasattr(steps[0], "_cache_size"):
        pytest.skip(f"jax {jax.__version__} does not expose a jit cache size")
    assert steps[0]._cache_size() == 1
    forward = [fns[0] for key, fns in bsk._COMPILED.items() if "forward" in key]
    assert forward[0]._cache_size() == 1


def test_a_failed_call_leaves_the_estimator_as_it_was():
    """An error after validation (here: a backend that cannot run) must not leave a model
    that looks fitted with untrained weights, nor advance a fitted model's counters."""
    try:
        import bpcore

        bpcore.backends.get("cupy")
        pytest.skip("CuPy is usable here")
    except ImportError:
        pass
    fresh = MLPClassifier(backend="cupy")
    with pytest.raises(ImportError):
        fresh.fit(X3, y3)
    assert not hasattr(fresh, "coefs_") and not hasattr(fresh, "classes_")
    with pytest.raises(NotFittedError):
        fresh.predict(X3)
    fitted = MLPClassifier(hidden_layer_sizes=(4,), solver="sgd", random_state=0)
    fitted.partial_fit(X3, y3, classes=[0, 1, 2])
    state = {k: (np.copy(v) if isinstance(v, np.ndarray) else copy.deepcopy(v))
             for k, v in vars(fitted).items() if k.endswith("_")}
    with pytest.raises(ImportError):
        fitted.set_params(backend="cupy").partial_fit(X3, y3)
    fitted.set_params(backend="numpy")
    for k, v in state.items():
        got = getattr(fitted, k)
        if isinstance(v, list) and v and isinstance(v[0], np.ndarray):
            for a, b in zip(got, v):
                np.testing.assert_array_equal(a, b)
        elif isinstance(v, np.ndarray):
            np.testing.assert_array_equal(got, v)
        else:
            assert got == v, k


def test_a_backend_object_as_the_parameter_survives_clone_and_pickle():
    import bpcore

    be = bpcore.backends.get("numpy")
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0, backend=be)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X3, y3)
    assert clone(clf).backend is be  # a Backend is copied as itself
    back = pickle.loads(pickle.dumps(clf))  # and pickled by its registry name
    assert back.backend is be
    np.testing.assert_array_equal(back.predict_proba(X3), clf.predict_proba(X3))


def test_poisson_refuses_negative_targets():
    """scikit-learn's MLPRegressor fits on with a NaN loss_curve_; a loss computed as if the
    targets were counts would look fine and mean nothing. Refused, with the message of
    scikit-learn's Poisson estimators; a fitted model is left as it was."""
    reg = MLPRegressor(loss="poisson", hidden_layer_sizes=(3,), max_iter=2, random_state=0)
    with pytest.warns(ConvergenceWarning):
        reg.fit(X3, np.abs(X3[:, 0]))
    before = [c.copy() for c in reg.coefs_]
    with pytest.raises(ValueError, match="negative which is not allowed for Poisson"):
        reg.fit(X3, X3[:, 0])
    for a, b in zip(reg.coefs_, before):
        np.testing.assert_array_equal(a, b)


def test_partial_fit_keeps_its_optimizer_after_set_params_solver():
    """scikit-learn's partial_fit goes on with the optimizer it made (Adam, here) after
    set_params(solver="sgd"); so does the drop-in (a new fit starts afresh)."""
    X, y = make_classification(120, 6, n_informative=4, random_state=0)
    kw = dict(hidden_layer_sizes=(7,), solver="adam", random_state=0, batch_size=40)
    sk, bp = sknn.MLPClassifier(**kw), MLPClassifier(**kw)
    for est in (sk, bp):
        est.partial_fit(X, y, classes=[0, 1])
        est.set_params(solver="sgd")
        est.partial_fit(X, y)
        est.partial_fit(X, y)
    _assert_same_fit(sk, bp)


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_float32_runs_of_the_reported_kind_agree_with_scikit_learn(backend):
    """make_classification with 40 informative features and 5 classes, hidden (256, 256),
    Adam, float32: the loss curves of every backend agree with scikit-learn's own float32
    fit to float32 round-off. (Over 20 epochs of this run the curves stay equal until
    Adam's late phase, where a loss spike appears or not depending on round-off alone: a
    different BLAS, thread count or a 1-ulp change of X moves it, on scikit-learn's own code
    too; see docs/sklearn.md. So the comparison is over the epochs before that phase.)"""
    _backend_or_skip(backend)
    X, y = make_classification(4000, 100, n_informative=40, n_classes=5, random_state=0)
    X = X.astype(np.float32)
    kw = dict(hidden_layer_sizes=(256, 256), max_iter=4, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = sknn.MLPClassifier(**kw).fit(X, y)
        bp = MLPClassifier(backend=backend, **kw).fit(X, y)
    np.testing.assert_allclose(bp.loss_curve_, sk.loss_curve_, rtol=1e-3)
    assert bp.coefs_[0].dtype == np.float32


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_one_late_step_is_as_exact_in_float32_on_every_backend(backend):
    """Far into training (confident predictions, small gradients, Adam's moments small),
    one step in float32 is within float32 round-off of the same step in float64, on every
    backend alike: no backend's arithmetic is less exact where training is most sensitive."""
    import bpcore.sklearn._engine as bs
    from bpcore.sklearn import _rules
    from bpcore._array import nested_leaves, nested_map

    be = _backend_or_skip(backend)
    X, y = make_classification(2000, 20, n_informative=10, n_classes=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        c = MLPClassifier(hidden_layer_sizes=(32, 32), max_iter=60, random_state=0,
                          dtype="float64", learning_rate_init=3e-3).fit(X, y)
    assert c.loss_ < 0.1
    ms, vs = c._optimizer["state"]
    params = [(W.T.copy(), b.copy()) for W, b in zip(c.coefs_, c.intercepts_)]
    Y = c._label_binarizer.transform(y).astype(np.float64)
    h = c._hyper(c._optimizer["learning_rate"])

    def one_step(be, dtype):
        step, _ = bs._make_step(_rules._acts("relu", 4), _rules._LOSSES["softmax"], "adam", True,
                                select_on_host=not (be.compiles or be.asynchronous),
                                rows=be.rows)
        to = lambda a: be.asarray(np.asarray(a, dtype=dtype))  # noqa: E731
        out = step(nested_map(to, params), (nested_map(to, ms), nested_map(to, vs)),
                   be.asarray(np.zeros((), bool)), to(X[:200]), to(Y[:200]),
                   to(np.ones((200, 1))), h)
        return [np.asarray(be.to_numpy(a), np.float64) for a in nested_leaves(out[:2])]

    ref = one_step(_backend_or_skip("numpy"), "float64")
    got = one_step(be, "float32")
    old = [np.asarray(a, np.float64) for a in nested_leaves(params)]
    for g, r, p in zip(got, ref, old):  # the update itself, against float64's update
        assert np.abs((g - p) - (r - p)).max() <= 1e-3 * np.abs(r - p).max() + 1e-7


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_diverging_fit_under_early_stopping_returns_the_best_model(backend):
    """scikit-learn's own regression test for its issue 29504: a diverging fit with
    early_stopping=True does not raise; it scores NaN and keeps the best validation model."""
    _backend_or_skip(backend)
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    mlp = MLPRegressor(hidden_layer_sizes=100, activation="identity", solver="sgd",
                       alpha=0.0001, learning_rate="constant", learning_rate_init=1,
                       shuffle=True, max_iter=20, early_stopping=True, n_iter_no_change=10,
                       random_state=0, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(X, y)
    assert str(mlp.validation_scores_[-1]) == str(np.nan)
    assert isinstance(mlp.validation_scores_[-1], float)
    assert all(np.isfinite(w).all() for w in mlp.coefs_ + mlp.intercepts_)
    assert np.isfinite(mlp.predict(X)).all()
