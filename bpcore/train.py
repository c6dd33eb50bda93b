"""`Trainer`: the training loop around one pure, compiled step.

The step is a pure function ``(params, opt_state, guard, x, T) -> (params, opt_state,
guard, loss, correct)`` wrapped by the backend's ``jit`` (compiled once per input shape
on JAX). The Trainer validates and moves data once at the boundary, runs the step, and
only then replaces the model's parameters, so a step that raises leaves them as they were.

Divergence guard, without a host sync per step: the step checks on the device that the
loss and the gradient norm are finite. The first time they are not, it records the step
number in ``guard`` and from then on returns the parameters and optimizer state
unchanged. :meth:`Trainer.check` (called by :meth:`fit` once per epoch) reads that flag
and raises :class:`~bpcore.errors.DivergenceError`; the model then holds the last good
step's parameters.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from ._array import Array, Params, array_device, array_namespace, nested_leaves, nested_map
from ._checks import prepare_input
from .activations import Activation
from .errors import ConfigError, DivergenceError, ShapeError
from .losses import Loss, get_loss
from .mlp import MLP, forward, loss_grad_output
from .optim import (GradientTransformation, apply_updates, chain, clip_by_global_norm,
                    get_optimizer)

__all__ = ["Trainer", "train_step", "GuardState", "History", "Callback", "EarlyStopping"]


class GuardState(NamedTuple):
    count: Array      # 0-d int32: steps run so far
    bad_step: Array   # 0-d int32: first step (1-based) that failed a check, or 0
    reason: Array     # 0-d int32: why (one of the GUARD_* codes), or 0
    ref_loss: Array   # 0-d float: the first step's loss ("grew" is measured against it); NaN
    #                   until a step has run


GUARD_NONFINITE, GUARD_GREW, GUARD_TARGETS = 1, 2, 3
DEFAULT_DIVERGENCE_FACTOR = 1e4


def all_finite(tree: Any) -> Array:
    """One 0-d boolean: every element of every leaf is finite (NaN and inf are not)."""
    leaves = nested_leaves(tree)
    xp = array_namespace(*leaves)
    ok = xp.all(xp.isfinite(leaves[0]))
    for leaf in leaves[1:]:
        ok = ok & xp.all(xp.isfinite(leaf))
    return ok


def train_step(params: Params, opt_state: Any, guard: GuardState, x: Array, T: Array, *,
               activations: Sequence[Activation], loss: Loss,
               optimizer: GradientTransformation, check_finite: bool = True,
               divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR):
    """One guarded step of gradient descent (any optimizer).

    Returns ``(params, opt_state, guard, loss value, n_correct)``; ``n_correct`` is the
    number of correctly classified samples for classification losses, else 0.

    The guard (``check_finite``) refuses a step, keeping the parameters and optimizer state
    it was given, when the targets are invalid (a class label out of range on the device, a
    negative or non-finite target), when the loss, a gradient or an updated parameter is not
    finite, or when the loss exceeds ``divergence_factor`` times the loss of the first step
    (``None``: no such limit). From the first refused step on it refuses every step, and
    records which step and why; nothing is read back to the host here. With
    ``check_finite=False`` it only counts steps.
    """
    xp = array_namespace(x)
    value, grads, _, Y = loss_grad_output(params, activations, loss, x, T)
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_params = apply_updates(params, updates)

    step = guard.count + 1
    if not check_finite:
        return new_params, new_state, guard._replace(count=step), value, loss.correct(Y, T)
    ref = xp.where(xp.isnan(guard.ref_loss), value, guard.ref_loss)  # NaN: not yet set
    targets_ok = loss.targets_valid(T)
    finite = xp.isfinite(value) & all_finite(grads) & all_finite(new_params)
    grew = (value > divergence_factor * ref) & (ref > 0) if divergence_factor else \
        xp.zeros((), dtype=xp.bool, device=array_device(value))
    was_bad = guard.bad_step != 0
    ok = targets_ok & finite & ~grew & ~was_bad
    keep = lambda new, old: xp.where(ok, new, old)  # noqa: E731
    new_params = nested_map(keep, new_params, params)
    new_state = nested_map(keep, new_state, opt_state)
    none = guard.reason * 0  # the codes as int32 arrays (where() takes one scalar at most)
    why = xp.where(~targets_ok, GUARD_TARGETS,
                   xp.where(~finite, GUARD_NONFINITE, xp.where(grew, GUARD_GREW, none)))
    bad = xp.where(ok | was_bad, guard.bad_step, step)
    reason = xp.where(was_bad, guard.reason, xp.where(ok, none, why))
    return (new_params, new_state, GuardState(step, bad, reason, ref), value,
            loss.correct(Y, T))


@dataclass
class History:
    """Per-epoch records of :meth:`Trainer.fit`: ``history["loss"]``, ``["val_accuracy"]``…"""

    epochs: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        self.epochs.append(epoch)
        for k, v in logs.items():
            self.metrics.setdefault(k, []).append(float(v))

    def __getitem__(self, key: str) -> list[float]:
        return self.metrics[key]

    def __contains__(self, key: str) -> bool:
        return key in self.metrics

    def keys(self):
        return self.metrics.keys()


class Callback:
    """Hooks called by :meth:`Trainer.fit`; set ``trainer.stop_training = True`` to stop."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


class EarlyStopping(Callback):
    """Stop once ``monitor`` has not improved for ``patience`` epochs in a row (as Keras):
    with ``patience=2`` and the best value at epoch 5, training stops after epoch 7.
    ``restore_best`` puts back the parameters of the best epoch at the end."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "auto", restore_best: bool = True):
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        if mode not in ("min", "max"):
            raise ConfigError(f"mode: expected 'min', 'max' or 'auto', got {mode!r}")
        if int(patience) < 0:
            raise ConfigError(f"patience: expected an integer >= 0, got {patience!r}")
        self.monitor, self.patience, self.min_delta = monitor, int(patience), float(min_delta)
        self.mode, self.restore_best = mode, restore_best

    def on_train_begin(self, trainer):
        names = getattr(trainer, "metric_names", None)  # set by fit before training starts
        if names is not None and self.monitor not in names:
            raise ConfigError(f"EarlyStopping: monitor {self.monitor!r} will not be logged; "
                              f"this fit logs {sorted(names)}"
                              + ("; pass validation_data (or validation_split) for val_* "
                                 "metrics." if self.monitor.startswith("val_") else "."))
        self.best, self.best_epoch, self.wait, self.best_params = None, -1, 0, None
        self.stopped_epoch = None

    def on_epoch_end(self, trainer, epoch, logs):
        if self.monitor not in logs:
            raise ConfigError(f"EarlyStopping: monitor {self.monitor!r} is not among the "
                              f"logged metrics {sorted(logs)}; pass validation_data for "
                              "val_* metrics.")
        value = logs[self.monitor]
        better = (self.best is None or
                  (value < self.best - self.min_delta if self.mode == "min"
                   else value > self.best + self.min_delta))
        if better:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_params = trainer.model.copy_params()
        else:
            self.wait += 1
            if self.wait >= self.patience:  # `patience` epochs in a row without improvement
                self.stopped_epoch = epoch
                trainer.stop_training = True

    def on_train_end(self, trainer):
        if self.restore_best and self.best_params is not None:
            trainer.model.params = self.best_params


class Trainer:
    """Trains an :class:`MLP` in place.

    Parameters
    ----------
    model : MLP
    loss : str or Loss
        A name from ``LOSSES``.
    optimizer : GradientTransformation or str
        E.g. ``bpcore.optim.adam(1e-3)``, or a name from ``OPTIMIZERS`` with its defaults.
    clip_norm : float, optional
        Clip gradients to this global norm before the optimizer sees them.
    check_finite : bool
        The divergence guard (default on): a step whose loss, gradients or updated
        parameters are not finite, whose targets are invalid, or whose loss exceeds
        ``divergence_factor`` times the first step's, is not applied, and the next
        :meth:`check` (once per epoch in :meth:`fit`) raises :class:`DivergenceError`. Off,
        every step is applied as computed.
    divergence_factor : float or None
        How far the loss may grow over the first step's loss before training counts as
        diverged (default 1e4; ``None``: only non-finite values count).
    """

    def __init__(self, model: MLP, loss: str | Loss = "softmax_cross_entropy",
                 optimizer: GradientTransformation | str = "sgd", *,
                 clip_norm: float | None = None, check_finite: bool = True,
                 divergence_factor: float | None = DEFAULT_DIVERGENCE_FACTOR):
        if not isinstance(model, MLP):
            raise TypeError(f"model: expected a bpcore.MLP, got {type(model).__name__}")
        if divergence_factor is not None and (
                isinstance(divergence_factor, bool) or
                not isinstance(divergence_factor, (int, float, np.floating, np.integer)) or
                not 1.0 < float(divergence_factor) < math.inf):
            raise ConfigError(f"divergence_factor: expected a number > 1 (or None), got "
                              f"{divergence_factor!r}")
        self.divergence_factor = None if divergence_factor is None else float(divergence_factor)
        self.model = model
        self.loss = get_loss(loss)
        model.task = self.loss.targets  # what the outputs mean: model.predict needs it
        self.base_optimizer = get_optimizer(optimizer)
        self.clip_norm = clip_norm
        self.check_finite = bool(check_finite)
        self.optimizer = (self.base_optimizer if clip_norm is None else
                          chain(clip_by_global_norm(clip_norm), self.base_optimizer,
                                name=self.base_optimizer.name, hyper=self.base_optimizer.hyper))
        self.opt_state = self.optimizer.init(model.params)
        self.guard = self._new_guard()
        self.epoch = 0
        self.stop_training = False
        self.trace_count = 0  # how many times the step was traced (once per shape on JAX)
        self._step_fn = model.backend.jit(self._pure_step)

    def _new_guard(self, count: int = 0, ref_loss: float = math.nan) -> GuardState:
        be = self.model.backend
        z = be.asarray(np.int32(0))
        return GuardState(be.asarray(np.int32(count)), z, z,
                          be.asarray(np.asarray(ref_loss, dtype=self.model.dtype_name)))

    def _pure_step(self, params, opt_state, guard, x, T):
        self.trace_count += 1  # Python side effect: runs once per compilation on JAX
        return train_step(params, opt_state, guard, x, T, activations=self.model.activations,
                          loss=self.loss, optimizer=self.optimizer,
                          check_finite=self.check_finite,
                          divergence_factor=self.divergence_factor)

    # -- one step -------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Steps run so far (reads a device counter)."""
        return int(self.guard.count)

    def prepare_batch(self, x: Any, y: Any) -> tuple[Array, Array]:
        """Validate a batch and move it to the model's device (what ``step`` does first)."""
        m = self.model
        xb = prepare_input(m.backend, x, m.sizes[0], m.dtype)
        T = self.loss.prepare_target(m.backend, y, m.sizes[-1], xb.shape[0], m.dtype_name)
        return xb, T

    def step(self, x: Any, y: Any) -> Array:
        """One forward/backward/update on ``(x, y)``; returns the loss (0-d, on the device).

        Does not wait for the device. A non-finite loss or gradient freezes the parameters
        at the last good step; :meth:`check` reports it.
        """
        return self.step_prepared(*self.prepare_batch(x, y))[0]

    def step_prepared(self, xb: Array, T: Array) -> tuple[Array, Array]:
        """``step`` on a batch from :meth:`prepare_batch`: returns ``(loss, n_correct)``."""
        params, state, guard, value, correct = self._step_fn(
            self.model.params, self.opt_state, self.guard, xb, T)
        self.model.params, self.opt_state, self.guard = params, state, guard
        return value, correct

    def check(self) -> None:
        """Raise :class:`DivergenceError` if the guard refused a step (reads the device)."""
        bad = int(self.guard.bad_step)
        if not bad:
            return
        reason = int(self.guard.reason)
        kept = (f"The parameters and optimizer state are those after step {bad - 1}, the last "
                "good one (every later step was refused).")
        if reason == GUARD_TARGETS:
            raise ShapeError(
                f"training stopped at step {bad}: its targets were invalid (a class label "
                f"outside [0, {self.model.sizes[-1] - 1}], a negative or non-finite target, or "
                f"a binary target outside [0, 1]). {kept} Check the labels; labels on the "
                "device are only checked inside the step.")
        if reason == GUARD_GREW:
            raise DivergenceError(
                f"training diverged at step {bad}: its loss grew past {self.divergence_factor:g}"
                f" times the first step's loss ({float(self.guard.ref_loss):.4g}). {kept} "
                "Lower the learning rate or clip gradients (clip_norm=...); "
                "divergence_factor=None turns this limit off.")
        raise DivergenceError(
            f"training diverged at step {bad}: the loss, a gradient or an updated parameter "
            f"was not finite. {kept} Lower the learning rate, clip gradients "
            "(clip_norm=...), or check the data for NaN/inf.")

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, path: Any, metadata: dict | None = None, *, preprocessing: Any = None
             ) -> None:
        """Atomically save the model, optimizer state, step and epoch (see bpcore.save)."""
        from .checkpoint import save

        save(path, self.model, self.opt_state, metadata, preprocessing=preprocessing,
             optimizer=self.base_optimizer,
             loss=self.loss.name, step=self.steps, epoch=self.epoch,
             extra={"clip_norm": self.clip_norm, "check_finite": self.check_finite,
                    "divergence_factor": self.divergence_factor,
                    "ref_loss": _number_or_none(self.guard.ref_loss)})

    @classmethod
    def resume(cls, path: Any, backend: Any = "numpy",
               optimizer: GradientTransformation | None = None) -> "Trainer":
        """A Trainer that continues exactly where the one saved at ``path`` stopped."""
        from .checkpoint import load_checkpoint

        return cls.from_checkpoint(load_checkpoint(path, backend=backend), optimizer)

    @classmethod
    def from_checkpoint(cls, ckpt: Any, optimizer: GradientTransformation | None = None
                        ) -> "Trainer":
        """:meth:`resume` from an already loaded :class:`~bpcore.checkpoint.Checkpoint`."""
        from .errors import CheckpointError

        opt = optimizer or ckpt.build_optimizer()
        if opt is None:
            raise CheckpointError("resume: the checkpoint holds no optimizer description; "
                                  "pass optimizer=...")
        if ckpt.meta.get("loss") is None:
            raise CheckpointError("resume: the checkpoint does not name its loss")
        trainer = cls(ckpt.model, ckpt.meta["loss"], opt, clip_norm=ckpt.meta.get("clip_norm"),
                      check_finite=bool(ckpt.meta.get("check_finite", True)),
                      divergence_factor=ckpt.meta.get("divergence_factor",
                                                      DEFAULT_DIVERGENCE_FACTOR))
        if ckpt.optimizer_state:
            trainer.opt_state = ckpt.restore_state(trainer.opt_state)
        ref = ckpt.meta.get("ref_loss")
        trainer.guard = trainer._new_guard(int(ckpt.meta.get("step", 0)),
                                           math.nan if ref is None else float(ref))
        trainer.epoch = int(ckpt.meta.get("epoch", 0))
        return trainer

    def reset_guard(self) -> None:
        """Clear a recorded divergence so training can go on (e.g. after lowering lr)."""
        self.guard = self.guard._replace(bad_step=self.guard.bad_step * 0,
                                         reason=self.guard.reason * 0)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, X: Any, y: Any, batch_size: int = 4096) -> dict[str, float]:
        """Mean loss (and accuracy for classification losses) over ``(X, y)``."""
        Xd, Td = self.prepare_batch(X, y)
        total, correct = self._evaluate_prepared(Xd, Td, batch_size)
        n = Xd.shape[0]
        out = {"loss": float(total) / n}
        if self.loss.targets != "values":
            out["accuracy"] = float(correct) / (n * self.loss.correct_per_row(Td))
        return out

    def _evaluate_prepared(self, Xd, Td, batch_size):
        fn = self.model.compiled(("eval", self.loss.name), lambda: self.model.backend.jit(
            lambda p, x, t: _eval_batch(p, x, t, self.model.activations, self.loss)))
        n = Xd.shape[0]
        total = correct = 0.0
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)  # the standard leaves out-of-bounds slice stops undefined
            value, c = fn(self.model.params, Xd[i:j, ...], Td[i:j, ...])
            total, correct = total + value, correct + c
        return total, correct

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, epochs: int = 10, batch_size: int = 128, *,
            validation_data: tuple[Any, Any] | None = None,
            validation_split: float | None = None, shuffle: bool = True,
            seed: int | None = 0, callbacks: Sequence[Callback] = (), verbose: int = 1,
            drop_last: bool = False) -> History:
        """Train for ``epochs`` passes over ``(X, y)`` in mini-batches.

        Data is validated and moved to the device once; batches are gathered there with a
        permutation drawn on the host from ``(seed, epoch)``, so a resumed run shuffles
        exactly as the uninterrupted one: epoch ``e`` (counted from 0 over the trainer's
        life) visits the rows in ``numpy.random.default_rng([seed, e]).permutation(n)``.
        ``validation_split`` holds out the last fraction of the rows (before shuffling) as
        validation data. Returns a :class:`History` with ``loss`` (mean training loss of the
        epoch, weighted by batch size), ``accuracy`` (classification losses), ``val_loss`` /
        ``val_accuracy`` with validation data, and ``time`` (seconds per epoch).

        Raises :class:`DivergenceError` (the parameters are those of the last good step) when
        the divergence guard refused a step.
        """
        for name, v, lo in (("epochs", epochs, 0), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"fit: {name} must be a whole number >= {lo}, got {v!r}")
        epochs, batch_size = int(epochs), int(batch_size)
        be, xp = self.model.backend, self.model.backend.xp
        Xd, Td = self.prepare_batch(X, y)
        Vd = None
        if validation_split is not None:
            if validation_data is not None:
                raise ConfigError("fit: pass validation_data or validation_split, not both")
            n_all = Xd.shape[0]
            if (isinstance(validation_split, bool) or
                    not isinstance(validation_split, (int, float, np.floating)) or
                    not 0 < validation_split < 1):
                raise ConfigError(f"fit: validation_split must be a fraction in (0, 1), got "
                                  f"{validation_split!r}")
            n_val = int(round(n_all * validation_split))
            if not 0 < n_val < n_all:
                raise ConfigError(f"fit: validation_split={validation_split} of {n_all} rows "
                                  f"leaves {n_val} for validation; use a larger dataset or "
                                  "another fraction")
            # the last rows, before any shuffling (as Keras): the same split every call
            Vd = (Xd[n_all - n_val:, ...], Td[n_all - n_val:, ...])
            Xd, Td = Xd[:n_all - n_val, ...], Td[:n_all - n_val, ...]
        if validation_data is not None:
            if len(validation_data) != 2:
                raise ShapeError("validation_data: expected a pair (X_val, y_val), got "
                                 f"{len(validation_data)} items")
            Vd = self.prepare_batch(*validation_data)
        n = Xd.shape[0]
        per_row = self.loss.correct_per_row(Td)
        n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
        if n_batches == 0:
            raise ConfigError(f"fit: batch_size={batch_size} with drop_last=True leaves no "
                              f"batch from {n} samples")
        if seed is None:  # unseeded: fresh entropy for this call (not reproducible)
            seed = int(np.random.SeedSequence().entropy % 2 ** 63)
        history = History()
        self.stop_training = False
        classify = self.loss.targets != "values"
        self.metric_names = {"loss", "time"} | ({"accuracy"} if classify else set())
        if Vd is not None:
            self.metric_names |= {"val_loss"} | ({"val_accuracy"} if classify else set())
        for cb in callbacks:  # before any step: a callback that cannot work changes nothing
            cb.on_train_begin(self)
        bar = _progress(verbose, n_batches)
        start_epoch = self.epoch
        try:
            for epoch in range(start_epoch, start_epoch + int(epochs)):
                t0 = time.perf_counter()
                order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                         else np.arange(n))
                idx = be.asarray(order.astype(np.int64))
                total = correct = 0.0
                bar.start(epoch + 1, start_epoch + int(epochs))
                for b in range(n_batches):
                    sel = idx[b * batch_size:min((b + 1) * batch_size, n)]
                    value, c = self.step_prepared(xp.take(Xd, sel, axis=0),
                                                  xp.take(Td, sel, axis=0))
                    total, correct = total + value * sel.shape[0], correct + c
                    bar.update(lambda: float(value))
                seen = min(n, n_batches * batch_size)
                self.check()  # one host sync per epoch
                self.epoch = epoch + 1
                logs = {"loss": float(total) / seen}
                if self.loss.targets != "values":
                    logs["accuracy"] = float(correct) / (seen * per_row)
                if Vd is not None:
                    vt, vc = self._evaluate_prepared(*Vd, 4096)
                    logs["val_loss"] = float(vt) / Vd[0].shape[0]
                    if self.loss.targets != "values":
                        logs["val_accuracy"] = float(vc) / (Vd[0].shape[0] * per_row)
                logs["time"] = time.perf_counter() - t0
                history.append(epoch + 1, logs)
                bar.end(logs, seen / logs["time"])
                for cb in callbacks:
                    cb.on_epoch_end(self, epoch + 1, logs)
                if self.stop_training:
                    break
        finally:
            bar.close()
        # Not reached after a DivergenceError: the model keeps the last good step's
        # parameters, as the error says, rather than (say) an early-stopping snapshot.
        for cb in callbacks:
            cb.on_train_end(self)
        return history


def _number_or_none(a: Array) -> float | None:
    v = float(a)
    return v if math.isfinite(v) else None


def _eval_batch(params, x, T, activations, loss):
    Y = forward(params, x, activations)
    value, _ = loss.forward(Y, T)
    return value * x.shape[0], loss.correct(Y, T)


class _progress:
    """A tqdm bar per epoch when tqdm is installed and verbose; a plain line otherwise."""

    def __init__(self, verbose: int, total: int):
        self.verbose, self.total, self.bar = verbose, total, None
        self._last = 0.0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        # A bar only on a terminal; logs and pipes get one plain line per epoch.
        self._tqdm = tqdm if verbose >= 1 and sys.stderr.isatty() else None

    def start(self, epoch: int, epochs: int) -> None:
        self.label = f"epoch {epoch}/{epochs}"
        if self._tqdm is not None:
            self.bar = self._tqdm(total=self.total, desc=self.label, unit="step", leave=True,
                                  file=sys.stderr, dynamic_ncols=True)

    def update(self, read_loss: Callable[[], float]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.perf_counter()
        if now - self._last > 0.5:  # reading the loss syncs the device: only twice a second
            self._last = now
            self.bar.set_postfix(loss=f"{read_loss():.4f}", refresh=False)

    def end(self, logs: dict[str, float], rate: float) -> None:
        shown = {k: f"{v:.4f}" for k, v in logs.items() if k != "time"}
        if self.bar is not None:
            self.bar.set_postfix(**shown, samples_per_s=f"{rate:.0f}")
            self.bar.close()
            self.bar = None
        elif self.verbose >= 1:
            print(f"{self.label}: " + " ".join(f"{k}={v}" for k, v in shown.items()) +
                  f" ({logs['time']:.2f}s, {rate:.0f} samples/s)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
