"""What :meth:`Trainer.fit` reports and the hooks it calls: ``History``, ``Callback`` and
``EarlyStopping``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

__all__ = ["History", "Callback", "EarlyStopping"]


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
            trainer.set_params(self.best_params)
