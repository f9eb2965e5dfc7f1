"""The single-runner lock: one `run`, `revert` or `alembic upgrade/downgrade` at a time per MLflow database.

* PostgreSQL and the MySQL family: a **lease**, the one row of the project's table ``gateway_backfill_lock``
  (in the MLflow tables' schema). It is taken atomically (``UPDATE ... WHERE owner IS NULL``), renewed every
  second by a heartbeat on a connection of its own, and proven inside every write transaction of the
  holder (:meth:`Lease.write`: the same row updated ``WHERE owner = <this runner>``, which also holds its row
  lock until the commit, so nobody can take the lease over while a batch is in flight). A lease that goes
  unrenewed for :data:`LEASE_SECONDS` belongs to a dead runner (SIGKILL, a lost node): the next runner takes
  it over. Nothing depends on a database session surviving, so the lock holds through PgBouncer in any
  pool mode, a server that ends idle sessions, and two builds of this tool (it is a row, not a key).
* SQLite: an exclusive ``flock`` on a file beside the database (``mlflow.db.gateway-backfill.lock``): the
  kernel drops it with the process, across processes and containers sharing the file.

The lock is taken before the tool writes anything but the lease itself (and, once, its table).
"""

from __future__ import annotations

import contextvars
import fcntl
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.schema import CreateTable

from backfill import sql
from backfill.connect import close, in_callers_transaction, reading, recover, transaction
from backfill.errors import BackfillError, ExitCode, mysql_errno, sqlstate
from backfill.retry import stopped_answering
from backfill.schema import Target, lease

LOCK_SUFFIX = ".gateway-backfill.lock"
LEASE_SECONDS = 5.0  # unrenewed for this long: the holder is dead, the lease may be taken over
HEARTBEAT_SECONDS = 1.0  # how often the holder renews it
POLL_SECONDS = 0.2  # how often a runner that finds the lease held looks at it again
ROW = "runner"

HELD = (
    "another mlflow-gateway-backfill run, revert or `alembic upgrade` is working on this database{by}; wait for "
    "it to finish (`status` shows the run)"
)


def sqlite_lock_path(conn: Connection) -> str:
    """The lock file of the SQLite database ``conn`` is on (beside the ``main`` database file)."""
    for _seq, name, path in conn.exec_driver_sql("PRAGMA database_list"):
        if name == "main" and path:
            return str(path) + LOCK_SUFFIX
    raise BackfillError("this SQLite database has no file (in memory): nothing to lock", ExitCode.NOT_MLFLOW)


class RunnerLock:
    """Held from :meth:`acquire` to :meth:`release` (also a context manager). Every write of the holder goes
    through :meth:`write`. ``writes``: whether taking it writes to the database (then the privilege checks
    come first); :meth:`release` is harmless when the lock was never taken."""

    writes = True

    def __init__(self, conn: Connection, target: Target) -> None:
        self.conn = conn
        self.target = target

    def __enter__(self) -> RunnerLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def acquire(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def write(self) -> AbstractContextManager[None]:
        """A write transaction of the holder on its connection."""
        return transaction(self.conn, self.target.sql.begin_write)


def runner_lock(conn: Connection, target: Target, connect: Callable[[], Connection]) -> RunnerLock:
    """The lock for ``target``: a lease on a server (``connect`` opens the heartbeat's connection), a file
    lock on SQLite."""
    if target.dialect == "sqlite":
        return FileLock(conn, target)
    return Lease(conn, target, connect)


class FileLock(RunnerLock):
    """SQLite: an exclusive flock on the lock file; SQLite's own write lock orders the writes."""

    writes = False  # the lock file is beside the database, not in it

    def __init__(self, conn: Connection, target: Target) -> None:
        super().__init__(conn, target)
        self.fd: int | None = None

    def acquire(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        path = sqlite_lock_path(self.conn)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BackfillError(
                f"cannot create the lock file {path!r} beside the database ({exc.strerror}): writing to this "
                "SQLite database needs write access to its directory",
                ExitCode.PERMISSION,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BackfillError(HELD.format(by=f" (it holds {path!r})"), ExitCode.LOCKED) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


class Lease(RunnerLock):
    """PostgreSQL and the MySQL family: the lease row (see the module docstring)."""

    def __init__(self, conn: Connection, target: Target, connect: Callable[[], Connection]) -> None:
        super().__init__(conn, target)
        self.connect = connect
        self.owner = secrets.token_hex(16)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"[:255]
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- statements

    def _table(self, conn: Connection) -> Connection:
        return self.target.tables(conn)

    def _look(self) -> tuple[str | None, str | None, int]:
        with reading(self.conn):
            row = (
                self._table(self.conn)
                .execute(sa.select(lease.c.owner, lease.c.holder, lease.c.renewals).where(lease.c.name == ROW))
                .first()
            )
        return (None, None, -1) if row is None else (row[0], row[1], int(row[2]))

    def _update(self, conn: Connection, where: sa.ColumnElement[bool], **values: object) -> bool:
        """One guarded update of the lease row, in the caller's transaction: True when it matched."""
        statement = lease.update().where(lease.c.name == ROW, where).values(renewals=lease.c.renewals + 1, **values)
        return self._table(conn).execute(statement).rowcount == 1

    def _take(self, where: sa.ColumnElement[bool]) -> bool:
        with transaction(self.conn, self.target.sql.begin_write):
            return self._update(self.conn, where, owner=self.owner, holder=self.holder, taken_at_ns=time.time_ns())

    # -- acquire

    def acquire(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        self._ensure_row()
        if not self._take(lease.c.owner.is_(None)):
            self._wait_for(should_stop)
        self.held = True
        if not in_callers_transaction(self.conn):  # there the row stays locked until the caller's commit
            self._start_heartbeat()

    def _ensure_row(self) -> None:
        """The lease table and its row, made by the first runner ever (serialized on PostgreSQL by a
        transaction-scoped advisory lock, which needs no session to survive). A table an admin created is
        only given its row (which needs INSERT, not CREATE)."""
        with reading(self.conn):
            exists = sa.inspect(self.conn).has_table(sql.LOCK_TABLE, schema=self.target.schema)
        if exists and self._look()[2] >= 0:
            return
        conn = self.conn
        try:
            if not exists and self.target.dialect == "mysql":  # DDL commits there at once: outside any transaction
                self._table(conn).execute(CreateTable(lease, if_not_exists=True))
            with transaction(conn, self.target.sql.begin_write):
                if self.target.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": self._key()})
                if not exists and self.target.dialect != "mysql":
                    self._table(conn).execute(CreateTable(lease, if_not_exists=True))
                if self._table(conn).execute(sa.select(lease.c.name).where(lease.c.name == ROW)).first() is None:
                    self._table(conn).execute(lease.insert().values(name=ROW, renewals=0))
        except DBAPIError as exc:
            if mysql_errno(exc) == 1062 or sqlstate(exc) == "23505":
                return  # another runner seeded the row at the same moment
            if not exists and (mysql_errno(exc) in (1142, 1044) or sqlstate(exc) == "42501"):
                raise BackfillError(
                    f"cannot create the project's lock table {sql.LOCK_TABLE} (permission denied): let an admin "
                    "create the project's tables once (`alembic upgrade head`, or one `run`), then grant the "
                    "writer's privileges on them (docs/privileges.md)",
                    ExitCode.PERMISSION,
                ) from None
            raise

    def _key(self) -> int:
        return sql.pg_lock_key(self.target.schema or "public")

    def _wait_for(self, should_stop: Callable[[], bool]) -> None:
        """The lease is held: a live holder renews it (exit 6 as soon as that is seen); one that has not
        renewed it for LEASE_SECONDS is dead, and its lease is taken over."""
        owner, holder, renewals = self._look()
        since = time.monotonic()
        while True:
            if should_stop():
                raise BackfillError("stopped while waiting for the lock; nothing was written", ExitCode.STOPPED)
            time.sleep(POLL_SECONDS)
            now_owner, now_holder, now_renewals = self._look()
            if now_owner is None:
                if self._take(lease.c.owner.is_(None)):
                    return
            elif (now_owner, now_renewals) != (owner, renewals):
                raise BackfillError(HELD.format(by=f" (held by {now_holder})"), ExitCode.LOCKED)
            elif time.monotonic() - since >= LEASE_SECONDS:
                if self._take((lease.c.owner == owner) & (lease.c.renewals == renewals)):
                    return
                raise BackfillError(HELD.format(by=f" (held by {holder})"), ExitCode.LOCKED)
            owner, holder, renewals = now_owner, now_holder, now_renewals

    # -- holding

    @contextmanager
    def write(self) -> Iterator[None]:
        """A write transaction that proves, in itself, that this runner still holds the lease."""
        with transaction(self.conn, self.target.sql.begin_write):
            if not self._update(self.conn, lease.c.owner == self.owner):
                self.lost = True
                raise BackfillError(
                    "this runner lost the lock: its lease went unrenewed for "
                    f"{LEASE_SECONDS:g} s (the database was out of reach) and another runner took it over; "
                    "nothing of this step was written",
                    ExitCode.LOCKED,
                )
            yield

    def _start_heartbeat(self) -> None:
        context = contextvars.copy_context()  # the watchdog's limits of this thread
        self._heartbeat = threading.Thread(
            target=context.run, args=(self._beat,), name="mgb-lease-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def _beat(self) -> None:
        conn: Connection | None = None
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                conn = conn if conn is not None and not conn.closed and not conn.invalidated else self.connect()
                with transaction(conn, self.target.sql.begin_write):
                    renewed = self._update(conn, lease.c.owner == self.owner)
                if not renewed:
                    self.lost = True
                    return
            except (SQLAlchemyError, BackfillError):
                if conn is not None:  # out of reach for now: the next beat tries on a new connection
                    close(conn)
                    conn = None
        if conn is not None:
            close(conn)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=30)
            self._heartbeat = None
        if not self.held or self.lost:
            return
        self.held = False
        if self.conn.closed or stopped_answering(self.conn.engine):
            return  # the lease expires on its own after LEASE_SECONDS
        with suppress(Exception):  # a lost session or a dropped table: the lease is gone or expires
            recover(self.conn)
            with transaction(self.conn, self.target.sql.begin_write):
                self._update(self.conn, lease.c.owner == self.owner, owner=None, holder=None)
