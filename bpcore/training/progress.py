"""Progress output of :meth:`Trainer.fit`: a tqdm bar per epoch on a terminal, else one
plain line per epoch."""

from __future__ import annotations

import sys
import time
from typing import Callable

__all__ = ["Progress"]


class Progress:
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
