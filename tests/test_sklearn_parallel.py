"""``data_parallel=True`` for bpcore's scikit-learn estimators: the same model as one process.

Over MPI (numpy, and torch with sgd, under ``mpiexec -n 2``) each rank sums the loss and gradient over
its rows of every batch (of the whole data, for lbfgs) and one ``Allreduce`` adds the ranks'
sums; on JAX the batch is sharded over 4 simulated devices. Either way the fit must equal the
one-process fit to 1e-10 in float64 (weights, loss curve, predictions), and the MPI ranks must
end bit for bit identical. The batches are chosen so that some do not split evenly and the
last (one row) leaves a rank without a row.
"""

from __future__ import annotations

import numpy as np
import pytest

import subprocess
import sys
from pathlib import Path

from .test_parallel import (MPIEXEC, TOL, _assert_close, _env, _load, _mpirun,
                            _one_process_and_two_ranks, _python, assert_ranks_identical,
                            needs_mpi, on_4_jax_devices)

pytest.importorskip("sklearn")
WORKER = Path(__file__).with_name("dp_sklearn_worker.py")


CASES = [
    ["--solver", "adam", "--sample-weight"],
    ["--solver", "sgd", "--estimator", "regressor", "--early-stopping"],
    ["--solver", "lbfgs", "--classes", "2", "--sample-weight"],
    ["--solver", "adam", "--sparse"],
    ["--solver", "sgd", "--backend", "torch"],
]


@needs_mpi
@pytest.mark.extended(cases=["solver-adam-sparse", "solver-lbfgs-classes-2-sample-weight",
                             "solver-sgd-backend-torch"])
@pytest.mark.parametrize("args", CASES, ids=lambda a: "-".join(x.strip("-") for x in a))
def test_mpi_two_ranks_fit_as_one_process(tmp_path, args):
    one, rank0, rank1 = _one_process_and_two_ranks(tmp_path, args, WORKER)
    assert int(one["n_iter"]) == int(rank0["n_iter"])
    assert str(one["parallel"]) == "one worker"
    assert str(rank0["parallel"]) == "MPI, rank 0 of 2"
    _assert_close(one, rank0, TOL["float64"])
    assert_ranks_identical(rank0, rank1)


@needs_mpi
def test_mpi_unseeded_ranks_fit_one_model(tmp_path):
    """random_state=None: each rank would draw its own weights, batches and split; they take
    rank 0's seed instead, and end identical."""
    out = str(tmp_path / "dp")
    r = _mpirun(2, ["--unseeded", "--early-stopping", "--out", out], worker=WORKER)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_ranks_identical(_load(out + ".rank0.npz"), _load(out + ".rank1.npz"))


@needs_mpi
def test_mpi_ranks_with_different_data_are_refused_together(tmp_path):
    code = (
        "import numpy as np\n"
        "from mpi4py import MPI\n"
        "from bpcore.sklearn import MLPClassifier\n"
        "r = MPI.COMM_WORLD.Get_rank()\n"
        "X = np.random.default_rng(r).standard_normal((40, 3)); y = np.arange(40) % 2\n"
        "try:\n"
        "    MLPClassifier((4,), max_iter=2, data_parallel=True, random_state=0).fit(X, y)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, 'different data' in str(e), flush=True)\n")
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    # (the two ranks' lines may interleave)
    assert r.stdout.count("ConfigError") == 2 and r.stdout.count("True") == 2, r.stdout


@pytest.mark.extended(cases=["solver-lbfgs-estimator-regressor", "solver-sgd-early-stopping"])
@pytest.mark.parametrize("args", [["--solver", "adam", "--sample-weight"],
                                  ["--solver", "lbfgs", "--estimator", "regressor"],
                                  ["--solver", "sgd", "--early-stopping"]],
                         ids=lambda a: "-".join(x.strip("-") for x in a))
def test_jax_sharded_over_4_devices_fits_as_one_device(tmp_path, args):
    pytest.importorskip("jax")
    out = str(tmp_path / "jax")
    r = _python(["--backend", "jax", "--jax-devices", *args, "--out", out],
                env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                         JAX_PLATFORMS="cpu"), worker=WORKER)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, dp = _load(out + ".ref.npz"), _load(out + ".dp.npz")
    assert str(dp["parallel"]) == "JAX sharding over 4 devices in 1 process(es)"
    assert int(ref["n_iter"]) == int(dp["n_iter"])
    _assert_close(ref, dp, TOL["float64"])


def test_jax_step_is_split_across_the_devices():
    """The estimators' batch really is split (the all-reduce is inside the compiled step)."""
    pytest.importorskip("jax")
    code = (
        "import jax\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "import numpy as np\n"
        "import bpcore.sklearn._solvers as S\n"
        "from bpcore.sklearn import MLPClassifier\n"
        "orig, seen = S._compiled, {}\n"
        "def spy(be, key, build, workers=None):\n"
        "    fns = orig(be, key, build, workers)\n"
        "    if key[0] != 'step':\n"
        "        return fns\n"
        "    def rec(*a):\n"
        "        seen['f'], seen['a'] = fns[1], a\n"
        "        return fns[1](*a)\n"
        "    return fns[0], rec\n"
        "S._compiled = spy\n"
        "X = np.random.default_rng(0).standard_normal((64, 5)); y = np.arange(64) % 3\n"
        "MLPClassifier((8,), batch_size=16, max_iter=1, backend='jax',\n"
        "              data_parallel=True).fit(X, y)\n"
        "hlo = seen['f'].lower(*seen['a']).compile().as_text()\n"
        "print('all-reduce' in hlo)\n")
    assert on_4_jax_devices(code) == ["True"]


def test_data_parallel_is_a_parameter():
    from bpcore.sklearn import MLPClassifier

    est = MLPClassifier(data_parallel=True)
    assert est.get_params()["data_parallel"] is True
    X, y = np.random.default_rng(0).standard_normal((20, 3)), np.arange(20) % 2
    for flag in (np.True_, np.False_):  # (scikit-learn's "boolean" takes NumPy's too)
        est = MLPClassifier((3,), max_iter=1, data_parallel=flag, random_state=0)
        with pytest.warns(Warning):  # (ConvergenceWarning: one iteration)
            assert est.fit(X, y).parallel_ == "one worker"
    with pytest.raises(ValueError, match="data_parallel"):
        MLPClassifier(data_parallel="yes").fit(np.zeros((4, 2)), [0, 1, 0, 1])
