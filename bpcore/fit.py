"""The epoch loop of :meth:`Trainer.fit`: batching, shuffling, validation, callbacks."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ._checks import whole_number
from .callbacks import Callback, History
from .errors import ConfigError, ShapeError
from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from .train import Trainer

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


def _fingerprint(a: Any) -> str:
    """A digest of host data (NumPy or anything NumPy reads without a device copy); ``"-"``
    for data on a device, whose shape alone is compared."""
    import hashlib

    if not isinstance(a, np.ndarray):
        if hasattr(a, "__dlpack__") or not hasattr(a, "__array__"):
            return "-"
        a = np.asarray(a)
    return hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data,
                           digest_size=12).hexdigest() if a.dtype != object else "-"


def fit(trainer: "Trainer", X: Any, y: Any, epochs: int = 10, batch_size: int = 128, *,
        validation_data: tuple[Any, Any] | None = None, validation_split: float | None = None,
        shuffle: bool = True, seed: int | None = 0, callbacks: Sequence[Callback] = (),
        verbose: int = 1, drop_last: bool = False) -> History:
    """See :meth:`Trainer.fit`."""
    epochs = whole_number("fit: epochs", epochs, 0)
    batch_size = whole_number("fit: batch_size", batch_size, 1)
    loss, be = trainer.loss, trainer.model.backend
    xp = be.xp
    Xd, Td = trainer.prepare_batch(X, y)  # (with JAX sharding: on every device)
    Vd = None
    if validation_split is not None:
        if validation_data is not None:
            raise ConfigError("fit: pass validation_data or validation_split, not both")
        (Xd, Td), Vd = _split(Xd, Td, validation_split)
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ShapeError("validation_data: expected a pair (X_val, y_val), got "
                             f"{len(validation_data)} items")
        Vd = trainer.prepare_batch(*validation_data)
    if Vd is not None:  # validation runs no guarded step: check its labels once, here
        trainer.check_targets(Vd[1], "validation_data")
    n = Xd.shape[0]
    per_row = loss.correct_per_row(Td)
    n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    if n_batches == 0:
        raise ConfigError(f"fit: batch_size={batch_size} with drop_last=True leaves no batch "
                          f"from {n} samples")
    if seed is None:  # unseeded: fresh entropy for this call (not reproducible)
        if trainer.parallel is not None:
            raise ConfigError("fit: with data_parallel, pass a seed: every worker must draw "
                              "the same batches")
        seed = int(np.random.SeedSequence().entropy % 2 ** 63)
    if trainer.parallel is not None:  # every worker the same batches, or a clear error
        trainer.parallel.check_same("fit", (  # rows, features, batching, X and y digests
            n, tuple(Xd.shape[1:]), batch_size, epochs, seed, bool(shuffle), bool(drop_last),
            _fingerprint(X), _fingerprint(y)))
    history = History()
    trainer.stop_training = False
    trainer.metric_names = {"loss", "time"} | ({"accuracy"} if loss.has_accuracy else set())
    if Vd is not None:
        trainer.metric_names |= {"val_" + k for k in trainer.metric_names - {"time"}}
    for cb in callbacks:  # before any step: a callback that cannot work changes nothing
        cb.on_train_begin(trainer)
    bar = Progress(verbose, n_batches)
    start = trainer.epoch
    try:
        for epoch in range(start, start + epochs):
            t0 = time.perf_counter()
            order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
                     else np.arange(n))
            idx = be.asarray(order.astype(np.int64))
            values, counts, corrects = [], [], []
            bar.start(epoch + 1, start + epochs)
            for b in range(n_batches):
                lo, hi = b * batch_size, min((b + 1) * batch_size, n)
                value, c = trainer.step_indexed(Xd, Td, order, idx, lo, hi)
                values.append(value)
                counts.append(hi - lo)
                corrects.append(c)
                bar.update(lambda: float(value))
            # the epoch's sums in two device operations, not two per batch
            total = xp.sum(xp.stack(values) * be.asarray(np.asarray(counts, dtype=np.float64),
                                                         dtype=values[0].dtype))
            correct = xp.sum(xp.stack(corrects))
            seen = min(n, n_batches * batch_size)
            trainer.check()  # one host sync per epoch
            if trainer.parallel is not None:  # the workers' parameters: still the same bits
                trainer.parallel.check_identical(trainer.state.params)
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
            for cb in callbacks:
                cb.on_epoch_end(trainer, epoch + 1, logs)
            if trainer.stop_training:
                break
    finally:
        bar.close()
    # Not reached after a DivergenceError: the model keeps the last good step's parameters,
    # as the error says, rather than (say) an early-stopping snapshot.
    for cb in callbacks:
        cb.on_train_end(trainer)
    return history
