"""One lookup for every name -> object registry (activations, losses, optimizers)."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import UnknownNameError


def lookup(registry: Mapping[str, Any], name: Any, *, kind: str, argument: str,
           passthrough: type) -> Any:
    """``registry[name]``; an instance of ``passthrough`` is returned as is.

    An unknown name raises :class:`UnknownNameError` naming the argument and listing the
    valid names.
    """
    if isinstance(name, passthrough):
        return name
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"{argument}: unknown {kind} {name!r}; expected one of {sorted(registry)}"
        ) from None
