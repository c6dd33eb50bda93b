"""``bpcore bench --estimators``: ``bpcore.sklearn`` against scikit-learn's own MLP estimators.

The same estimator settings and ``random_state`` on both sides, so both fit the same model
(in float64 to rounding: the report shows the largest coefficient difference). Every fit
runs all ``max_iter`` epochs (``tol=0``), so both do the same work. Each implementation fits
once untimed (JAX compiles then; that first fit's time is reported on its own), then
``rounds`` times, interleaved with the others, each after a pause (``SETTLE_S``) in which
the threads of the fit before it stop spinning; the fastest fit counts. Ratios are bpcore's
time over scikit-learn's, measured in this one run. Each stochastic case also has a floor
row, the fit's matrix products each timed alone on NumPy (:func:`products_alone`): no fit
on scikit-learn's BLAS takes less, so its ratio bounds what any such fit can reach.
"""

from __future__ import annotations

import time
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np


# Idle time before each timed fit: the fit before it leaves its library's threads spinning
# (OpenBLAS's wait ~0.1 s for more work before they sleep), and on a 2-core machine they
# take a core from whatever runs next (measured: PyTorch's fit 0.33 s right after NumPy's,
# 0.23 s after a pause). Each implementation is timed as a user runs it, alone.
SETTLE_S = 0.5


@dataclass(frozen=True)
class FitCase:
    name: str
    estimator: str          # "classifier" or "regressor"
    settings: tuple         # estimator parameters, as (name, value) pairs
    data: str               # "digits", "mnist-like", "classification-50k" or "regression"
    note: str


CASES = {
    "digits-adam": FitCase("digits-adam", "classifier",
                           (("hidden_layer_sizes", (100,)), ("max_iter", 20)),
                           "digits", "8x8 digits (1,257 training rows), 100 hidden, adam, "
                                     "batch 200, 20 epochs"),
    "mnist-adam": FitCase("mnist-adam", "classifier",
                          (("hidden_layer_sizes", (256,)), ("max_iter", 3)),
                          "mnist-like", "10,000 x 784 synthetic, 10 classes, 256 hidden, adam, "
                                        "batch 200, 3 epochs"),
    "regression-sgd": FitCase("regression-sgd", "regressor",
                              (("hidden_layer_sizes", (128, 64)), ("max_iter", 3),
                               ("solver", "sgd"), ("learning_rate_init", 0.01)),
                              "regression", "20,000 x 100, 2 targets, 128-64 hidden, sgd "
                                            "(Nesterov 0.9), batch 200, 3 epochs"),
    # The issue-17 targets: hidden (256, 256), adam, scikit-learn's defaults otherwise.
    "digits-256x2": FitCase("digits-256x2", "classifier",
                            (("hidden_layer_sizes", (256, 256)), ("max_iter", 20)),
                            "digits", "8x8 digits, 256-256 hidden, adam, batch 200, 20 epochs"),
    "classification-50k": FitCase("classification-50k", "classifier",
                                  (("hidden_layer_sizes", (256, 256)), ("max_iter", 3)),
                                  "classification-50k",
                                  "make_classification(50,000, 100), 2 classes, 256-256 "
                                  "hidden, adam, batch 200, 3 epochs"),
    "digits-lbfgs": FitCase("digits-lbfgs", "classifier",
                            (("hidden_layer_sizes", (100,)), ("max_iter", 30),
                             ("solver", "lbfgs")),
                            "digits", "8x8 digits, 100 hidden, L-BFGS-B, 30 iterations"),
}


def _data(name: str, dtype: str):
    from sklearn.datasets import load_digits, make_classification, make_regression
    from sklearn.model_selection import train_test_split

    if name == "digits":
        X, y = load_digits(return_X_y=True)
        X = X / 16.0
    elif name == "mnist-like":
        X, y = make_classification(12000, 784, n_informative=40, n_classes=10,
                                   class_sep=3.0, random_state=0)
    elif name == "classification-50k":
        X, y = make_classification(50_000, 100, random_state=0)
    else:
        X, y = make_regression(24000, 100, n_targets=2, noise=1.0, random_state=0)
        y = y / np.abs(y).max()
    Xtr, Xte, ytr, yte = train_test_split(X.astype(dtype), y, test_size=1 / 6 if
                                          name != "digits" else 0.3, random_state=0)
    return Xtr, Xte, ytr, yte


def _estimator(impl: str, case: FitCase, dtype: str):
    settings = dict(case.settings, random_state=0, tol=0.0, n_iter_no_change=10**6)
    if impl == "sklearn":
        from sklearn import neural_network as nn

        Est = nn.MLPClassifier if case.estimator == "classifier" else nn.MLPRegressor
        return Est(**settings)
    from bpcore.sklearn import MLPClassifier, MLPRegressor

    Est = MLPClassifier if case.estimator == "classifier" else MLPRegressor
    return Est(backend=impl, dtype=dtype, **settings)


def _fit(est, X, y) -> float:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        est.fit(X, y)
        return time.perf_counter() - t0


def run(cases: list[str], backends: list[str], dtypes: list[str], rounds: int = 3,
        log=print) -> dict:
    """Measure every case × dtype × implementation; returns ``{"rows": [...], ...}``."""
    rows, skipped = [], {}
    impls = ["sklearn"] + list(backends)
    for dtype in dtypes:
        for name in cases:
            case = CASES[name]
            Xtr, Xte, ytr, yte = _data(case.data, dtype)
            ests, first, times = {}, {}, {}
            for impl in impls:
                try:
                    ests[impl] = _estimator(impl, case, dtype)
                    first[impl] = _fit(ests[impl], Xtr, ytr)
                except Exception as e:  # a backend that cannot run here, or float64 on it
                    skipped[f"{name}/{dtype}/{impl}"] = f"{type(e).__name__}: {e}"[:300]
                    ests.pop(impl, None)
            for _ in range(rounds):
                for impl, est in ests.items():
                    time.sleep(SETTLE_S)
                    times.setdefault(impl, []).append(_fit(est, Xtr, ytr))
            best = {impl: min(t) for impl, t in times.items()}
            ref = ests.get("sklearn")
            floor = None
            if ref is not None and dict(case.settings).get("solver", "adam") != "lbfgs":
                sizes = [c.shape[0] for c in ref.coefs_] + [ref.coefs_[-1].shape[1]]
                floor = products_alone(sizes, Xtr.shape[0], min(200, Xtr.shape[0]),
                                       int(ref.n_iter_), dtype)
            for impl, est in ests.items():
                row = {"case": name, "dtype": dtype, "impl": impl, "time_s": best[impl],
                       "first_fit_s": first[impl], "score": float(est.score(Xte, yte)),
                       "n_iter": int(est.n_iter_),
                       # how far the timed fits spread: report.noise_warning reads it
                       "spread": (max(times[impl]) - best[impl]) / best[impl]}
                if ref is not None:
                    row["vs_sklearn"] = best[impl] / best["sklearn"]
                    row["max_coef_diff"] = max(float(np.abs(np.asarray(a, np.float64) - b).max())
                                               for a, b in zip(est.coefs_, ref.coefs_))
                rows.append(row)
                log(f"{name:15s} {dtype} {impl:8s} {best[impl] * 1e3:9.1f} ms  "
                    f"x{row.get('vs_sklearn', float('nan')):.2f}  score {row['score']:.4f}")
            if floor is not None:
                rows.append({"case": name, "dtype": dtype, "impl": "floor", "time_s": floor[0],
                             "vs_sklearn": floor[0] / best["sklearn"], "spread": floor[1]})
                log(f"{name:15s} {dtype} {'floor':8s} {floor[0] * 1e3:9.1f} ms  "
                    f"x{floor[0] / best['sklearn']:.2f}  (the matrix products alone)")
    return {"rows": rows, "skipped": skipped, "rounds": rounds}


def products_alone(sizes: list[int], n_rows: int, batch: int, epochs: int, dtype: str
                   ) -> tuple[float, float]:
    """The floor of a stochastic fit: its matrix products, each timed alone on NumPy
    (scikit-learn's own BLAS), summed over the fit's batches. The products of a step are
    :func:`benchmarks.impls.floor_parts`'s (the step benchmark's floor), at the full batch
    size and at the last, smaller batch of each epoch. A fit on this BLAS cannot take less,
    whatever else it does; the ratio to scikit-learn's time says how much of scikit-learn's
    fit is products, and so how far any implementation on the same BLAS can go below it.
    Returns ``(seconds, spread)``, the spread the largest of the products' timings."""
    from .cases import Case
    from .impls import floor_parts
    from .timing import measure

    full, last = divmod(n_rows, batch)
    total, spreads = 0.0, []
    for rows, count in ((batch, full), (last, 1)):
        if rows and count:
            parts, _, _ = floor_parts("numpy", Case(f"fit@{rows}", tuple(sizes), rows), dtype)
            for _, runner, _ in parts:
                m = measure(runner)
                total += count * m["time_s"]
                spreads.append(m["spread"])
    return epochs * total, max(spreads)


def markdown(result: dict) -> str:
    lines = ["| case | dtype | implementation | fit time | × scikit-learn | first fit | "
             "test score | max \\|Δcoef\\| vs scikit-learn |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["impl"] == "floor":
            lines.append(f"| {r['case']} | {r['dtype']} | *the matrix products alone (NumPy)* | "
                         f"{r['time_s'] * 1e3:.1f} ms | {r['vs_sklearn']:.2f} | | | |")
            continue
        impl = "scikit-learn" if r["impl"] == "sklearn" else f"bpcore.sklearn ({r['impl']})"
        lines.append(f"| {r['case']} | {r['dtype']} | {impl} | {r['time_s'] * 1e3:.1f} ms | "
                     f"{r.get('vs_sklearn', float('nan')):.2f} | {r['first_fit_s'] * 1e3:.0f} ms | "
                     f"{r['score']:.4f} | {r.get('max_coef_diff', float('nan')):.1e} |")
    return "\n".join(lines)


def write(result: dict, machine: dict, out: str) -> list[str]:
    from .report import write_side_report

    cases = "\n".join(f"- **{c.name}**: {c.note}" for c in CASES.values()
                      if any(r["case"] == c.name for r in result["rows"]))
    return write_side_report(result, machine, out, "estimators",
                             "bpcore.sklearn against scikit-learn: fit time",
                             (__doc__ or "").split("\n", 2)[2].strip(),
                             cases + "\n\n" + markdown(result))


def main(args: Any, backends: list[str], info: dict) -> int:
    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"bpcore bench --estimators: unknown cases {unknown}; known: "
                         f"{list(CASES)}")
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32", "float64"]
    from .report import noise_warning

    result = run(cases, backends, dtypes, rounds=args.rounds)
    paths = write(result, info, args.out)
    print("\n" + markdown(result) + "\n\nwrote " + ", ".join(paths))
    noise = noise_warning(result["rows"])
    if noise:
        print("\n" + noise, file=sys.stderr)
    return 0
