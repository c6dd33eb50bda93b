"""A data-parallel fit of bpcore's scikit-learn estimators, for tests/test_sklearn_parallel.py.

Under ``mpiexec -n N`` each rank fits with ``data_parallel=True`` and writes its result to
``OUT.rank{r}.npz``; run plainly, it is the one-process reference (``OUT.rank0.npz``).
``--jax-devices`` fits, in one process, with and without ``data_parallel`` on the JAX devices
there are (``XLA_FLAGS=--xla_force_host_platform_device_count=4``) and writes ``OUT.ref.npz``
and ``OUT.dp.npz``.

The fit: 97 rows (batches of 16: the last has one row, so one rank gets none), then one
``partial_fit`` pass over 40 more rows.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="numpy")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--estimator", default="classifier", choices=("classifier", "regressor"))
    p.add_argument("--solver", default="adam", choices=("adam", "sgd", "lbfgs"))
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--sparse", action="store_true")
    p.add_argument("--sample-weight", action="store_true")
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--unseeded", action="store_true", help="random_state=None")
    p.add_argument("--jax-devices", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    import scipy.sparse

    from bpcore.sklearn import MLPClassifier, MLPRegressor

    warnings.simplefilter("ignore")  # (ConvergenceWarning: few iterations on purpose)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((137, 7))
    if a.estimator == "classifier":
        y = rng.integers(0, a.classes, 137)
    else:
        y = X @ rng.standard_normal((7, 2)) + 0.1 * rng.standard_normal((137, 2))
    sw = rng.uniform(0.5, 2.0, 137) if a.sample_weight else None
    if a.sparse:
        X[np.abs(X) < 0.8] = 0.0
        X = scipy.sparse.csr_matrix(X)

    def fit(data_parallel: bool) -> dict:
        Est = MLPClassifier if a.estimator == "classifier" else MLPRegressor
        est = Est(hidden_layer_sizes=(12, 9), activation="tanh", solver=a.solver, batch_size=16, max_iter=6,
                  learning_rate_init=0.01, alpha=1e-3, early_stopping=a.early_stopping,
                  random_state=None if a.unseeded else 0, backend=a.backend,
                  dtype=a.dtype, data_parallel=data_parallel)
        est.fit(X[:97], y[:97], sample_weight=None if sw is None else sw[:97])
        if a.solver != "lbfgs" and not a.early_stopping:
            est.partial_fit(X[97:], y[97:], sample_weight=None if sw is None else sw[97:])
        out = {f"coef{i}": c for i, c in enumerate(est.coefs_)}
        out.update({f"intercept{i}": b for i, b in enumerate(est.intercepts_)})
        out["loss"] = np.float64(est.loss_)
        out["n_iter"] = np.int64(est.n_iter_)
        out["parallel"] = np.array(est.parallel_)
        out["predict"] = np.asarray(est.predict(X), dtype=np.float64)
        if a.solver != "lbfgs":
            out["loss_curve"] = np.asarray(est.loss_curve_, dtype=np.float64)
        return out

    if a.jax_devices:
        np.savez(a.out + ".ref.npz", **fit(False))
        np.savez(a.out + ".dp.npz", **fit(True))
        return 0
    from bpcore.parallel import mpi_world_size

    rank = 0
    if mpi_world_size():
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    np.savez(f"{a.out}.rank{rank}.npz", **fit(True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
