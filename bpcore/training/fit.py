"""The epoch loop of :meth:`Trainer.fit`: batching, shuffling, validation, callbacks."""

from __future__ import annotations

import math
import time
from contextlib import closing as _closing
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import interrupts as _interrupts
from .._checks import whole_number
from .callbacks import Callback, History
from ..errors import ConfigError, ShapeError
from ..nn.targets import label_targets
from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

__all__ = ["fit"]


def _split(Xd: Any, Td: Any, fraction: Any) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """The last ``fraction`` of the rows, before any shuffling (as Keras), as validation."""
    n = Xd.shape[0]
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or
            not 0 < fraction < 1):
        raise ConfigError(f"fit: validation_split must be a fraction in (0, 1), got "
                          f"{fraction!r}")
    n_val = int(round(n * fraction))
    if not 0 < n_val < n:
        raise ConfigError(f"fit: validation_split={fraction} of {n} rows leaves {n_val} for "
                          "validation; use a larger dataset or another fraction")
    return (Xd[:n - n_val, ...], Td[:n - n_val, ...]), (Xd[n - n_val:, ...], Td[n - n_val:, ...])


def _labels(trainer: "Trainer", y: Any, n: int) -> Any:
    """``y`` as class labels on the device, for :meth:`Trainer.step_indexed`, where the
    in-place step takes labels as they are (``takes_labels``: no one-hot rows, as
    :meth:`Trainer.step` does); else None. ``y`` has passed ``prepare_batch`` already."""
    step = trainer._inplace
    if step is None or not step.takes_labels:
        return None
    m = trainer.model
    labels = label_targets(trainer.loss, m.backend, y, m.sizes[-1], n)
    return None if labels is None else trainer._workers.place(labels)


def _prepare(trainer: "Trainer", X: Any, y: Any, validation_data: Any, validation_split: Any
             ) -> tuple[Any, Any, Any, Any]:
    """The training data and the validation pair (or None), validated and on the device;
    and, where the step takes class labels directly (:func:`_labels`), the training rows'
    labels on the device (else None)."""
    Xd, Td = trainer.prepare_batch(X, y)  # (with JAX sharding: on every device)
    Ld = _labels(trainer, y, Xd.shape[0])
    Vd = None
    if validation_split is not None:
        if validation_data is not None:
            raise ConfigError("fit: pass validation_data or validation_split, not both")
        (Xd, Td), Vd = _split(Xd, Td, validation_split)
        if Ld is not None:
            Ld = Ld[:Xd.shape[0]]
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ShapeError("validation_data: expected a pair (X_val, y_val), got "
                             f"{len(validation_data)} items")
        Vd = trainer.prepare_batch(*validation_data)
    if Vd is not None:  # validation runs no guarded step: check its labels once, here
        trainer.check_targets(Vd[1], "validation_data")
    return Xd, Td, Vd, Ld


def fit(trainer: "Trainer", X: Any, y: Any, epochs: int = 10, batch_size: int = 128, *,
        validation_data: tuple[Any, Any] | None = None, validation_split: float | None = None,
        shuffle: bool = True, seed: int | None = 0, callbacks: Sequence[Callback] = (),
        verbose: int = 1, drop_last: bool = False) -> History:
    """See :meth:`Trainer.fit`."""
    epochs = whole_number("fit: epochs", epochs, 0)
    batch_size = whole_number("fit: batch_size", batch_size, 1)
    loss, be = trainer.loss, trainer.model.backend
    xp = be.xp
    workers = trainer._workers  # the data-parallel protocol (one worker: no-ops)
    failed = None
    try:
        Xd, Td, Vd, Ld = _prepare(trainer, X, y, validation_data, validation_split)
        n = Xd.shape[0]
        n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
        if n_batches == 0:
            raise ConfigError(f"fit: batch_size={batch_size} with drop_last=True leaves no "
                              f"batch from {n} samples")
        first = trainer.epoch_batch  # > 0: an interrupted epoch, continued where it stopped
        if seed is None:  # unseeded: fresh entropy for this call (not reproducible)
            if not workers.one_controller:
                raise ConfigError("fit: with data_parallel, pass a seed: every worker must "
                                  "draw the same batches")
            seed = int(np.random.SeedSequence().entropy % 2 ** 63)
        plan = (n, batch_size, bool(drop_last), bool(shuffle), int(seed))
        if first and (first > n_batches or trainer.epoch_plan not in (None, plan)):
            was = trainer.epoch_plan or "not recorded"
            raise ConfigError(
                f"fit: the trainer stopped after batch {first} of epoch {trainer.epoch + 1}, "
                f"batched as (rows, batch_size, drop_last, shuffle, seed) = {was}; this call "
                f"batches {plan}, {n_batches} batches an epoch. Continuing the epoch under "
                "another plan would train some rows twice and others never: pass the same "
                "data, batch_size, drop_last, shuffle and seed (or call trainer.end_epoch() "
                "to start the next epoch afresh)")
        settings: tuple = (n, tuple(Xd.shape[1:]), batch_size, epochs, seed, bool(shuffle),
                           bool(drop_last), first)
        # (MPI: the data itself, as trained on)
        settings += workers.data_settings(be.to_numpy, Xd, Td, *(Vd or (None,)))
    except Exception as e:  # still join the workers' check below: none may wait alone
        failed, settings = e, ("failed", f"{type(e).__name__}: {e}")
    # Every worker the same batches, or the same clear error (one worker: nothing to check).
    workers.check_same("fit", settings)
    if failed is not None:
        raise failed
    if first == n_batches and epochs:  # stopped after the epoch's last batch, before its end
        trainer.check()
        trainer.end_epoch()  # (no history entry: none of its batches runs in this call)
        first, epochs = 0, epochs - 1
    per_row = loss.correct_per_row(Td)
    history = History()
    trainer.stop_training = False
    trainer.metric_names = {"loss", "time"} | ({"accuracy"} if loss.has_accuracy else set())
    if Vd is not None:
        trainer.metric_names |= {"val_" + k for k in trainer.metric_names - {"time"}}
    for cb in callbacks:  # before any step: a callback that cannot work changes nothing
        cb.on_train_begin(trainer)
    bar = Progress(verbose, n_batches)
    start = trainer.epoch
    # One SIGINT handler for the whole loop: each step then holds a Ctrl-C back until it
    # has ended for two counter updates (bpcore.training.interrupts), not two signal.signal calls.
    with _interrupts.scope(), _closing(bar):
        for epoch in range(start, start + epochs):
            t0 = time.perf_counter()
            trainer.epoch_plan = plan
            order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                     else np.arange(n))
            idx = be.asarray(order.astype(np.int64))
            values, counts, corrects = [], [], []
            bar.start(epoch + 1, start + epochs)
            for b in range(first if epoch == start else 0, n_batches):
                lo, hi = b * batch_size, min((b + 1) * batch_size, n)
                value, c = trainer.step_indexed(Xd, Td, order, idx, lo, hi, epoch_batch=b + 1,
                                                labels=Ld)
                values.append(value)
                counts.append(hi - lo)
                corrects.append(c)
                bar.update(lambda: float(value))
            # the epoch's sums in two device operations, not two per batch
            total = xp.sum(xp.stack(values) * be.asarray(np.asarray(counts, dtype=np.float64),
                                                         dtype=values[0].dtype))
            correct = xp.sum(xp.stack(corrects))
            seen = sum(counts)  # the rows trained on (drop_last: not the dropped ones)
            trainer.check()  # one host sync per epoch
            workers.check_identical(trainer.state.params)  # still the same bits everywhere
            trainer.end_epoch()
            logs = {"loss": float(total) / seen}
            if loss.has_accuracy:
                logs["accuracy"] = float(correct) / (seen * per_row)
            if Vd is not None:
                vt, vc = trainer.evaluate_prepared(*Vd)
                logs["val_loss"] = float(vt) / Vd[0].shape[0]
                if loss.has_accuracy:
                    logs["val_accuracy"] = float(vc) / (Vd[0].shape[0] * per_row)
            logs["time"] = time.perf_counter() - t0
            history.append(epoch + 1, logs)
            bar.end(logs, seen / logs["time"])
            _end_of_epoch_callbacks(trainer, callbacks, epoch + 1, logs)
            if trainer.stop_training:
                break
    # Not reached after a DivergenceError: the model keeps the last good step's parameters,
    # as the error says, rather than (say) an early-stopping snapshot.
    for cb in callbacks:
        cb.on_train_end(trainer)
    return history


def _end_of_epoch_callbacks(trainer: "Trainer", callbacks: Sequence[Callback], epoch: int,
                            logs: dict) -> None:
    """The callbacks' ``on_epoch_end``. With data parallelism, whether to go on is decided
    by every worker together (one collective): training stops everywhere if any worker's
    callback asked it to, and a callback that raised on one worker raises on every worker
    (the others would otherwise wait alone in the next step's collective)."""
    failed = None
    try:
        for cb in callbacks:
            cb.on_epoch_end(trainer, epoch, logs)
    except Exception as e:
        failed = e
    everyone = trainer._workers.outcomes(
        bool(trainer.stop_training), None if failed is None else f"{type(failed).__name__}: "
        f"{failed}")
    if failed is not None:
        raise failed
    errors = [(r, why) for r, (_, why) in enumerate(everyone) if why is not None]
    if errors:
        raise RuntimeError(f"fit: a callback raised on worker {errors[0][0]} after epoch "
                           f"{epoch} ({errors[0][1]}); every worker stops with it")
    trainer.stop_training = any(stop for stop, _ in everyone)
