"""Steps that a Ctrl-C cannot cut in half.

An in-place step writes the parameters and the optimizer's moments one buffer after another,
and the Trainer then records the new state (step count, guard, epoch position). A
``KeyboardInterrupt`` raised between two of those writes would leave a state that is no whole
number of steps: some weights updated and others not, or the weights updated while the step
count says otherwise. So a step is a *commit*: while one runs in the main thread, a SIGINT is
held back and delivered, to whatever handler was installed before, as soon as the commit
ends. The state the interrupt finds is then always that after ``trainer.steps`` steps.

How it costs little: Python runs signal handlers only in the main thread, between bytecodes,
through the handler installed at that moment. :func:`begin` installs a handler that records a
SIGINT while a commit runs (two ``signal.signal`` calls, a few microseconds), unless a
:func:`scope` (``Trainer.fit`` opens one around its loop) installed it already, in which case
a commit costs two counter updates. Outside a commit the handler passes the signal straight
on, so Ctrl-C between steps, in a callback or in validation behaves as it always did. Steps
run in other threads need nothing: no signal handler can interrupt them.

Only SIGINT is deferred (the interrupt a person sends); a handler of another signal that
raises during a step is not. Where SIGINT is ignored or has no Python handler nothing is
installed.
"""

from __future__ import annotations

import signal
import threading
from functools import partial
from typing import Any

__all__ = ["begin", "end", "scope", "Commit"]

_MAIN = threading.main_thread().ident
_SCOPED, _NOTHING = object(), object()  # tokens: a commit inside a scope; nothing to undo


class _Deferral:
    """The process's one deferral. Every transition is one ``signal.signal`` call or one
    attribute update with no call after it, so no SIGINT can fall between two of them and
    find the bookkeeping half done: Python runs handlers only where the interpreter checks
    for them (on entering a function, after a call, on a backward jump)."""

    def __init__(self) -> None:
        self.pending = False   # a SIGINT was held back
        self.depth = 0         # commits in progress inside a scope
        self.scoped = False    # a scope's handler is installed

    def hold(self, signum: int, frame: Any) -> None:
        """The handler while a commit runs outside a scope: hold every SIGINT back."""
        self.pending = True

    def scoped_handler(self, previous: Any, signum: int, frame: Any) -> None:
        """The handler of a scope: hold a SIGINT back while a commit runs, else pass it on."""
        if self.depth:
            self.pending = True
        elif callable(previous):
            previous(signum, frame)
        else:  # (the OS default, or ignored: put it back and let the OS act on it)
            signal.signal(signal.SIGINT, previous)
            signal.raise_signal(signal.SIGINT)


_DEFERRAL = _Deferral()


def begin() -> Any:
    """Start a commit; returns the token for :func:`end`."""
    if threading.get_ident() != _MAIN:  # no signal handler can interrupt another thread
        return _NOTHING
    d = _DEFERRAL
    if d.scoped:
        d.depth += 1
        return _SCOPED
    # One call: before it, a SIGINT goes where it always went (nothing has changed yet);
    # after it, every SIGINT is held.
    return signal.signal(signal.SIGINT, d.hold)


def end(token: Any) -> None:
    """End a commit begun with :func:`begin`; a SIGINT held back during it is delivered now
    (the default handler raises ``KeyboardInterrupt`` here, with the state whole)."""
    if token is _NOTHING:
        return
    d = _DEFERRAL
    if token is _SCOPED:
        d.depth -= 1
        if not d.depth and d.pending:
            d.pending = False
            signal.raise_signal(signal.SIGINT)  # to the scope's handler, which passes it on
        return
    if token == d.hold:  # a commit inside a commit: the outer one delivers
        return
    # (None: the handler was not installed from Python; the OS default is the nearest.)
    signal.signal(signal.SIGINT, signal.SIG_DFL if token is None else token)
    if d.pending:
        # Sent again, now that the handler from before is back: Python's default handler
        # raises KeyboardInterrupt at once, a handler of the user's own runs, an ignored
        # SIGINT stays ignored, the OS default ends the process.
        d.pending = False
        signal.raise_signal(signal.SIGINT)


class scope:
    """``with scope():`` keeps one handler installed across many commits (``fit``'s loop),
    so that each costs two counter updates instead of two ``signal.signal`` calls."""

    def __enter__(self) -> "scope":
        d = _DEFERRAL
        self.handler = None
        if threading.get_ident() != _MAIN or d.scoped or d.depth:
            return self
        previous = signal.getsignal(signal.SIGINT)
        if previous == d.hold:  # (inside a commit: leave it to that commit)
            return self
        self.previous, self.handler = previous, partial(d.scoped_handler, previous)
        signal.signal(signal.SIGINT, self.handler)
        d.scoped = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handler is None:
            return
        d = _DEFERRAL
        d.scoped = False
        if signal.getsignal(signal.SIGINT) is self.handler:  # (else: the user's own stays)
            signal.signal(signal.SIGINT, self.previous)


class Commit:
    """``with Commit():``: :func:`begin` and :func:`end` as a context manager."""

    __slots__ = ("token",)

    def __enter__(self) -> None:
        self.token = begin()

    def __exit__(self, *exc: Any) -> None:
        end(self.token)
