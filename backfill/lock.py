"""The single-runner lock: one `run`, `revert` or `alembic upgrade/downgrade` at a time per MLflow database.

* PostgreSQL: a session advisory lock keyed by the MLflow schema (``pg_try_advisory_lock``).
* MySQL family: ``GET_LOCK`` on a name derived from the database (64 characters at most, as MySQL requires).
* SQLite: an exclusive ``flock`` on a file beside the database (``mlflow.db.gateway-backfill.lock``), which
  works wherever SQLite's own locking works: across processes and containers sharing the file.

The server or the kernel drops each of these with the session or process that held it, so a dead
runner never blocks the next one, and a live one (however long its batches or sleeps) is never taken
over. The lock is taken before anything is written, the project's tables included.
"""

from __future__ import annotations

import fcntl
import os

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill import sql
from backfill.errors import BackfillError, ExitCode
from backfill.retry import stopped_answering
from backfill.schema import Target

LOCK_SUFFIX = ".gateway-backfill.lock"


def sqlite_lock_path(conn: Connection) -> str:
    """The lock file of the SQLite database ``conn`` is on (beside the ``main`` database file)."""
    for _seq, name, path in conn.exec_driver_sql("PRAGMA database_list"):
        if name == "main" and path:
            return str(path) + LOCK_SUFFIX
    raise BackfillError("this SQLite database has no file (in memory): nothing to lock", ExitCode.NOT_MLFLOW)


class RunnerLock:
    """Held from :meth:`acquire` to :meth:`release`; also a context manager."""

    def __init__(self, conn: Connection, target: Target) -> None:
        self.conn = conn
        self.target = target
        self.session: object | None = None  # the DBAPI connection that holds a server lock
        self.fd: int | None = None  # SQLite: the open lock file

    def __enter__(self) -> RunnerLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def _statements(self) -> tuple[str, str, dict[str, object]]:
        if self.target.dialect == "postgresql":
            key = sql.pg_lock_key(self.target.schema or "public")
            return "SELECT pg_try_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", {"k": key}
        name = sql.mysql_lock_name(self.target.database or "")
        return "SELECT GET_LOCK(:k, 0)", "SELECT RELEASE_LOCK(:k)", {"k": name}

    def acquire(self) -> None:
        if self.target.dialect == "sqlite":
            self._flock()
            return
        take, _, binds = self._statements()
        got = self.conn.execute(sa.text(take), binds).scalar()
        self.session = self.conn.connection.dbapi_connection
        if not got:
            raise BackfillError(
                "another mlflow-gateway-backfill run, revert or `alembic upgrade` is working on this database; "
                "wait for it to finish (`status` shows the run)",
                ExitCode.LOCKED,
            )

    def _flock(self) -> None:
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
            raise BackfillError(
                f"another mlflow-gateway-backfill run, revert or `alembic upgrade` is working on this database "
                f"(it holds {path!r}); wait for it to finish",
                ExitCode.LOCKED,
            ) from None
        self.fd = fd

    def ensure(self) -> None:
        """Take the lock again if the connection was replaced (a lost session took its lock with it)."""
        if self.target.dialect != "sqlite" and self.conn.connection.dbapi_connection is not self.session:
            self.acquire()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
            return
        if self.session is None or self.conn.invalidated or self.conn.closed or stopped_answering(self.conn.engine):
            return
        _, give, binds = self._statements()
        try:
            self.conn.execute(sa.text(give), binds)
        except Exception:  # noqa: BLE001 - a lost session has released its lock already
            pass
        self.session = None
