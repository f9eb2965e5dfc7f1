"""How every command ends on a signal: the same way from the CLI and from Alembic's command line.

The first SIGINT or SIGTERM asks the work to stop after the batch in flight (which commits or rolls
back whole); the command then records the stop and exits 7 with a message that says how to go on. A
second one stops at once: the open transaction is rolled back, and the command still exits 7. Once the
work has begun to stop, further signals no longer interrupt it (it must not die half-way through
recording the stop), but they do end a wait for SQLite's lock at once (:func:`hurrying`, retry.py): the
clean-up then skips what it cannot do at once.

Handling begins with the process: the entry point (``backfill.__main__``) calls :func:`install` before
it imports anything else (the imports take a second or more on a busy machine). A signal that arrives
before a command's own handling begins is held, and the command then ends at once with exit 7, before it
has touched the database. At the very end the entry point ignores both signals (:func:`ignore`): Python
restores the default handlers as it shuts down, and a signal in that moment would end the process by
SIGINT or SIGTERM instead of the exit code the command chose.

This module imports nothing heavy: it is loaded before everything else.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from backfill import output

HANDLED = (signal.SIGINT, signal.SIGTERM)
_held: list[int] = []  # signals that came before a command's handling began
_hurry = False  # the work is stopping and another signal came: give up waiting for locks


class StopNow(KeyboardInterrupt):
    """The second signal: leave the current batch at once (its transaction is rolled back)."""


class Stop:
    """Call it to ask whether a stop was requested (the job asks before every batch)."""

    def __init__(self, immediate: bool = False) -> None:
        self.requested: int | None = None
        self.immediate = immediate  # read-only commands: nothing to finish, the first signal ends them

    def __call__(self) -> bool:
        if self.requested is None:
            return False
        # The work has seen the stop and is about to record it: from here on a second signal must not
        # interrupt that (it would otherwise land in the clean-up, before ``finishing`` could ignore it).
        _stopping()
        return True

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        global _hurry
        if self.requested is not None or self.immediate:
            self.requested = signum
            _hurry = True
            _stopping()  # cleaning up now: nothing may interrupt recording the stop
            raise StopNow(f"{self.reason}, at once")
        self.requested = signum
        output.notice(f"\n{signal.Signals(signum).name}: stopping after the current batch")

    @property
    def reason(self) -> str:
        return f"stopped by {signal.Signals(self.requested).name}" if self.requested else "stopped"


def install() -> None:
    """At the start of the process: hold SIGINT and SIGTERM until a command's handling takes over."""
    for s in HANDLED:
        signal.signal(s, _hold)


def ignore() -> None:
    """At the end of the process: the outcome is decided, and no signal may change it."""
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)


def hurrying() -> bool:
    """Whether a wait for a lock should end now (a second signal came while the work was stopping)."""
    return _hurry


@contextmanager
def handled(immediate: bool = False) -> Iterator[Stop]:
    """Install the handlers for the block (and leave them once a signal came: the process ends right after).

    A signal held since the process started (:func:`install`) ends the command here, before it begins.
    """
    stop = Stop(immediate)
    previous = {s: signal.signal(s, stop._handle) for s in HANDLED}
    if _held:
        stop.requested = _held[0]
        _stopping()
        raise StopNow(f"{stop.reason} before the command began")
    try:
        yield stop
    finally:
        if stop.requested is None:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextmanager
def finishing(should_stop: object) -> Iterator[None]:
    """Once the work is stopping, further signals no longer interrupt it: they must not interrupt recording
    the stop (they only cut short a wait for a lock)."""
    if isinstance(should_stop, Stop) and should_stop.requested is not None:
        _stopping()
    yield


def _hold(signum: int, _frame: FrameType | None) -> None:
    _held.append(signum)


def _hurry_up(_signum: int, _frame: FrameType | None) -> None:
    global _hurry
    _hurry = True


def _stopping() -> None:
    for s in HANDLED:
        signal.signal(s, _hurry_up)
