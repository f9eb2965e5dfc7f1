"""How every command ends on a signal: the same way from the CLI and from Alembic.

The first SIGINT or SIGTERM asks the work to stop after the batch in flight (which commits or rolls
back whole); the command then records the stop and exits 7 with a message that says how to go on. A
second one stops at once: the open transaction is rolled back, and the command still exits 7. Further
signals are ignored while it cleans up, so it never dies half-way through recording the stop.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


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
        _ignore_further_signals()
        return True

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested is not None or self.immediate:
            self.requested = signum
            _ignore_further_signals()  # cleaning up now: nothing may interrupt recording the stop
            raise StopNow
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current batch", file=sys.stderr, flush=True)

    @property
    def reason(self) -> str:
        return f"stopped by {signal.Signals(self.requested).name}" if self.requested else "stopped"


@contextmanager
def handled(immediate: bool = False) -> Iterator[Stop]:
    """Install the handlers for the block (and leave them once a signal came: the process ends right after)."""
    stop = Stop(immediate)
    previous = {s: signal.signal(s, stop._handle) for s in HANDLED}
    try:
        yield stop
    finally:
        if stop.requested is None:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextmanager
def finishing(should_stop: object) -> Iterator[None]:
    """Once the work is stopping, further signals are ignored: they must not interrupt recording the stop,
    nor kill the process as it exits (Python restores the default handlers at exit, not SIG_IGN)."""
    if isinstance(should_stop, Stop) and should_stop.requested is not None:
        _ignore_further_signals()
    yield


def _ignore_further_signals() -> None:
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)
