"""scikit-learn's own tests of its MLP estimators, run on bpcore's.

The installed scikit-learn's ``neural_network/tests/test_mlp.py`` is copied with its one
import of the estimators swapped for ``bpcore.sklearn``'s and run as it is: every test must
pass (divergence under early stopping, warm starts, partial_fit, learning-rate schedules,
pickling, its gradient check of the L-BFGS objective and the rest), on NumPy, PyTorch and
(extended tier) JAX. Skipped where the installed scikit-learn ships without its tests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

IMPORT = "from sklearn.neural_network import MLPClassifier, MLPRegressor"
# scikit-learn's conftest gives its tests a seed through this fixture (default 42).
CONFTEST = """
import os
import pytest


@pytest.fixture
def global_random_seed():
    return int(os.environ.get("SKLEARN_TESTS_GLOBAL_RANDOM_SEED", "42"))
"""


def _upstream() -> Path:
    spec = importlib.util.find_spec("sklearn.neural_network")
    path = Path(spec.origin).parent / "tests" / "test_mlp.py"
    if not path.exists():
        pytest.skip(f"this scikit-learn installation has no tests ({path})")
    return path


# The swapped import; on another backend, the estimators' default backend set to it (their
# keyword defaults, which get_params and clone read too), so every estimator that
# scikit-learn's tests build trains there, and a test of ours that proves it.
SWAPPED = "from bpcore.sklearn import MLPClassifier, MLPRegressor"
ON_BACKEND = """
for _Estimator in (MLPClassifier, MLPRegressor):
    _Estimator.__init__.__kwdefaults__["backend"] = {backend!r}


def test_bpcore_estimators_train_on_the_chosen_backend(monkeypatch):
    import numpy as _np
    import bpcore.sklearn._base as _base

    seen = []
    real = _base._backends.get
    monkeypatch.setattr(_base._backends, "get", lambda name: seen.append(name) or real(name))
    rng = _np.random.default_rng(0)
    MLPClassifier(max_iter=2).fit(rng.standard_normal((40, 3)), rng.integers(0, 2, 40))
    assert seen and set(seen) == {{{backend!r}}}, seen
"""


# (not named "backend": the GPU check's selection would take these subprocess runs too)
@pytest.mark.parametrize("estimator_backend", [
    "numpy", "torch", pytest.param("jax", marks=pytest.mark.extended)])
def test_scikit_learns_own_mlp_tests_pass_on_bpcore(tmp_path, estimator_backend):
    """On NumPy, PyTorch and (extended tier) JAX, in 64-bit mode as its float64 tests need:
    without it JAX trains float64 data in float32, with a warning, by design."""
    from .conftest import _backend_or_skip

    _backend_or_skip(estimator_backend)
    source = _upstream().read_text(encoding="utf-8")
    assert source.count(IMPORT) == 1, "scikit-learn's test file imports its MLPs differently"
    swapped = SWAPPED + (ON_BACKEND.format(backend=estimator_backend)
                         if estimator_backend != "numpy" else "")
    (tmp_path / "test_mlp_bpcore.py").write_text(source.replace(IMPORT, swapped),
                                                 encoding="utf-8")
    (tmp_path / "conftest.py").write_text(CONFTEST, encoding="utf-8")
    report = tmp_path / "report.xml"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", JAX_ENABLE_X64="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-W", "ignore::DeprecationWarning", f"--junitxml={report}", "test_mlp_bpcore.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('name')}: {(bad.get('message') or '')[:200]}"
              for case in suite.iter("testcase")
              for bad in list(case.findall("failure")) + list(case.findall("error"))]
    assert not failed, ("scikit-learn's own tests that fail on bpcore.sklearn:\n"
                        + "\n".join(failed) + "\n" + run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert counts["tests"] - counts["skipped"] >= 50, counts  # (the file really ran)
    names = {case.get("name") for case in suite.iter("testcase")}
    assert estimator_backend == "numpy" or \
        "test_bpcore_estimators_train_on_the_chosen_backend" in names, sorted(names)
