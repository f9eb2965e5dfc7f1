"""The batching loop, in one place: a keyset cursor and a small per-batch step (after Shopify's job-iteration).

A run walks the ``(key, experiment_id)`` primary key of ``experiment_tags`` from the first experiment that
needs the tag, ``batch_size`` sourceType rows at a time. Each batch is one short transaction that inserts
the missing isGateway rows of its id range, records them in the ledger and moves the run's cursor, so a run
killed at any point leaves no partial batch and the next run resumes at the cursor. When the walk reaches
the end, one read-only query looks for anything still missing (rows that appeared below the cursor
meanwhile) and, if it finds some, walks again from there.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from backfill import sql
from backfill.db import (
    BackfillError,
    ExitCode,
    Timeouts,
    connect,
    describe,
    has_project_tables,
    pg_transaction_settings,
    require_mlflow,
)
from backfill.schema import ledger, metadata, runs

T = TypeVar("T")

# The first batch's size; later ones adapt to the time target. Small, so that the first batch on a busy database
# is short (about 0.04 s on PostgreSQL in `make bench`); the controller reaches the throughput plateau
# (5,000 to 20,000 rows, see the README's sweep) within a few batches.
DEFAULT_BATCH_SIZE = 2000


@dataclass(frozen=True)
class Settings:
    """How a run paces itself. Every field has a CLI option of the same name."""

    batch_size: int = DEFAULT_BATCH_SIZE
    min_batch_size: int = 50
    max_batch_size: int = 20_000
    target_batch_seconds: float = 0.2
    sleep: float = 0.0
    max_rows_per_second: float | None = None
    retries: int = 5
    max_passes: int = 3
    adaptive: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass
class Status:
    """What `status` reports. ``conflicts``: isGateway rows whose value is not exactly ``true``."""

    gateway: int
    deleted: int
    tagged: int
    missing: int
    conflicts: int
    inserted_by_backfill: int
    last_run: dict[str, Any] | None


@dataclass
class Report:
    """What `run` reports (and prints with --json)."""

    run_id: int | None
    state: str
    dry_run: bool
    resumed: bool
    inserted: int
    would_insert: int | None
    batches: int
    passes: int
    seconds: float
    batch_seconds: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        times = data.pop("batch_seconds")
        data["batch_seconds_p50"] = round(statistics.median(times), 4) if times else None
        data["batch_seconds_p99"] = round(_percentile(times, 0.99), 4) if times else None
        data["batch_seconds_max"] = round(max(times), 4) if times else None
        data["seconds"] = round(self.seconds, 3)
        return data


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, scanned: int, inserted: int) -> None: ...
    def close(self) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None: ...
    def advance(self, scanned: int, inserted: int) -> None: ...
    def close(self) -> None: ...


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _now_ns() -> int:
    return time.time_ns()


def _binds(**extra: Any) -> dict[str, Any]:
    return {**sql.CONSTANTS, **extra}


# lock_not_available, query_canceled (statement_timeout), deadlock, serialization failure, admin / crash
# shutdown, the database system is starting up, too many connections
_PG_TRANSIENT = {"55P03", "57014", "40P01", "40001", "57P01", "57P02", "57P03", "53300"}
# lock wait timeout, deadlock, MySQL / MariaDB statement timeouts, connection killed, shutdown in progress,
# too many connections, cannot connect, server gone away, connection lost, and duplicate key: only a batch's
# plain tag insert can raise it, when someone added one of its rows after its ledger insert (sql._batch)
_MYSQL_TRANSIENT = {1205, 1213, 3024, 1969, 1927, 1053, 1040, 2003, 2006, 2013, 1062}
_TRANSIENT_TEXT = (
    "database is locked",
    "database table is locked",
    "server closed the connection",
    "connection refused",
    "could not connect",
    "timeout expired",
    "connection timeout",
    "consuming input failed",
    "the database system is",
)


def is_transient(exc: BaseException) -> bool:
    """Errors a smaller, later batch may get past: lock and statement timeouts, deadlocks, lost connections."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # MySQL family: the error number (its SQLSTATE is often HY000)
        return args[0] in _MYSQL_TRANSIENT
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate in _PG_TRANSIENT or sqlstate.startswith("08")
    text = str(orig).lower()
    return any(t in text for t in _TRANSIENT_TEXT)


class _Watchdog:
    """A client-side deadline for one batch.

    A frozen server (``docker pause``, a hung host) cannot enforce its own statement timeout, and its
    kernel keeps acknowledging TCP, so a client would wait forever. Past the deadline the connection's
    socket is shut down: the blocked call fails at once, the server rolls the transaction back whole,
    and the batch is retried like any lost connection.
    """

    def __init__(self, conn: Connection, seconds: float) -> None:
        self.fd = _socket_fd(conn)
        self.timer = threading.Timer(seconds, self._fire) if self.fd is not None else None

    def _fire(self) -> None:
        try:
            with socket.socket(fileno=os.dup(self.fd)) as sock:  # type: ignore[arg-type]
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self) -> None:
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()

    def __exit__(self, *_: object) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _socket_fd(conn: Connection) -> int | None:
    """The DBAPI connection's socket (psycopg, PyMySQL); None for SQLite or when there is none yet."""
    try:
        raw = conn.connection.dbapi_connection
    except Exception:  # noqa: BLE001 - an invalidated connection has no socket to watch
        return None
    if hasattr(raw, "pgconn"):
        return int(raw.fileno())
    sock = getattr(raw, "_sock", None)
    return sock.fileno() if sock is not None else None


def with_retries(
    job: Backfill, conn: Connection, step: Callable[[], T], before_retry: Callable[[], None] | None = None
) -> T:
    """Run ``step`` under the client-side deadline; on a transient error roll back, call ``before_retry``
    (shrink the batch), back off exponentially with jitter and try again, ``retries`` times at most."""

    def attempt() -> T:
        with _Watchdog(conn, job.settings.timeouts.deadline):
            return step()

    def retry(_state: object) -> None:
        if conn.invalidated or conn.in_transaction():
            conn.rollback()
        if before_retry is not None:
            before_retry()

    retrying = Retrying(
        stop=stop_after_attempt(job.settings.retries + 1),
        wait=wait_exponential(multiplier=0.25, max=5) + wait_random(0, 0.05),
        retry=retry_if_exception(is_transient),
        before_sleep=retry,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except DBAPIError as exc:
        if is_transient(exc):
            reason = describe(exc, job.engine.url)
            raise BackfillError(f"gave up after {job.settings.retries} retries ({reason})", ExitCode.STOPPED) from None
        raise


@contextmanager
def _write_transaction(conn: Connection) -> Iterator[None]:
    """A transaction that takes SQLite's write lock at BEGIN (elsewhere a plain transaction).

    SQLAlchemy 2 changes a Connection's execution options in place, so the option is reset afterwards:
    reads keep using plain (deferred) transactions and never hold the write lock.
    """
    conn.execution_options(sqlite_begin="IMMEDIATE")
    try:
        with conn.begin():
            yield
    finally:
        conn.execution_options(sqlite_begin="DEFERRED")


class Backfill:
    """One database, one set of settings: `run`, `status`, `revert`."""

    def __init__(self, engine: Engine, settings: Settings = Settings()) -> None:
        self.engine = engine
        self.settings = settings
        self.dialect = engine.dialect.name
        self.sql = sql.for_dialect(self.dialect)

    # ---------------------------------------------------------------- read-only

    def status(self) -> Status:
        with self._open() as conn:
            return self._status(conn)

    def _status(self, conn: Connection) -> Status:
        row = conn.execute(sa.text(self.sql.status), _binds()).one()
        gateway, deleted, tagged, missing = (int(v or 0) for v in row)
        inserted = 0
        last_run = None
        if has_project_tables(conn):
            inserted = conn.execute(sa.select(sa.func.count()).select_from(ledger)).scalar_one()
            last = conn.execute(sa.select(runs).order_by(runs.c.id.desc()).limit(1)).mappings().first()
            last_run = dict(last) if last else None
        conn.rollback()
        return Status(gateway, deleted, tagged, missing, gateway - tagged - missing, inserted, last_run)

    # ---------------------------------------------------------------- run

    def run(
        self,
        dry_run: bool = False,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Report:
        """Insert every missing isGateway row. Raises BackfillError(STOPPED) when it stops early."""
        started = time.monotonic()
        if dry_run:
            status = self.status()
            return Report(None, "dry-run", True, False, 0, status.missing, 0, 0, time.monotonic() - started)
        with self._open() as conn:
            with_retries(self, conn, lambda: self._probe(conn))
            with_retries(self, conn, lambda: self._ensure_tables(conn))
            with _RunnerLock(self, conn) as lock:
                return _Walk(self, conn, lock, progress or _NoProgress(), should_stop, started).run()

    # ---------------------------------------------------------------- revert

    def revert(self) -> int:
        """Remove exactly the rows the ledger says this project inserted; returns how many."""
        with self._open() as conn:
            if not has_project_tables(conn):
                conn.rollback()
                return 0
            conn.rollback()
            removed, lo = 0, -1
            with _RunnerLock(self, conn) as lock:
                with_retries(self, conn, lambda: _claim_run(self, conn, "reverting"))
                while step := with_retries(self, conn, lambda lo=lo: self._revert_batch(conn, lock, lo)):
                    lo, deleted = step
                    removed += deleted
                # Nothing to resume any more; this revert's own row ends as `reverted` too.
                with conn.begin():
                    conn.execute(runs.update().values(state="reverted", updated_at_ns=_now_ns()))
            return removed

    def _revert_batch(self, conn: Connection, lock: _RunnerLock, lo: int) -> tuple[int, int] | None:
        """Delete the ledger's rows in the next keyset range; returns (upper end, tags deleted) or None."""
        lock.ensure()
        with _write_transaction(conn):
            self._per_transaction(conn)
            hi = conn.execute(sa.text(self.sql.revert_bound), {"lo": lo, "n": self.settings.batch_size}).scalar()
            if hi is None:
                return None
            tags, ledger_rows = self.sql.revert
            deleted = conn.execute(sa.text(tags), _binds(lo=lo, hi=hi)).rowcount
            conn.execute(sa.text(ledger_rows), _binds(lo=lo, hi=hi))
        return int(hi), deleted

    # ---------------------------------------------------------------- plumbing

    def _open(self) -> _Session:
        return _Session(self.engine)

    def _probe(self, conn: Connection) -> None:
        """Fail before anything is written when the user may not write the rows (rolled back, matches nothing)."""
        with conn.begin() as transaction:
            self._per_transaction(conn)
            for statement in self.sql.probe:
                conn.execute(sa.text(statement))
            transaction.rollback()

    def _ensure_tables(self, conn: Connection) -> None:
        exists = has_project_tables(conn)
        conn.rollback()
        if not exists:
            with conn.begin():
                self._per_transaction(conn)
                metadata.create_all(conn, checkfirst=True)

    def _per_transaction(self, conn: Connection) -> None:
        if self.sql.per_transaction:
            conn.execute(sa.text(self.sql.per_transaction), pg_transaction_settings(self.settings.timeouts))


class _Session:
    """A connection to an MLflow database, with errors turned into one line and the schema checked."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.conn: Connection | None = None

    def __enter__(self) -> Connection:
        self.conn = connect(self.engine)
        try:
            require_mlflow(self.conn)
            self.conn.rollback()
        except BaseException as exc:
            self.conn.close()
            if isinstance(exc, sa.exc.SQLAlchemyError):
                raise describe(exc, self.engine.url) from None
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        assert self.conn is not None
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - the connection may already be gone; the real error follows
            pass
        if exc is not None and not isinstance(exc, BackfillError) and isinstance(exc, sa.exc.SQLAlchemyError):
            raise describe(exc, self.engine.url) from None


class _RunnerLock:
    """One runner per database: a session lock on PostgreSQL / MySQL, a lease in the runs table on SQLite.

    Session locks vanish with the session, so a dead runner never blocks the next one. On SQLite the lease
    is the ``running`` row's pid and host: a row whose process is gone is taken over.
    """

    def __init__(self, job: Backfill, conn: Connection) -> None:
        self.job = job
        self.conn = conn
        self.session: object | None = None  # the DBAPI connection that holds the lock

    def __enter__(self) -> _RunnerLock:
        self.acquire()
        return self

    def ensure(self) -> None:
        """Take the lock again if the connection was replaced (a lost session took its lock with it)."""
        if self.job.sql.lock is not None and self.conn.connection.dbapi_connection is not self.session:
            self.acquire()

    def acquire(self) -> None:
        statement = self.job.sql.lock
        if statement is None:
            return  # SQLite: the lease is checked when the run row is claimed (see _claim_run)
        got = self.conn.execute(sa.text(statement)).scalar()
        self.conn.commit()
        self.session = self.conn.connection.dbapi_connection
        if not got:
            raise BackfillError(
                "another mlflow-gateway-backfill run or revert is in progress on this database; "
                "wait for it to finish (see `status`)",
                ExitCode.LOCKED,
            )

    def __exit__(self, *_: object) -> None:
        if self.job.sql.unlock is None or self.conn.invalidated:
            return
        try:
            self.conn.rollback()
            self.conn.execute(sa.text(self.job.sql.unlock))
            self.conn.commit()
        except Exception:  # noqa: BLE001 - a lost session has released its lock already
            pass


class _Walk:
    """The state of one run while it walks the keyset."""

    def __init__(
        self,
        job: Backfill,
        conn: Connection,
        lock: _RunnerLock,
        progress: Progress,
        should_stop: Callable[[], bool],
        started: float,
    ) -> None:
        self.job = job
        self.lock = lock
        self.s = job.settings
        self.sql = job.sql
        self.conn = conn
        self.progress = progress
        self.should_stop = should_stop
        self.started = started
        self.size = self.s.batch_size
        self.batch_seconds: list[float] = []

    def run(self) -> Report:
        conn = self.conn
        run_id, cursor, resumed = with_retries(self.job, conn, lambda: _claim_run(self.job, conn, "running"))
        self.run_id = run_id
        row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().one()
        inserted, batches, passes = row["inserted"], row["batches"], row["passes"]
        conn.rollback()
        new_inserted = sweeps = 0  # sweeps: passes started by this invocation
        try:
            if cursor is None:
                cursor = self._next_pass_start()
                passes += cursor is not None
            if cursor is not None:
                self.progress.start(self._remaining(cursor))
            while cursor is not None:
                if self.should_stop():
                    raise BackfillError("stopped on request", ExitCode.STOPPED)
                t0 = time.monotonic()
                step = with_retries(self.job, conn, lambda c=cursor: self._step(c), self._shrink)
                if step is None:  # end of this pass: anything left, or appeared below the cursor?
                    cursor = self._next_pass_start()
                    if cursor is None:
                        break
                    passes += 1
                    sweeps += 1
                    if sweeps >= self.s.max_passes:
                        raise BackfillError(
                            f"gateway experiments are still appearing without isGateway after {self.s.max_passes} "
                            "passes (a writer older than MLflow 3.10.1 is probably still running)",
                            ExitCode.STOPPED,
                        )
                    self.progress.start(self._remaining(cursor))
                    continue
                hi, scanned, added, elapsed = step
                cursor = hi
                inserted += added
                new_inserted += added
                batches += 1
                self.batch_seconds.append(elapsed)
                self.progress.advance(scanned, added)
                self._adapt(elapsed, scanned)
                self._throttle(time.monotonic() - t0, scanned)
            self._finish("done", None)
        except BaseException as exc:  # noqa: BLE001 - record the stop (even on Ctrl-C), then re-raise
            error = describe(exc, self.job.engine.url) if isinstance(exc, sa.exc.SQLAlchemyError) else exc
            message = str(error)[:500] if isinstance(error, Exception) else "killed"
            self._finish("stopped", message)
            if isinstance(error, BackfillError) and error.code in (ExitCode.STOPPED, ExitCode.LOCKED):
                raise BackfillError(
                    f"{error}; nothing is half-written: {new_inserted} rows inserted this time, "
                    f"`run` again to resume from experiment id {cursor} (run {run_id})",
                    error.code,
                ) from None
            raise error from None
        finally:
            self.progress.close()
        return Report(
            run_id,
            "done",
            False,
            resumed,
            new_inserted,
            None,
            batches,
            passes,
            time.monotonic() - self.started,
            self.batch_seconds,
        )

    # -- the run row

    def _finish(self, state: str, message: str | None) -> None:
        try:
            if self.conn.invalidated or self.conn.in_transaction():
                self.conn.rollback()
            with _Watchdog(self.conn, self.s.timeouts.deadline), _write_transaction(self.conn):
                values: dict[str, Any] = {"state": state, "updated_at_ns": _now_ns(), "message": message}
                if state == "done":
                    values["last_id"] = None
                self.conn.execute(runs.update().where(runs.c.id == self.run_id).values(**values))
        except Exception:  # noqa: BLE001 - the database may be gone; the run row then still says `running`,
            pass  # which the next run treats as resumable all the same.

    # -- queries

    def _next_pass_start(self) -> int | None:
        """The cursor just below the first experiment that still needs the tag, or None."""
        return with_retries(self.job, self.conn, self._first_missing)

    def _first_missing(self) -> int | None:
        conn = self.conn
        with conn.begin():
            self.job._per_transaction(conn)
            first = conn.execute(sa.text(self.sql.first_missing), _binds()).scalar()
        if first is None:
            return None
        cursor = int(first) - 1
        with _write_transaction(conn):
            self.job._per_transaction(conn)
            conn.execute(
                runs.update()
                .where(runs.c.id == self.run_id)
                .values(last_id=cursor, passes=runs.c.passes + 1, updated_at_ns=_now_ns())
            )
        return cursor

    def _remaining(self, cursor: int) -> int:
        def count() -> int:
            with self.conn.begin():
                self.job._per_transaction(self.conn)
                return int(self.conn.execute(sa.text(self.sql.count_from), _binds(lo=cursor)).scalar_one())

        return with_retries(self.job, self.conn, count)

    # -- one batch

    def _shrink(self) -> None:
        self.size = max(self.s.min_batch_size, self.size // 2)

    def _step(self, cursor: int) -> tuple[int, int, int, float] | None:
        conn = self.conn
        self.lock.ensure()
        t0 = time.monotonic()
        with _write_transaction(conn):
            self.job._per_transaction(conn)
            hi, scanned = conn.execute(sa.text(self.sql.next_bound), _binds(lo=cursor, n=self.size)).one()
            if hi is None:
                return None
            hi = int(hi)
            binds = _binds(lo=cursor, hi=hi, run=self.run_id, now=_now_ns())
            added = 0
            for statement in self.sql.batch:
                added = conn.execute(sa.text(statement), binds).rowcount
            conn.execute(
                runs.update()
                .where(runs.c.id == self.run_id)
                .values(
                    last_id=hi, batches=runs.c.batches + 1, inserted=runs.c.inserted + added, updated_at_ns=_now_ns()
                )
            )
        return hi, int(scanned), max(added, 0), time.monotonic() - t0

    # -- pacing

    def _adapt(self, elapsed: float, scanned: int) -> None:
        """Aim at the target time per batch: grow by at most 1.5x a step, shrink as far as needed."""
        if not self.s.adaptive or elapsed <= 0:
            return
        ideal = self.size * self.s.target_batch_seconds / elapsed
        grown = math.ceil(min(ideal, self.size * 1.5))
        self.size = int(min(self.s.max_batch_size, max(self.s.min_batch_size, grown)))

    def _throttle(self, elapsed: float, scanned: int) -> None:
        pause = self.s.sleep
        if self.s.max_rows_per_second:
            pause = max(pause, scanned / self.s.max_rows_per_second - elapsed)
        if pause > 0:
            time.sleep(pause)


def _claim_run(job: Backfill, conn: Connection, state: str) -> tuple[int, int | None, bool]:
    """Record a `running` run (resuming the latest unfinished one) or a `reverting` one.

    Returns (run id, cursor, resumed). On SQLite this is also the single-runner lease: a live
    `running` or `reverting` row of another process refuses the claim.
    """
    host, pid, now = socket.gethostname(), os.getpid(), _now_ns()
    with _write_transaction(conn):
        job._per_transaction(conn)
        if job.sql.lock is None:
            busy = conn.execute(
                sa.select(runs).where(runs.c.state.in_(("running", "reverting"))).order_by(runs.c.id.desc())
            ).mappings()
            for row in busy:
                if _alive(row):
                    raise BackfillError(
                        f"run {row['id']} (pid {row['pid']} on {row['host']}) is {row['state']} on this database",
                        ExitCode.LOCKED,
                    )
        last = None
        if state == "running":
            last = (
                conn.execute(
                    sa.select(runs).where(runs.c.state.in_(("running", "stopped"))).order_by(runs.c.id.desc()).limit(1)
                )
                .mappings()
                .first()
            )
        if last is not None:
            conn.execute(
                runs.update()
                .where(runs.c.id == last["id"])
                .values(state="running", host=host, pid=pid, updated_at_ns=now, message=None)
            )
            return int(last["id"]), last["last_id"], True
        result = conn.execute(
            runs.insert().values(
                state=state,
                started_at_ns=now,
                updated_at_ns=now,
                last_id=None,
                passes=0,
                batches=0,
                inserted=0,
                host=host,
                pid=pid,
            )
        )
        return int(result.inserted_primary_key[0]), None, False


def _alive(run: Any) -> bool:
    """Whether the process recorded on a `running` row may still be running it."""
    if run["host"] != socket.gethostname():
        # Another machine: trust the heartbeat for ten minutes.
        return time.time_ns() - int(run["updated_at_ns"]) < 600 * 10**9
    try:
        os.kill(int(run["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(run["pid"]) != os.getpid()
