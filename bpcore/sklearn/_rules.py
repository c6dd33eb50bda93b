"""scikit-learn's conventions, as its estimators compute them: the output layer and losses
(with sample weights), the L2 penalty and normalisation, and its SGD and Adam updates."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy.special import expit

from .._array import Params, array_namespace, nested_map
from ..nn.activations import get_activation
from ..nn.losses import Loss, backend_pass
from ..optim import GradientTransformation
from ..optim.inplace import AdamUpdate, InplaceUpdate
from ..nn.mlp import loss_grad_output
from ..training.guard import tree_sq_norm


# scikit-learn's hidden activations by bpcore's names (the math is the same; bpcore's
# sigmoid is computed without overflow, which scikit-learn's expit also does).
_HIDDEN = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
_STOCHASTIC = ("sgd", "adam")
_PREDICT_CHUNK = 8192  # rows per device call in predict (bounded memory on any X)
_BATCH_DENSE = 2048    # rows densified at a time for sparse X in full-batch (lbfgs) passes


# ---- the output layer and loss, exactly as scikit-learn computes them ---------------------
# Each takes the last layer's pre-activation Z (the network's output activation is identity)
# and targets T = (Y, sw) or (Y, sw, S): Y (B, n_out) in the compute dtype, sw (B, 1) sample
# weights, S (0-d) the global batch's Σ sw where this worker holds only part of it. It
# returns the *weighted sum* of the per-sample losses (divided by Σ sw later, so full-batch
# passes can be split into chunks) and D = ∂(that sum)/∂Z = sw ⊙ (act(Z) - Y): scikit-learn's
# canonical-link delta, multiplied by the weights as scikit-learn multiplies it.
def _eps(Z: Any) -> float:
    # (by the dtype object, whose str() costs more than the loss; its type first, so that
    # dtypes of two libraries are never compared)
    key = (type(Z.dtype), Z.dtype)
    eps = _EPS.get(key)
    if eps is None:
        eps = _EPS[key] = float(np.finfo(str(Z.dtype).split(".")[-1]).eps)
    return eps


_EPS: dict[Any, float] = {}


def _clip(P: Any, eps: float) -> Any:
    xp = array_namespace(P)
    return xp.where(P < eps, eps, xp.where(P > 1.0 - eps, 1.0 - eps, P))


def _log_loss_softmax(Z, T):
    Y, sw = T[0], T[1]
    xp = array_namespace(Z)
    P = get_activation("softmax").forward(Z)  # (bpcore's softmax: the same arithmetic)
    # scikit-learn's log_loss clips the probabilities to [eps, 1 - eps] (for the value only;
    # its gradient is the unclipped P - Y), so a confident wrong answer costs at most -log eps.
    value = -xp.sum(sw * (Y * xp.log(_clip(P, _eps(Z)))))
    return value, sw * (P - Y)


def _log_loss_logistic(Z, T):
    Y, sw = T[0], T[1]
    xp = array_namespace(Z)
    P = get_activation("sigmoid").forward(Z)
    Pc = _clip(P, _eps(Z))
    value = -xp.sum(sw * (Y * xp.log(Pc) + (1.0 - Y) * xp.log(1.0 - Pc)))
    return value, sw * (P - Y)


def _squared_error(Z, T):
    Y, sw = T[0], T[1]
    xp = array_namespace(Z)
    R = Y - Z
    # scikit-learn reports 0.5 * mean over the outputs of the mean squared error, but its
    # gradient (delta = y_pred - y) is that of the *sum* over the outputs: for n_outputs > 1
    # its loss_ is the descended loss divided by n_outputs. Matched, value and gradient alike.
    value = 0.5 * xp.sum(sw * (R * R)) / Z.shape[1]
    return value, sw * (Z - Y)


def _poisson(Z, T):
    Y, sw = T[0], T[1]
    xp = array_namespace(Z)
    E = xp.exp(Z)  # the "exp" output activation: the mean of the Poisson distribution
    # half Poisson deviance: xlogy(y, y / mu) - y + mu (0 where y = 0)
    ylog = xp.where(Y > 0, Y * xp.log(xp.where(Y > 0, Y, 1.0) / E), 0.0)
    return xp.sum(sw * (ylog - Y + E)), sw * (E - Y)


# ---- their in-place forms, beside them ------------------------------------------------------
class _WeightedKernel:
    """The in-place form of one of the losses above (the executors' ``Loss.kernel``, with
    the backend's in-place operations ``ops``): the same operations in the same order, in
    buffers, so the same numbers (``tests/test_registry_kernels.py``). ``Z`` are the logits
    (the output layer is the identity); ``T = (Y, sw)`` or ``(Y, sw, S)``. A call returns
    ``(value, D, None)``: no count in the pass (:meth:`correct` counts nothing). Where the
    backend has a one-pass form of the loss (``one_pass``: Numba's loops, value and ``D``
    together), that runs instead of the operations (:meth:`_ops`)."""

    one_pass: str | None = None  # the name of the backend's hook, if any

    def buffers(self, ops: Any, Z: Any) -> tuple:
        """Scratch for a batch shaped like ``Z``: ``(D, rows, work, work2, work3)``."""
        B, C = Z.shape
        return (ops.empty((B, C), Z.dtype), ops.empty((B, 1), Z.dtype),
                *(ops.empty((B, C), Z.dtype) for _ in range(3)))

    def correct(self, ops: Any, Z: Any, T: Any) -> Any:
        return ops.scalar(0.0, Z)  # (scikit-learn counts nothing: _WeightedLoss.correct)

    def __call__(self, ops: Any, Z: Any, T: Any, bufs: tuple) -> tuple:
        Y, sw, eps = T[0], T[1], None
        if self.one_pass is not None:  # (a log loss: eps is its clip)
            eps = _eps(Z)
            value = backend_pass(ops, self.one_pass, Z, Y, sw, eps, bufs[0])
            if value is not None:
                return value, bufs[0], None
        return (*self._ops(ops, Z, Y, sw, eps, bufs), None)

    def _ops(self, ops: Any, Z: Any, Y: Any, sw: Any, eps: float | None, bufs: tuple
             ) -> tuple:
        """``(value, D)`` by the backend's operations, ``D`` in ``bufs[0]`` (``eps``: the
        log losses' clip; None for the squared error, which has none)."""
        raise NotImplementedError

    @staticmethod
    def _log_loss(ops: Any, terms: Any, P: Any, Y: Any, sw: Any) -> Any:
        """A log loss's ends: returns ``-Σ sw terms`` (``terms``: each sample's log
        likelihood, overwritten) and turns ``P`` into ``D = sw (P - Y)``."""
        ops.mul(sw, terms, terms)
        value = -ops.total(terms)
        ops.sub(P, Y, P)
        ops.mul(sw, P, P)
        return value


class _SoftmaxLogLossKernel(_WeightedKernel):
    """:func:`_log_loss_softmax` in place."""

    one_pass = "softmax_log_loss"

    def _ops(self, ops, Z, Y, sw, eps, bufs):
        P, rows, work, _, _ = bufs
        ops.row_max(Z, rows)                      # P = softmax(Z): exp(Z - max) / Σ
        ops.sub(Z, rows, P)
        ops.exp(P, P)
        ops.row_sum(P, rows)
        ops.div(P, rows, P)
        ops.clip(P, eps, 1.0 - eps, work)         # value = -Σ sw (Y log clip(P))
        ops.log(work, work)
        ops.mul(Y, work, work)
        return self._log_loss(ops, work, P, Y, sw), P  # (D = sw (P - Y))


class _LogisticLossKernel(_WeightedKernel):
    """:func:`_log_loss_logistic` in place (the sigmoid as :func:`bpcore.nn.activations.
    sigmoid` computes it: ``ops.sigmoid``)."""

    one_pass = "sigmoid_log_loss"

    def _ops(self, ops, Z, Y, sw, eps, bufs):
        P, _, work, work2, work3 = bufs
        ops.sigmoid(Z, P, work)                   # P
        ops.clip(P, eps, 1.0 - eps, work)         # Pc
        ops.rsub(1.0, work, work2)                # log(1 - Pc)
        ops.log(work2, work2)
        ops.log(work, work)                       # Y log(Pc)
        ops.mul(Y, work, work)
        ops.rsub(1.0, Y, work3)                   # (1 - Y) log(1 - Pc)
        ops.mul(work3, work2, work2)
        ops.add(work, work2, work)                # value = -Σ sw (both terms)
        return self._log_loss(ops, work, P, Y, sw), P  # (D = sw (P - Y))


class _SquaredErrorKernel(_WeightedKernel):
    """:func:`_squared_error` in place."""

    def _ops(self, ops, Z, Y, sw, eps, bufs):
        D, _, work, _, _ = bufs
        ops.sub(Y, Z, work)                       # value = 0.5 Σ sw (R R) / n_out, R = Y - Z
        ops.mul(work, work, work)
        ops.mul(sw, work, work)
        value = 0.5 * ops.total(work) / Z.shape[1]
        ops.sub(Z, Y, D)                          # D = sw (Z - Y)
        ops.mul(sw, D, D)
        return value, D


class _WeightedLoss(Loss):
    """A loss on targets ``T = (Y, sw)``, checked and counted by scikit-learn on the host:
    the step's own target check passes them, and it counts no correct predictions."""

    def correct(self, Y: Any, T: Any) -> Any:
        return array_namespace(Y).sum(Y[:0, :])  # 0, in Y's dtype, on Y's device

    def targets_valid(self, T: Any, host_ops: Any = None) -> Any:
        if host_ops is not None:
            return True
        Y = T[0]
        return array_namespace(Y).all(Y[:0, :] == 0)  # True (an empty all), on the device


_LOSSES = {
    "softmax": _WeightedLoss("sklearn_log_loss", _log_loss_softmax, "values",
                             kernel=_SoftmaxLogLossKernel()),
    "logistic": _WeightedLoss("sklearn_binary_log_loss", _log_loss_logistic, "values",
                              kernel=_LogisticLossKernel()),
    "identity": _WeightedLoss("sklearn_squared_error", _squared_error, "values",
                              kernel=_SquaredErrorKernel()),
    "exp": _WeightedLoss("sklearn_poisson", _poisson, "values"),
}


def _out_activation_host(name: str, Z: np.ndarray) -> np.ndarray:
    """scikit-learn's output activation on host logits (its own functions' arithmetic)."""
    if name == "softmax":
        tmp = Z - Z.max(axis=1)[:, np.newaxis]
        np.exp(tmp, out=Z)
        Z /= Z.sum(axis=1)[:, np.newaxis]
        return Z
    if name == "logistic":
        return expit(Z, out=Z)
    if name == "exp":
        return np.exp(Z, out=Z)
    return Z


# ---- the pure functions the backend compiles ----------------------------------------------
def _acts(hidden: str, n_layers: int):
    return [get_activation(_HIDDEN[hidden])] * (n_layers - 2) + [get_activation("identity")]


def _grad_sums(params: Params, acts, loss: Loss, x, Y, sw):
    """Σ_b sw_b loss_b and its gradient sums (no L2, not yet divided by Σ sw)."""
    value, grads, _, _ = loss_grad_output(params, acts, loss, x, (Y, sw))
    return value, grads


def _finish(value, grads: Params, params: Params, S, alpha):
    """scikit-learn's L2 penalty and normalisation: loss = value/S + α/2 Σ‖W‖²/S, and
    ∇W = (Σ sw δ aᵀ + α W)/S, ∇b = Σ sw δ / S."""
    value = _penalised(value, tree_sq_norm([W for W, _ in params]), S, alpha)
    grads = [((gW + alpha * W) / S, gb / S) for (gW, gb), (W, _) in zip(grads, params)]
    return value, grads


def _penalised(value, sq, S, alpha):
    """The loss scikit-learn reports: the weighted sum ``value`` and ``sq = Σ‖W‖²``, over
    ``S = Σ sw``, with the L2 term (both forms of :class:`l2_penalty`)."""
    return value / S + (0.5 * alpha) * sq / S


class _Hyper(NamedTuple):
    """The step's scalars, passed at run time (a new value never recompiles)."""

    lr: float
    alpha: float
    momentum: float
    b1: float
    one_minus_b1: float
    b2: float
    one_minus_b2: float
    eps: float


class l2_penalty:
    """:func:`_finish` as :func:`bpcore.training.step.train_step`'s ``penalty``, on targets
    ``T = (Y, sw)`` (``S = Σ sw``) or, in data-parallel training over MPI, ``(Y, sw, S)``
    with ``S`` the global batch's (each rank holds only its rows). :meth:`inplace_` is the
    same on the in-place step's flat buffers."""

    def __init__(self, alpha: Any):
        self.alpha = alpha

    def __call__(self, value, grads, params, T):
        S = T[2] if len(T) > 2 else array_namespace(T[1]).sum(T[1])
        return _finish(value, grads, params, S, self.alpha)

    def inplace_(self, ops: Any, value: Any, g: Any, p: Any, n_weights: int, T: Any,
                 tmp: Any) -> Any:
        """:func:`_finish` on the flat gradient ``g`` and parameters ``p`` (weights first):
        ``g_W += α W``, ``g /= S``; returns the penalised loss."""
        S = T[2] if len(T) > 2 else ops.total(T[1])
        return _penalised(value, ops.l2_fold_(g, p, n_weights, self.alpha, S, tmp), S,
                          self.alpha)


def summed_over(workers: Any) -> Any:
    """:func:`bpcore.training.step.train_step`'s ``reduce`` for data-parallel training over
    MPI (None: nothing to reduce): the loss and gradient *sums* of every rank's rows, added
    (scikit-learn's losses are sums over the batch, divided by the global Σ sw in
    :func:`l2_penalty`)."""
    if workers is None or workers.reduce is None:
        return None

    def reduce(value, correct, targets_ok, grads):
        value, grads = workers.sum_tree((value, grads))
        return value, correct, targets_ok, grads
    return reduce


def step_parts(solver: str, nesterov: bool, h: "_Hyper", Y: Any, sw: Any, S: Any = None
               ) -> tuple[GradientTransformation, Any, tuple]:
    """What one stochastic step of scikit-learn's gives :func:`bpcore.training.step.
    train_step`, whichever executor runs it: the optimizer and the penalty for the scalars
    ``h``, and the targets ``(Y, sw)`` (``(Y, sw, S)`` with the global batch's Σ sw)."""
    optimizer = sgd(h, nesterov) if solver == "sgd" else adam(h)
    return optimizer, l2_penalty(h.alpha), ((Y, sw) if S is None else (Y, sw, S))


def sgd(h: _Hyper, nesterov: bool) -> GradientTransformation:
    """scikit-learn's SGD with momentum as a transformation (state: the velocities)."""
    return GradientTransformation(
        lambda p: None, lambda g, state, params, step=None: _sgd_update(g, state, params, h,
                                                                        nesterov),
        _VelocitySGD(h, nesterov))


def adam(h: _Hyper) -> GradientTransformation:
    """scikit-learn's Adam as a transformation (state: the moments ``(ms, vs)``)."""
    return GradientTransformation(
        lambda p: None, lambda g, state, params, step=None: _adam_update(g, state, params, h),
        _SklearnAdam(h))


class _VelocitySGD(InplaceUpdate):
    """:func:`_sgd_update` in place (``ops.velocity_update_``), with its bounds: ||v'|| <=
    μ||v|| + lr||g||, and Nesterov's μv' - lr g adds μ||v'|| + lr||g||."""

    n_moments = 1
    scratch = True

    def __init__(self, h: _Hyper, nesterov: bool):
        self.h, self.nesterov = h, nesterov  # (h: traced arrays under jax.jit, never read)

    def rate(self, step):
        return float(self.h.lr)

    def bounds(self, lr, step, g_norm, norms, ops, p, limit):
        mu = float(self.h.momentum)
        v_norm = mu * norms.m + lr * g_norm
        return v_norm, (mu * v_norm + lr * g_norm if self.nesterov else v_norm)

    def write_(self, ops, p, g, moments, lr, step, n_weights, tmp):
        ops.velocity_update_(p, g, moments[0], lr, float(self.h.momentum), self.nesterov, tmp)


class _SklearnAdam(InplaceUpdate):
    """:func:`_adam_update` in place (``ops.adam_update_`` with scikit-learn's corrected
    rate and its eps on the raw moment), with its bound ||u|| <= lr ||m'|| / eps."""

    n_moments = 2
    scratch = True

    def __init__(self, h: _Hyper):
        self.h = h  # (traced arrays under jax.jit, never read there)

    moments_ok = AdamUpdate.moments_ok

    def rate(self, step):
        return float(self.h.lr)

    def bounds(self, lr, step, g_norm, norms, ops, p, limit):
        m_norm = float(self.h.b1) * norms.m + (1.0 - float(self.h.b1)) * g_norm
        return m_norm, lr * m_norm / float(self.h.eps)

    def write_(self, ops, p, g, moments, lr, step, n_weights, tmp):
        h = self.h
        ops.adam_update_(p, g, moments[0], moments[1], lr, float(h.eps), float(h.b1),
                         float(h.b2), 0.0, n_weights, tmp)


def _sgd_update(grads, velocities, params, h: _Hyper, nesterov: bool):
    # scikit-learn's SGDOptimizer: the velocity is the update itself, v ← μ v - lr g, so a
    # learning rate changed between epochs (invscaling, adaptive) leaves the velocity as it
    # was made. Nesterov applies μ v - lr g once more with the new v.
    v = nested_map(lambda vel, g: h.momentum * vel - h.lr * g, velocities, grads)
    u = nested_map(lambda vel, g: h.momentum * vel - h.lr * g, v, grads) if nesterov else v
    return u, v


def _adam_update(grads, state, params, h: _Hyper):
    # scikit-learn's AdamOptimizer: lr already holds lr_init·sqrt(1-β2^t)/(1-β1^t) (computed on
    # the host in float64, as scikit-learn does), and eps is added to sqrt(v) of the raw
    # moments (not of the bias-corrected ones, as in Kingma & Ba's algorithm 1).
    ms, vs = state
    ms = nested_map(lambda m, g: h.b1 * m + h.one_minus_b1 * g, ms, grads)
    vs = nested_map(lambda v, g: h.b2 * v + h.one_minus_b2 * (g * g), vs, grads)
    xp = array_namespace(params[0][0])
    u = nested_map(lambda m, v: -h.lr * m / (xp.sqrt(v) + h.eps), ms, vs)
    return u, (ms, vs)


class OptimizerState(dict):
    """The estimator's ``_optimizer``: ``solver``, ``learning_rate``, ``t`` (Adam's update
    count) and ``state`` (velocities, or Adam's moments), read as items and, as on
    scikit-learn's own optimizer objects, as attributes (``clf._optimizer.learning_rate``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None
