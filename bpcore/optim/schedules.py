"""Learning-rate schedules: small frozen records, callable on the step, described by a spec.

``schedule(step)`` is the rate for the update that follows ``step`` updates (0-based: the
first update uses ``schedule(0)``); ``step`` is a Python number or a 0-d array on the
device, and the result is of the same kind. ``schedule.spec`` is a JSON-able dict and
:func:`schedule_from_spec` builds the schedule back: a checkpoint stores the spec.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from .._array import array_namespace
from .._checks import whole_number
from ..errors import ConfigError

__all__ = ["Schedule", "constant", "step_decay", "cosine_decay", "SCHEDULES",
           "schedule_from_spec", "check_rate"]


def check_rate(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``), else a ConfigError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{name}: expected a finite number {'>= 0' if allow_zero else '> 0'}"
                          f", got {value!r}")
    return v


def _ns(step: Any):
    return np if isinstance(step, (int, float, np.generic, np.ndarray)) else array_namespace(step)


class Schedule:
    """Base of the built-in schedules: ``__call__(step)`` and ``spec``."""

    kind = ""

    @property
    def spec(self) -> dict:
        return {"schedule": self.kind, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class Constant(Schedule):
    """``lr(step) = value``."""

    value: float
    kind = "constant"

    def __call__(self, step: Any) -> Any:
        return self.value + 0.0 * step


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``lr(step) = value · gamma^floor(step / step_size)``."""

    value: float
    step_size: int
    gamma: float = 0.1
    kind = "step"

    def __call__(self, step: Any) -> Any:
        xp = _ns(step)
        return self.value * xp.exp(xp.floor(step / self.step_size) * math.log(self.gamma))


@dataclass(frozen=True)
class CosineDecay(Schedule):
    """Cosine from ``value`` at step 0 to ``alpha · value`` at ``decay_steps``, then flat."""

    value: float
    decay_steps: int
    alpha: float = 0.0
    kind = "cosine"

    def __call__(self, step: Any) -> Any:
        xp = _ns(step)
        n = self.decay_steps
        frac = xp.where(step > n, float(n), step) / n
        return self.value * ((1.0 - self.alpha) * 0.5 * (1.0 + xp.cos(math.pi * frac))
                             + self.alpha)


def constant(value: float) -> Constant:
    return Constant(check_rate("lr", value))


def step_decay(value: float, step_size: int, gamma: float = 0.1) -> StepDecay:
    return StepDecay(check_rate("lr", value), whole_number("step_size", step_size),
                     check_rate("gamma", gamma))


def cosine_decay(value: float, decay_steps: int, alpha: float = 0.0) -> CosineDecay:
    return CosineDecay(check_rate("lr", value), whole_number("decay_steps", decay_steps),
                       check_rate("alpha", alpha, allow_zero=True))


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant, "step": step_decay, "cosine": cosine_decay}


def schedule_from_spec(spec: Any) -> Schedule:
    """Inverse of ``schedule.spec``; a bad spec is a ConfigError naming what is wrong."""
    if not isinstance(spec, dict) or spec.get("schedule") not in SCHEDULES:
        raise ConfigError(f"schedule: expected a spec with 'schedule' one of "
                          f"{sorted(SCHEDULES)}, got {str(spec)[:80]}")
    args = {k: v for k, v in spec.items() if k != "schedule"}
    try:
        return SCHEDULES[spec["schedule"]](**args)
    except TypeError as e:
        raise ConfigError(f"schedule: bad settings {args} for {spec['schedule']!r}: {e}") \
            from None
