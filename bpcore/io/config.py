"""The training configuration as JSON: what a checkpoint stores beside the state's tensors.

A :class:`TrainConfig` names everything needed to rebuild a :class:`~bpcore.Trainer`: the
layer sizes and activations, the dtype, the loss, the optimizer (its spec, schedule
included), gradient clipping, the guard's settings and the input preprocessing. Every name
is looked up in bpcore's registries by one spec <-> object pair per registry (activations
and losses by name, :func:`bpcore.optim.from_spec`, :func:`bpcore.io.preprocess.from_spec`);
``TrainConfig.from_dict`` checks every field's JSON type and value, so a config read from an
untrusted file can only ever give a :class:`~bpcore.errors.ConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..nn.activations import ACTIVATIONS
from ..errors import ConfigError
from ..nn.losses import LOSSES

__all__ = ["TrainConfig"]


def _is_int(v: Any, lo: int = 0, hi: int = 2 ** 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (what it must be, test)
_FIELDS = {
    "sizes": ("a list of 2 to 10000 layer widths in [1, 2**31]",
              lambda v: isinstance(v, list) and 2 <= len(v) <= 10000 and
              all(_is_int(n, 1, 2 ** 31) for n in v)),
    "activations": ("a list of activation names, one per layer",
                    lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v)),
    "dtype": ("'float32' or 'float64'", lambda v: v in ("float32", "float64")),
    "loss": ("a loss name or null", lambda v: v is None or isinstance(v, str)),
    "optimizer": ("null or an optimizer spec (an object with a name)",
                  lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("name"), str))),
    "clip_norm": ("null or a positive number", lambda v: v is None or (_is_number(v) and v > 0)),
    "check_finite": ("true or false", lambda v: isinstance(v, bool)),
    "divergence_factor": ("null or a number > 1",
                          lambda v: v is None or (_is_number(v) and v > 1)),
    "preprocessing": ("null or an object", lambda v: v is None or isinstance(v, dict)),
}


@dataclass(frozen=True)
class TrainConfig:
    sizes: list
    activations: list
    dtype: str = "float32"
    loss: str | None = None
    optimizer: dict | None = None
    clip_norm: float | None = None
    check_finite: bool = True
    divergence_factor: float | None = 1e4
    preprocessing: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "TrainConfig":
        """A validated config from JSON data; anything wrong is a ConfigError saying what."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected an object, got a JSON {type(d).__name__}")
        for key in ("sizes", "activations", "dtype"):
            if key not in d:
                raise ConfigError(f"config: the field {key!r} is missing")
        for key, (want, ok) in _FIELDS.items():
            if key in d and not ok(d[key]):
                shown = repr(d[key])
                raise ConfigError(f"config: field {key!r} must be {want}, got "
                                  f"{shown[:80] + '...' if len(shown) > 80 else shown}")
        sizes, acts = d["sizes"], d["activations"]
        unknown = [a for a in acts if a not in ACTIVATIONS]
        if unknown or len(acts) != len(sizes) - 1:
            raise ConfigError(f"config: activations {acts[:10]} do not fit sizes {sizes[:10]} "
                              f"or name unknown ones {unknown[:10]}; valid: "
                              f"{sorted(ACTIVATIONS)}")
        if d.get("loss") is not None and d["loss"] not in LOSSES:
            raise ConfigError(f"config: unknown loss {d['loss']!r}; valid: {sorted(LOSSES)}")
        return cls(**{k: d[k] for k in _FIELDS if k in d} | {"sizes": sizes,
                                                              "activations": acts})

    @classmethod
    def of(cls, trainer: Any, preprocessing: Any = None) -> "TrainConfig":
        """The config of a :class:`~bpcore.Trainer` (and the preprocessing of its inputs)."""
        m = trainer.model
        return cls(sizes=list(m.sizes), activations=m.activation_names, dtype=m.dtype_name,
                   loss=trainer.loss.name, optimizer=trainer.base_optimizer_spec,
                   clip_norm=trainer.clip_norm, check_finite=trainer.check_finite,
                   divergence_factor=trainer.divergence_factor,
                   preprocessing=None if preprocessing is None else preprocessing.to_spec())

    def build_model(self, backend: Any = "numpy", dtype: str | None = None,
                    params: Any = None) -> Any:
        from ..nn.model import MLP

        return MLP(self.sizes, self.activations[:-1], self.activations[-1], backend=backend,
                   dtype=dtype or self.dtype, params=params,
                   task=None if self.loss is None else LOSSES[self.loss].targets)

    def build_optimizer(self) -> Any:
        """The optimizer the config describes (ConfigError if it describes none)."""
        from ..optim import from_spec

        if self.optimizer is None:
            raise ConfigError("config: no optimizer is described (it was a custom one); pass "
                              "optimizer=...")
        return from_spec(self.optimizer)
