"""Exception types raised by bpcore.

Each one subclasses the built-in exception a Python user would already catch, so
``except ValueError`` keeps working, and each message names the argument or layer,
what was expected, what was given, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BpcoreError",
    "ShapeError",
    "DTypeError",
    "BackendUnavailableError",
    "DeviceMismatchError",
    "UnknownNameError",
    "CheckpointError",
    "DivergenceError",
    "ConfigError",
]


class BpcoreError(Exception):
    """Base class of every error bpcore raises on purpose."""


class ShapeError(BpcoreError, ValueError):
    """An array has the wrong rank, width, batch size or label range."""


class DTypeError(BpcoreError, TypeError):
    """An array or requested dtype is not one bpcore can use there."""


class BackendUnavailableError(BpcoreError, ImportError):
    """A backend is unknown, or its library or device is missing on this machine."""


class DeviceMismatchError(BpcoreError, ValueError):
    """An array lives on a device the model cannot take it from."""


class UnknownNameError(BpcoreError, KeyError):
    """A registry name (activation, loss, optimizer, schedule) is not known.

    Subclasses ``KeyError`` (a failed registry lookup) but prints its message plainly.
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(BpcoreError, ValueError):
    """A hyper-parameter or constructor argument is out of its valid range."""


class CheckpointError(BpcoreError, ValueError):
    """A checkpoint file is missing, truncated, corrupted, foreign or mismatched."""


class DivergenceError(BpcoreError, FloatingPointError):
    """Training produced a non-finite loss or gradient; parameters were restored."""
