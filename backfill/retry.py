"""The retry and watchdog policy: which errors are worth another try, and how long anything may take.

* :class:`Timeouts` are the limits a command runs under (each has a CLI option).
* The **watchdog** gives every statement, commit and rollback a client-side deadline. A frozen server
  (``docker pause``, a hung host) cannot enforce its own statement timeout, and its kernel keeps
  acknowledging TCP, so a client would wait forever: past the deadline the watchdog shuts the
  connection's socket down, the blocked call fails at once and the server discards the transaction
  whole. On Oracle MySQL, whose ``max_execution_time`` limits SELECT only, it also ends a write that
  outlives the statement timeout with ``KILL QUERY`` from a second session. It is installed on an engine
  once (:func:`guard`) and acts only inside :func:`limits` (so an application engine handed to the
  Alembic revision is not affected outside it).
* :func:`with_retries` runs one unit of work again after a transient error (a lock or statement
  timeout, a deadlock, a lost connection), with exponential backoff and jitter (tenacity).
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from backfill import signals
from backfill.errors import STATEMENT_POOLING, BackfillError, ExitCode, cut_by_watchdog, mark_cut, mysql_errno, sqlstate

T = TypeVar("T")

# The bounds of every duration option (seconds); PostgreSQL's timeouts are int32 milliseconds.
MAX_SECONDS = 86_400.0


@dataclass(frozen=True)
class Timeouts:
    """Per-command limits, in seconds (docs/live-safety.md: "Timeouts, per server")."""

    lock: float = 1.0  # how long a statement may wait for a lock MLflow holds
    statement: float = 30.0  # how long one statement may run
    connect: float = 10.0  # how long connecting (TCP, TLS, log-in) may take
    retries: int = 5  # further tries of a unit of work after a transient error

    @property
    def deadline(self) -> float:
        """The watchdog's limit on any one call: the server's own limits plus a margin."""
        return self.statement + self.lock + 5


_limits: contextvars.ContextVar[Timeouts | None] = contextvars.ContextVar("mgb_limits", default=None)


@contextmanager
def limits(timeouts: Timeouts) -> Iterator[None]:
    """Put every statement of this thread under the watchdog for the block's duration."""
    token = _limits.set(timeouts)
    try:
        yield
    finally:
        _limits.reset(token)


class _Watchdog:
    """One daemon thread for the process: runs each armed action once its time has come, unless disarmed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, action: Callable[[], None]) -> int:
        with self._cv:
            handle = next(self._ids)
            heapq.heappush(self._heap, (time.monotonic() + seconds, handle, action))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mgb-watchdog", daemon=True)
                self._thread.start()
            self._cv.notify()
            return handle

    def disarm(self, handle: int) -> None:
        with self._cv:
            self._cancelled.add(handle)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._heap)[1])
                if not self._heap:
                    self._cv.wait()
                    continue
                due, _handle, action = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
            # Outside the lock: a KILL QUERY connects to the server, which may itself be slow.
            threading.Thread(target=action, name="mgb-watchdog-action", daemon=True).start()


_watchdog = _Watchdog()


def stopped_answering(engine: Engine) -> bool:
    """Whether the watchdog had to cut a connection of ``engine``: then clean-up skips the server (a
    rollback or an unlock would wait a whole deadline each; the server drops both with the session)."""
    return bool(getattr(engine, "_mgb_stopped_answering", False))


def _raw(connection: Any) -> Any:
    return getattr(connection, "dbapi_connection", connection)


def _socket_fd(dbapi_connection: Any) -> int | None:
    """The DBAPI connection's socket (psycopg, PyMySQL); None for SQLite or a closed connection."""
    raw = _raw(dbapi_connection)
    try:
        if hasattr(raw, "pgconn"):
            return int(raw.fileno())
        sock = getattr(raw, "_sock", None)
        return sock.fileno() if sock is not None else None
    except Exception:  # noqa: BLE001 - a closed connection has no socket to watch
        return None


def _shutdown(fd: int) -> None:
    with suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _guarded(engine: Engine, dbapi_connection: Any, writes: bool, call: Callable[[], T]) -> T:
    """Run one driver call under the current limits (see the module docstring)."""
    timeouts = _limits.get()
    if timeouts is not None and engine.dialect.name == "sqlite" and getattr(engine, "_mgb_owned", False):
        return _in_steps(_raw(dbapi_connection), call, timeouts.lock)
    fd = _socket_fd(dbapi_connection) if timeouts is not None else None
    if timeouts is None or fd is None:
        return call()
    fired: list[float] = []

    def cut() -> None:
        fired.append(timeouts.deadline)
        engine._mgb_stopped_answering = True  # type: ignore[attr-defined]
        _shutdown(fd)

    handles = [_watchdog.arm(timeouts.deadline, cut)]
    if writes and engine.dialect.name == "mysql" and not getattr(engine.dialect, "is_mariadb", False):
        thread_id = _raw(dbapi_connection).thread_id()
        handles.append(_watchdog.arm(timeouts.statement, lambda: _kill_query(engine, thread_id)))
    try:
        return call()
    except BaseException as exc:
        if fired:
            mark_cut(exc, fired[0])
        raise
    finally:
        for handle in handles:
            _watchdog.disarm(handle)


# SQLite waits for a lock in its busy handler, which sleeps inside the C library, where no signal handler can
# run: a second Ctrl-C would wait out the whole --lock-timeout. So the tool's own SQLite engines have a busy
# timeout of one step at most (connect.py), and the rest of the lock timeout is waited here, a step at a time,
# with Python's signal handlers running in between.
SQLITE_BUSY_STEP = 0.1


def _in_steps(dbapi_connection: Any, call: Callable[[], T], seconds: float) -> T:
    """A SQLite call, made again while it finds the database locked after waiting a whole step, until
    ``seconds`` have passed in all, or a second signal asks to hurry (the clean-up of a stop)."""
    deadline = time.monotonic() + seconds
    while True:
        started = time.monotonic()
        try:
            return call()
        except Exception as exc:
            now = time.monotonic()
            # "Locked" at once, without waiting, is SQLite saying that waiting cannot help (a deadlock).
            waited = now - started >= SQLITE_BUSY_STEP / 2
            if "database is locked" not in str(exc) or not waited or now >= deadline or signals.hurrying():
                raise
        if deadline - now < SQLITE_BUSY_STEP:  # the last step: exactly what is left of the lock timeout
            dbapi_connection.execute(f"PRAGMA busy_timeout = {seconds_ms(deadline - now)}")
            try:
                return call()
            finally:
                dbapi_connection.execute(f"PRAGMA busy_timeout = {seconds_ms(SQLITE_BUSY_STEP)}")


def _kill_query(engine: Engine, thread_id: int) -> None:
    """Oracle MySQL: end a write that outlived the statement timeout, as MariaDB's max_statement_time would."""
    with suppress(Exception), closing(engine.raw_connection()) as conn:
        cursor = conn.cursor()
        cursor.execute(f"KILL QUERY {int(thread_id)}")
        cursor.close()


def guard(engine: Engine) -> Engine:
    """Install the watchdog on ``engine`` (idempotent). Outside :func:`limits` it changes nothing."""
    dialect = engine.dialect
    if getattr(dialect, "_mgb_guarded", False):
        return engine
    dialect._mgb_guarded = True  # type: ignore[attr-defined]

    def execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        writes = not statement.lstrip()[:6].upper().startswith(("SELECT", "SHOW", "SET"))
        _guarded(engine, cursor.connection, writes, lambda: cursor.execute(statement, parameters))
        return True

    def execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
        _guarded(engine, cursor.connection, False, lambda: cursor.execute(statement))
        return True

    event.listen(engine, "do_execute", execute)
    event.listen(engine, "do_execute_no_params", execute_no_params)
    for name in ("do_commit", "do_rollback"):
        original = getattr(dialect, name)

        def wrapped(dbapi_connection: Any, _original: Callable[[Any], None] = original) -> None:
            _guarded(engine, dbapi_connection, False, lambda: _original(dbapi_connection))

        setattr(dialect, name, wrapped)
    if dialect.name == "sqlite":
        dialect.do_commit = _patient_commit(dialect.do_commit)  # type: ignore[method-assign]
    return engine


def _patient_commit(commit: Callable[[Any], None]) -> Callable[[Any], None]:
    """SQLite: a COMMIT that finds the database busy (a reader holding it, in rollback-journal mode) leaves
    the transaction open and whole, so the COMMIT itself is tried again, with the retry policy. This covers
    the commits the tool does not send itself, such as Alembic's when it enters ``autocommit_block()``."""

    def commit_when_free(dbapi_connection: Any) -> None:
        timeouts = _limits.get()
        if timeouts is None:
            commit(dbapi_connection)
            return
        Retrying(
            stop=stop_after_attempt(timeouts.retries + 1),
            wait=wait_exponential(multiplier=0.25, max=5) + wait_random(0, 0.05),
            retry=retry_if_exception(lambda exc: "database is locked" in str(exc)),
            reraise=True,
        )(commit, dbapi_connection)

    return commit_when_free


# lock_not_available, query_canceled (statement_timeout), deadlock, serialization failure, admin / crash
# shutdown, the database system is starting up, idle-session timeout, too many connections, read-only
# transaction (a failover in progress), idle-in-transaction timeout
_PG_TRANSIENT = {"55P03", "57014", "40P01", "40001", "57P01", "57P02", "57P03", "57P05", "53300", "25006", "25P03"}
# lock wait timeout, deadlock, MySQL / MariaDB statement timeouts and KILL QUERY (1317), connection killed,
# shutdown in progress, too many connections, cannot connect, server gone away, connection lost, and
# duplicate key: only a batch's plain tag insert can raise it, when someone added one of its rows after
# its ledger insert (see sql.py)
_MYSQL_TRANSIENT = {1205, 1213, 3024, 1969, 1317, 1927, 1053, 1040, 2003, 2006, 2013, 1062, 4031}
_TRANSIENT_TEXT = (
    "database is locked",
    "database table is locked",
    "timeout expired",
    "consuming input failed",
    "connection refused",
    "server closed the connection",
    "the database system is",
    "server login has been failing",  # PgBouncer, for a moment after its server restarted (no SQLSTATE)
)


def is_transient(exc: BaseException) -> bool:
    """Errors a smaller, later try may get past: lock and statement timeouts, deadlocks, lost connections."""
    if not isinstance(exc, DBAPIError) or STATEMENT_POOLING in str(exc.orig):
        return False  # a pooler that allows no transaction will not allow one on the next try either
    if exc.connection_invalidated or cut_by_watchdog(exc):
        return True
    errno = mysql_errno(exc)
    if errno is not None:  # MySQL family: the error number (its SQLSTATE is often HY000)
        return errno in _MYSQL_TRANSIENT
    state = sqlstate(exc)
    if state:
        return state in _PG_TRANSIENT or state.startswith("08")
    text = str(exc.orig).lower()
    return any(t in text for t in _TRANSIENT_TEXT)


def with_retries(
    timeouts: Timeouts,
    step: Callable[[], T],
    recover: Callable[[], None],
    explain: Callable[[BaseException, bool], BackfillError],
    before_retry: Callable[[], None] | None = None,
    what: str = "",
) -> T:
    """Run ``step``; after a transient error call ``recover`` (end the failed transaction) and
    ``before_retry`` (shrink the batch), back off exponentially with jitter and try again, at most
    ``timeouts.retries`` more times. Then give up with exit 7 (nothing is half-written), or, for ``what``
    (connecting or a set-up step before any write), with ``explain``'s code. ``explain(exc, connecting)``
    says what a failure means (connect.failure)."""

    def retry(_state: object) -> None:
        recover()
        if before_retry is not None:
            before_retry()

    def worth_another_try(exc: BaseException) -> bool:
        # Before anything is under way, a server that stopped answering is not waited for again and again
        # (each try would cost a whole deadline): that is exit 3 at once, as for `status`.
        return is_transient(exc) and not (what and cut_by_watchdog(exc))

    retrying = Retrying(
        stop=stop_after_attempt(timeouts.retries + 1),
        wait=wait_exponential(multiplier=0.25, max=5) + wait_random(0, 0.05),
        retry=retry_if_exception(worth_another_try),
        before_sleep=retry,
        reraise=True,
    )
    try:
        return retrying(step)
    except DBAPIError as exc:
        recover()
        if is_transient(exc):
            reason = explain(exc, bool(what))
            tries = retrying.statistics.get("attempt_number", 1) - 1
            if what:  # nothing was under way: the server could not be reached
                after = f" (after {tries} retries)" if tries else ""
                raise BackfillError(f"{reason}{after}", reason.code) from None
            raise BackfillError(f"gave up after {tries} retries ({reason})", ExitCode.STOPPED) from None
        raise


def seconds_ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 (a PostgreSQL timeout of 0 means none)."""
    return max(1, math.ceil(seconds * 1000))
