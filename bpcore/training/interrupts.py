"""Steps that a Ctrl-C cannot cut in half.

An in-place step writes the parameters and the optimizer's moments one buffer after another,
and the Trainer then records the new state (step count, guard, epoch position). A
``KeyboardInterrupt`` raised between two of those writes would leave a state that is no whole
number of steps: some weights updated and others not, or the weights updated while the step
count says otherwise. So a step is a *commit*: while one runs in the main thread, a SIGINT is
held back and delivered, to whatever handler was installed before, as soon as the commit
ends. The state the interrupt finds is then always that after ``trainer.steps`` steps.

How it costs little: Python runs signal handlers only in the main thread, between bytecodes,
through the handler installed at that moment. A Trainer, at its first step in the main
thread, installs one handler for as long as it lives (:func:`hold`; ``fit`` opens a
:class:`scope` too): outside a commit it passes every SIGINT straight on to the handler that
was there before, so Ctrl-C between steps, in a callback or in validation behaves as it
always did; inside one it records the signal. A commit then costs two counter updates (a
``signal.signal`` pair, ~6 µs, where no handler is held). Steps run in other threads need
nothing: no signal handler can interrupt them.

Only SIGINT is deferred (the interrupt a person sends); a handler of another signal that
raises during a step is not. Where SIGINT is ignored or has no Python handler, commits
install a handler for their own duration only. A handler of your own installed after the
Trainer's replaces it (yours stays; steps are then no longer shielded from it).
"""

from __future__ import annotations

import signal
import threading
import weakref
from functools import partial
from typing import Any

__all__ = ["begin", "end", "scope", "hold", "Commit"]

_MAIN = threading.main_thread().ident
# Tokens of begin(): a commit under the held handler; nothing to undo (another thread).
_HELD, _NOTHING = object(), object()


class _Deferral:
    """The process's one deferral. Each transition is one ``signal.signal`` call or one
    attribute update with no call after it, so no SIGINT can fall between two of them and
    find the bookkeeping half done: Python runs handlers only where the interpreter checks
    for them (on entering a function, after a call, on a backward jump)."""

    def __init__(self) -> None:
        self.pending = False   # a SIGINT was held back
        self.depth = 0         # commits in progress under the held handler
        self.holders = 0       # scopes and live Trainers that keep the handler installed
        self.handler: Any = None   # the held handler (a partial over the one before it)
        self.previous: Any = None  # the handler before it

    def hold(self, signum: int, frame: Any) -> None:
        """The handler while a commit runs with no held handler: hold every SIGINT back."""
        self.pending = True

    def held(self, previous: Any, signum: int, frame: Any) -> None:
        """The held handler: hold a SIGINT back while a commit runs, else pass it on."""
        if self.depth:
            self.pending = True
        else:
            previous(signum, frame)

    def acquire(self) -> bool:
        """One more holder of the handler (main thread only); False: SIGINT has no Python
        handler to defer to (ignored, or the OS default), so nothing is held."""
        current = signal.getsignal(signal.SIGINT)
        if self.handler is not None and current is self.handler:
            self.holders += 1  # (installed already; also after a release in another thread)
            return True
        if not callable(current) or current == self.hold:
            return False
        handler = partial(self.held, current)
        signal.signal(signal.SIGINT, handler)
        self.handler, self.previous, self.holders = handler, current, 1
        return True

    def release(self) -> None:
        """One holder fewer; the last one puts the previous handler back (from the main
        thread; elsewhere the handler stays, passing every signal on, until a later holder
        in the main thread takes it over)."""
        self.holders -= 1
        if self.holders or threading.get_ident() != _MAIN:
            return
        handler, previous = self.handler, self.previous
        self.handler = self.previous = None
        if signal.getsignal(signal.SIGINT) is handler:  # (else: the user's own stays)
            signal.signal(signal.SIGINT, previous)


_DEFERRAL = _Deferral()


def begin() -> Any:
    """Start a commit; returns the token for :func:`end`."""
    if threading.get_ident() != _MAIN:  # no signal handler can interrupt another thread
        return _NOTHING
    d = _DEFERRAL
    if d.holders:
        d.depth += 1
        return _HELD
    # One call: before it, a SIGINT goes where it always went (nothing has changed yet);
    # after it, every SIGINT is held.
    return signal.signal(signal.SIGINT, d.hold)


def end(token: Any) -> None:
    """End a commit begun with :func:`begin`; a SIGINT held back during it is delivered now
    (the default handler raises ``KeyboardInterrupt`` here, with the state whole)."""
    if token is _NOTHING:
        return
    d = _DEFERRAL
    if token is _HELD:
        d.depth -= 1
        if not d.depth and d.pending:
            d.pending = False
            signal.raise_signal(signal.SIGINT)  # to the held handler, which passes it on
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


def hold(owner: Any) -> bool:
    """Keep the handler installed while ``owner`` lives (a Trainer, from its first step in
    the main thread), so that its commits cost two counter updates. True when held."""
    if threading.get_ident() != _MAIN or _DEFERRAL.depth or not _DEFERRAL.acquire():
        return False
    weakref.finalize(owner, _DEFERRAL.release)
    return True


class scope:
    """``with scope():`` keeps the handler installed across many commits (``fit``'s loop)."""

    def __enter__(self) -> "scope":
        self.held = (threading.get_ident() == _MAIN and not _DEFERRAL.depth and
                     _DEFERRAL.acquire())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            _DEFERRAL.release()


class Commit:
    """``with Commit():``: :func:`begin` and :func:`end` as a context manager."""

    __slots__ = ("token",)

    def __enter__(self) -> None:
        self.token = begin()

    def __exit__(self, *exc: Any) -> None:
        end(self.token)
