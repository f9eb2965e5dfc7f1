"""Everything the tool writes to stdout and stderr: reports, error lines, progress, waits and notices.

A reader that goes away must neither stop the work nor change its exit code: ``run 2>&1 | head -1``,
a ``tee`` killed by the same Ctrl-C as the run, ``run --json | true``. Python ignores SIGPIPE, so a write
to such a pipe raises BrokenPipeError; here the stream's file descriptor is then pointed at /dev/null
(``os.dup2``), so that the write, every later one and the interpreter's own flush at exit (which would
otherwise print "Exception ignored ... BrokenPipeError" and exit 120) succeed and go nowhere. A terminal
that went away (EIO) is treated the same way.

Every write is flushed at once, so nothing waits in a buffer for the interpreter's exit.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

    from backfill.replicas import Lag

_GONE = (errno.EPIPE, errno.EIO)  # the reader (pipe) or the terminal is gone


def _discard(fd: int) -> None:
    """From now on, what is written to ``fd`` goes to /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _write(stream: TextIO | None, text: str) -> None:
    if stream is None:  # the descriptor was closed before Python started (`run >&-`): Python made it None
        return
    try:
        stream.write(text)
        stream.flush()
    except OSError as exc:
        if exc.errno not in _GONE:
            raise
        _discard(stream.fileno())
        with suppress(OSError):
            stream.flush()  # what the failed flush left in the buffer, to /dev/null


def terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is a terminal (None, for a descriptor closed before Python started, is not)."""
    return stream is not None and stream.isatty()


def line(text: str, err: bool = False) -> None:
    """One line on stdout (``err``: stderr)."""
    _write(sys.stderr if err else sys.stdout, text + "\n")


def ask(question: str) -> None:
    """A question on stderr (the answer is read from the terminal on stdin)."""
    _write(sys.stderr, question)


def error(message: str) -> None:
    """The one line a failure leaves on stderr."""
    line(f"Error: {message}", err=True)


def emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    """A command's result on stdout: one JSON object (``--json``) or ``text``."""
    line(json.dumps(data, default=str, sort_keys=True) if as_json else text)


def notice(text: str) -> None:
    """A line on stderr from a signal handler: straight to the file descriptor, past Python's buffer (a
    handler may run while that buffer is being written to, which would raise "reentrant call")."""
    try:
        fd = sys.stderr.fileno()  # None (closed at start): the descriptor may be a database socket by now
    except (AttributeError, OSError, ValueError):
        return
    try:
        os.write(fd, (text + "\n").encode(errors="replace"))
    except OSError as exc:
        if exc.errno in _GONE:
            _discard(fd)


def flush() -> None:
    """Before the process exits: nothing left in a buffer to fail at exit."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(ValueError):  # a stream someone closed
            _write(stream, "")


class _Guarded:
    """A stream for tqdm, which writes on its own: each write goes through :func:`_write`."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        _write(self._stream, text)

    def flush(self) -> None:
        _write(self._stream, "")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Bar:
    """Progress on stderr: a tqdm bar (rate, ETA) on a terminal, a plain line every ``every`` seconds
    otherwise (``progress``); and while a replica holds the work, a "waiting for replica" line at most
    every 2 s (``waits``; one JSON line each with ``as_json``)."""

    def __init__(self, progress: bool, waits: bool, as_json: bool = False, every: float = 10.0) -> None:
        self.progress = progress
        self.waits = waits
        self.as_json = as_json
        self.every = every
        self.tty = terminal(sys.stderr)
        self.bar: tqdm | None = None
        self.last_wait = 0.0
        self.done = self.total = self.inserted = 0
        self.t0 = self.last = time.monotonic()

    def start(self, total: int) -> None:
        self.close()
        self.done, self.total, self.t0 = 0, total, time.monotonic()
        if self.progress and self.tty:
            from tqdm import tqdm  # only on a terminal (it takes a tenth of a second to import)

            self.bar = tqdm(total=total, unit="exp", desc="backfill", file=_Guarded(sys.stderr), dynamic_ncols=True)

    def advance(self, scanned: int, inserted: int) -> None:
        self.done += scanned
        self.inserted += inserted
        if self.bar is not None:
            self.bar.update(scanned)
            self.bar.set_postfix(inserted=self.inserted, refresh=False)
        elif self.progress and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            rate = self.done / max(self.last - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0
            line(
                f"progress: {self.done}/{self.total} tagged-source rows scanned, {self.inserted} inserted, "
                f"{rate:.0f}/s, eta {eta:.0f}s",
                err=True,
            )

    def waiting(self, lag: Lag) -> None:
        """A replica holds the work: say so, at most every 2 s."""
        if not self.waits or time.monotonic() - self.last_wait < 2:
            return
        self.last_wait = time.monotonic()
        if self.as_json:
            event = {"event": "waiting for replica", "replica": lag.replica, "lag_seconds": round(lag.seconds, 2)}
            line(json.dumps({**event, "pending_batches": lag.pending, "reason": lag.reason}), err=True)
            return
        state = lag.reason or f"lag {lag.seconds:.1f} s, {lag.pending} batches behind"
        message = f"waiting for replica {lag.replica}: {state}"
        if self.bar is not None:
            self.bar.write(message, file=_Guarded(sys.stderr))
        else:
            line(message, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
