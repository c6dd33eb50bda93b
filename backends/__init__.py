"""Backend registry: which array libraries bpcore can run on here, and how to get one.

Built-ins: ``numpy``, ``jax``, ``torch``, ``cupy``, ``array_api_strict``. Third parties add
more through the entry-point group ``bpcore.backends``; the entry point names a zero-argument
callable returning a :class:`Backend` (or raising :class:`BackendUnavailableError` saying why).

>>> import bpcore
>>> bpcore.backends.available()          # doctest: +SKIP
['numpy', 'jax', 'torch', 'array_api_strict']
>>> be = bpcore.backends.get("numpy")
"""

from __future__ import annotations

import importlib
import threading
from importlib.metadata import entry_points
from typing import Callable

from bpcore.errors import BackendUnavailableError

from ._base import Backend

__all__ = ["Backend", "available", "get", "register", "names", "reasons"]

_BUILTIN = {
    "numpy": "numpy",
    "jax": "jax",
    "torch": "torch",
    "cupy": "cupy",
    "array_api_strict": "array_api_strict",
}

_factories: dict[str, Callable[[], Backend]] = {}
_made: dict[str, Backend] = {}
_failed: dict[str, BackendUnavailableError] = {}
_lock = threading.Lock()
_entry_points_loaded = False


def _builtin_factory(module: str) -> Callable[[], Backend]:
    def make() -> Backend:
        return importlib.import_module(f"{__name__}.{module}").make()

    return make


for _name, _mod in _BUILTIN.items():
    _factories[_name] = _builtin_factory(_mod)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group="bpcore.backends"):
        if ep.name in _factories:
            continue  # built-ins win; a plug-in cannot shadow them

        def make(ep=ep) -> Backend:
            try:
                factory = ep.load()
            except Exception as e:
                raise BackendUnavailableError(
                    f"backend {ep.name!r}: its entry point {ep.value!r} failed to load "
                    f"({type(e).__name__}: {e})"
                ) from e
            return factory()

        _factories[ep.name] = make


def register(name: str, factory: Callable[[], Backend], *, overwrite: bool = False) -> None:
    """Register a backend factory under ``name`` for this process."""
    _load_entry_points()
    with _lock:
        if name in _factories and not overwrite:
            raise ValueError(f"register: a backend named {name!r} exists; pass overwrite=True")
        _factories[name] = factory
        _made.pop(name, None)
        _failed.pop(name, None)


def names() -> list[str]:
    """Every registered backend name, usable here or not."""
    _load_entry_points()
    return list(_factories)


def get(name: str | Backend = "numpy") -> Backend:
    """Return the backend called ``name``.

    Raises
    ------
    BackendUnavailableError
        The name is unknown (the message lists the known ones), or its library or device
        is missing here (the message says which, and what to install).
    """
    if isinstance(name, Backend):
        return name
    _load_entry_points()
    if not isinstance(name, str) or name not in _factories:
        raise BackendUnavailableError(
            f"backend: unknown name {name!r}; expected one of {sorted(_factories)}"
            f"{_did_you_mean(name)}"
        )
    with _lock:
        if name in _made:
            return _made[name]
        if name in _failed:
            raise _failed[name]
    try:
        be = _factories[name]()
    except BackendUnavailableError as e:
        with _lock:
            _failed[name] = e
        raise
    except Exception as e:  # a library that imports but cannot initialise
        err = BackendUnavailableError(
            f"backend {name!r} failed to initialise: {type(e).__name__}: {e}"
        )
        with _lock:
            _failed[name] = err
        raise err from e
    with _lock:
        _made[name] = be
    return be


# Names people type for a backend, and what they mean here.
_ALIASES = {"pytorch": "torch", "np": "numpy", "jnp": "jax", "jaxlib": "jax",
            "cuda": "cupy' (CuPy on an NVIDIA GPU), or 'torch' with tensors on a CUDA device",
            "gpu": "cupy' or 'jax' or 'torch' (each runs on an NVIDIA GPU when it has one)",
            "array-api-strict": "array_api_strict", "strict": "array_api_strict"}


def _did_you_mean(name: object) -> str:
    import difflib

    if not isinstance(name, str):
        return ""
    key = name.strip().lower()
    if key in _factories:
        return f"; did you mean {key!r}? (names are lower case)"
    if key in _ALIASES:
        return f"; did you mean '{_ALIASES[key]}'?"
    close = difflib.get_close_matches(key, list(_factories), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _probe(name: str) -> bool | None:
    """Whether a built-in backend can be made here, told without importing its library
    (importing jax and torch takes seconds): its package is installed, and for CuPy an NVIDIA
    driver is there. None: no cheap answer (a plug-in): ask ``get``."""
    import importlib.util

    if name not in _BUILTIN:
        return None
    if importlib.util.find_spec(name) is None or importlib.util.find_spec(
            "array_api_compat") is None:
        return False
    if name == "cupy":
        import ctypes.util

        return None if ctypes.util.find_library("cuda") else False  # driver: import to see
    return True


def reasons() -> dict[str, str]:
    """For every registered backend that is *not* usable here, why not."""
    out = {}
    for n in names():
        try:
            get(n)
        except BackendUnavailableError as e:
            out[n] = str(e)
    return out


def available() -> list[str]:
    """Names of the backends usable on this machine, in registry order. Built-ins are probed
    without importing their libraries where that tells (an installed CPU library works);
    ``get(name)`` or :func:`reasons` import them and say why one fails."""
    ok = []
    for n in names():
        with _lock:
            known = True if n in _made else False if n in _failed else None
        if known is None:
            known = _probe(n)
        if known is None:
            try:
                get(n)
                known = True
            except BackendUnavailableError:
                known = False
        if known:
            ok.append(n)
    return ok
