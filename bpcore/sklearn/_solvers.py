"""scikit-learn's training loops over bpcore's compiled step (a mixin of the estimators)."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np

import scipy.optimize
import scipy.sparse
from sklearn.base import is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import gen_batches
from sklearn.utils import shuffle as _sk_shuffle

from .._array import Params, nested_map
from ..parallel import SINGLE, split_rows
from ..training.interrupts import Commit

from ._engine import (_Diverged, _bucket, _compiled, _make_buffered_step, _make_step,
                      _make_value_and_grad, _padded)
from ._rules import _BATCH_DENSE, _LOSSES, OptimizerState, _acts


class _Solvers:
    """scikit-learn's solvers around bpcore's compiled step: the stochastic loop (sgd,
    adam) with its learning-rate schedules and stopping rules, and L-BFGS through SciPy."""

    def _new_optimizer(self, be, params: Params) -> OptimizerState:
        xp = be.xp
        zeros = [tuple(xp.zeros_like(a) for a in layer) for layer in params]
        if self.solver == "sgd":
            return OptimizerState(solver="sgd", learning_rate=float(self.learning_rate_init),
                                  state=zeros)
        return OptimizerState(solver="adam", learning_rate=float(self.learning_rate_init), t=0,
                              state=(zeros, [tuple(xp.zeros_like(a) for a in layer)
                                             for layer in params]))

    def _fit_stochastic(self, be, dtype, params, X, y, sample_weight, incremental,
                        workers=SINGLE):
        # As scikit-learn: partial_fit goes on with the optimizer it has, even after
        # set_params(solver=...) (fit starts a new one).
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._new_optimizer(be, params)
        opt = self._optimizer
        # the optimizer state on this backend (it is host NumPy after unpickling)
        opt["state"] = workers.place(nested_map(lambda a: be.asarray(a, dtype=dtype),
                                                opt["state"]))
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
        # Data parallel over MPI (workers.reduce set): each rank steps on its rows of every
        # batch; a rank without rows takes the zero row of weight 0 (index n_samples).
        sparse = scipy.sparse.issparse(X_train)
        pad = be.compiles
        split = workers.reduce is not None
        rows = _bucket(n_samples + 1) if pad else n_samples + 1 if split else n_samples
        sw_host = (np.ones((n_samples, 1), dtype) if sw_train is None else
                   np.asarray(sw_train, dtype=dtype).reshape(-1, 1))
        place = workers.place
        Yd = place(be.asarray(_padded(self._targets(y_train, dtype), rows)))
        SWd = place(be.asarray(_padded(sw_host, rows)))
        Xd = None if sparse else place(be.asarray(_padded(np.asarray(X_train, dtype=dtype),
                                                          rows)))
        acts, loss = _acts(self.activation, len(params) + 1), _LOSSES[self.out_activation_]
        dp = None if workers is SINGLE else workers
        # The step: bpcore's buffered executor where the backend has in-place operations
        # (its results are views of its buffers: copy what must outlive a step), else the
        # pure step, compiled (JAX) and shared by every estimator of the same structure.
        buffered = be.inplace_ops is not None
        if buffered:
            step, step_indexed = _make_buffered_step(
                be, dtype, params, opt["state"], acts, loss, opt["solver"],
                bool(self.nesterovs_momentum), self._hyper(1.0), dp)
        else:
            step, step_indexed = _compiled(
                be, ("step", self.activation, len(params) + 1, self.out_activation_,
                     opt["solver"], bool(self.nesterovs_momentum)),
                lambda: _make_step(acts, loss, opt["solver"], bool(self.nesterovs_momentum),
                                   select_on_host=not (be.compiles or be.asynchronous),
                                   rows=be.rows, workers=dp),
                workers=dp)
        bad = place(be.asarray(np.zeros((), dtype=bool)))
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
                    # A Ctrl-C waits for the step's end (bpcore.training.interrupts): the
                    # buffered executors write buffer after buffer, and scikit-learn keeps the
                    # model it stopped at: that of whole steps (Adam's count included).
                    with Commit():
                        idx = sample_idx[batch_slice]
                        h = self._hyper(self._learning_rate_for_step(opt))
                        S = None
                        if split:  # this rank's rows, and the global batch's Σ sw
                            S = be.asarray(np.asarray(sw_host[idx].sum(), dtype=dtype))
                            lo, hi = split_rows(len(idx), workers.size, workers.rank)
                            idx = idx[lo:hi] if hi > lo else np.array([n_samples])
                        real = len(idx)
                        if pad and real < batch_size:  # n_samples: the zero row of weight 0
                            idx = np.concatenate([idx, np.full(batch_size - real, n_samples)])
                        if sparse:
                            kept = idx[idx < n_samples]  # (the zero row is padding)
                            xb = np.asarray(X_train[kept].toarray(), dtype=dtype)
                            xb = place(be.asarray(_padded(xb, len(idx))))
                            ib = place(be.asarray(idx.astype(index_dtype)))
                            params, state, bad, v = step(
                                params, state, bad, xb, be.rows(Yd, ib), be.rows(SWd, ib),
                                h, S)
                        else:
                            params, state, bad, v = step_indexed(
                                params, state, bad, Xd, Yd, SWd,
                                place(be.asarray(idx.astype(index_dtype))), h, S)
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
                    if buffered and best is params:  # (views: the next step writes them)
                        best = nested_map(lambda a: be.xp.asarray(a, copy=True), params)
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
            return params  # (the pure step's arrays are never written again; the buffered
            #             step's are copied by the caller)
        return best

    def _lbfgs_objective(self, be, dtype, X, y, sample_weight, layer_units, workers=SINGLE):
        """scikit-learn's L-BFGS objective on its packed vector (coefficients, then
        intercepts): ``(loss_grad(theta) -> (loss, flat gradient), unpack(theta) -> params)``.
        Data parallel: over MPI each rank sums its rows and the ranks' sums are added; under
        JAX sharding the rows are split across the devices."""
        n_params = len(layer_units)
        sums, finish = _compiled(
            be, ("lbfgs", self.activation, n_params, self.out_activation_),
            lambda: _make_value_and_grad(_acts(self.activation, n_params),
                                         _LOSSES[self.out_activation_]))
        n = X.shape[0]
        sw = np.ones((n, 1), dtype) if sample_weight is None else \
            np.asarray(sample_weight, dtype=dtype).reshape(-1, 1)
        S = float(sw.sum()) if sample_weight is not None else n
        Yh = self._targets(y, dtype)
        split = workers.reduce is not None
        if split:  # this rank's rows (none: one zero row of weight 0)
            lo, hi = split_rows(n, workers.size, workers.rank)
            X, Yh, sw = ((X[lo:hi], Yh[lo:hi], sw[lo:hi]) if hi > lo else
                         (X[:1] * 0, Yh[:1] * 0, sw[:1] * 0))
            n = X.shape[0]
        # the data on the device once (sparse X: densified chunk by chunk at each evaluation)
        if scipy.sparse.issparse(X):
            chunks = [(X[i:i + _BATCH_DENSE], be.asarray(Yh[i:i + _BATCH_DENSE]),
                       be.asarray(sw[i:i + _BATCH_DENSE])) for i in range(0, n, _BATCH_DENSE)]
        else:  # padded rows have weight 0 (one compiled shape for nearby data sizes)
            rows = _bucket(n) if be.compiles else n
            if getattr(workers, "n_devices", 1) > 1:  # (JAX: rows the devices divide)
                rows = -(-rows // workers.n_devices) * workers.n_devices
            chunks = [tuple(workers.shard(be.asarray(_padded(a, rows))) for a in
                            (np.asarray(X, dtype=dtype), Yh, sw))]
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
            p = workers.place(unpack(theta))
            value, grads = None, None
            for xc, yc, swc in chunks:
                if scipy.sparse.issparse(xc):
                    xc = be.asarray(np.asarray(xc.toarray(), dtype=dtype))
                v, g = sums(p, xc, yc, swc)
                value = v if value is None else value + v
                grads = g if grads is None else [(a + c, b + d) for (a, b), (c, d)
                                                 in zip(grads, g)]
            if split:
                value, grads = workers.sum_tree((value, grads))
            value, grads = finish(value, grads, p, S, float(self.alpha))
            flat = np.hstack([be.to_numpy(gW).T.ravel() for gW, _ in grads] +
                             [be.to_numpy(gb).ravel() for _, gb in grads])
            return float(be.to_numpy(value)), flat

        return loss_grad, unpack

    def _loss_grad_lbfgs(self, packed, X, y, sample_weight, *_buffers):
        """scikit-learn's private ``_loss_grad_lbfgs``: the L-BFGS loss and its packed gradient
        at ``packed``, for targets ``y`` as the solver sees them (binarized for a classifier);
        its own tests call it. (The work buffers it takes are scikit-learn's; unused.)"""
        be = self._backend()
        dtype = self.dtype or ("float32" if np.asarray(self.coefs_[0]).dtype == np.float32
                               else "float64")
        y = np.asarray(y)
        layer_units = [X.shape[1]] + [np.shape(c)[1] for c in self.coefs_]
        loss_grad, _ = self._lbfgs_objective(be, dtype, X, y.reshape(len(y), -1),
                                             sample_weight, layer_units)
        return loss_grad(np.asarray(packed, dtype=np.float64))

    def _fit_lbfgs(self, be, dtype, params, X, y, sample_weight, layer_units,
                   workers=SINGLE):
        loss_grad, unpack = self._lbfgs_objective(be, dtype, X, y, sample_weight, layer_units,
                                                  workers)
        theta0 = np.hstack([np.asarray(c).ravel() for c in self.coefs_] +
                           [np.asarray(b).ravel() for b in self.intercepts_])
        iprint = 1 if (self.verbose is True or self.verbose >= 1) else -1
        options = {"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol}
        try:  # scikit-learn passes iprint only to the SciPy versions that still take it
            from sklearn.utils.fixes import _get_additional_lbfgs_options_dict
            options.update(_get_additional_lbfgs_options_dict("iprint", iprint))
        except ImportError:  # pragma: no cover
            pass
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
                _scipy_own_blas_on_one_thread():
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


def _scipy_own_blas_on_one_thread():
    """A context in which the BLAS that SciPy bundles for itself (a pip wheel's
    ``scipy.libs``, beside NumPy's own in ``numpy.libs``) runs one thread.

    L-BFGS-B's own work is level-1 BLAS on one vector of the parameters' length, which
    threads do not speed up; but its threads, spinning after each call, take the cores from
    NumPy's BLAS, whose matrix products are the objective's work. On this project's 2-core
    VM (digits, 100 hidden, 30 iterations, float64) the fit went from 593 to 238 ms, and
    scikit-learn's own fit, which keeps both pools, takes 468. Where SciPy and NumPy share
    one BLAS (conda, a system build) there is no second pool and nothing is limited; nor
    without threadpoolctl (a scikit-learn dependency). The limit is process-wide while the
    solver runs, as scikit-learn's own ``threadpool_limits`` are (its KMeans, say)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover (scikit-learn requires it)
        return contextlib.nullcontext()
    controller = ThreadpoolController()
    own = [lib.filepath for lib in controller.lib_controllers
           if lib.user_api == "blas"
           and os.path.basename(os.path.dirname(lib.filepath)) == "scipy.libs"]
    if not own:
        return contextlib.nullcontext()
    return controller.select(filepath=own).limit(limits=1)
