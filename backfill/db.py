"""Which database, how to connect to it, and how its failures read to a person.

The same resolution is used by the CLI, Alembic's ``env.py`` and the Makefile (which calls either):
``--database-url``, else ``DATABASE_URL``, else ``MLFLOW_TRACKING_URI`` when it is a database URI, else
``sqlite:///mlflow.db`` (MLflow's own default store).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import IntEnum

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from backfill.sql import SUPPORTED

DEFAULT_URL = "sqlite:///mlflow.db"
DB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql")


class ExitCode(IntEnum):
    """Exit codes of every command (also listed in the README)."""

    OK = 0
    MISSING = 1  # verify: gateway experiments still lack isGateway
    USAGE = 2  # bad option or malformed / unsupported database URL
    CONNECT = 3  # cannot reach or log in to the database
    NOT_MLFLOW = 4  # no MLflow experiments / experiment_tags tables
    PERMISSION = 5  # the database user lacks a privilege the command needs
    LOCKED = 6  # another run holds the single-runner lock
    STOPPED = 7  # interrupted or gave up after retries; nothing half-written, `run` resumes


class BackfillError(Exception):
    """An error with a one-line message for people and the exit code to leave with."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Timeouts:
    """Per-dialect lock and statement limits, in seconds (see README: running beside a live server)."""

    lock: float = 1.0
    statement: float = 30.0
    connect: float = 10.0

    @property
    def deadline(self) -> float:
        """The client-side limit on one batch transaction (see job._Watchdog)."""
        return self.statement + self.lock + 5


def resolve_url(explicit: str | None = None) -> str:
    """The database URL by the project's precedence rules (see module docstring)."""
    if explicit:
        return explicit
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking.split(":", 1)[0].split("+", 1)[0].lower() in DB_SCHEMES:
        return tracking
    return DEFAULT_URL


def parse_url(raw: str) -> URL:
    """Parse and normalise a URL the way users give it to MLflow; never echoes a password."""
    try:
        url = sa.engine.make_url(raw)
    except (ArgumentError, ValueError):
        raise BackfillError(
            f"malformed database URL {_redact(raw)!r}: expected e.g. postgresql://user@host/db",
            ExitCode.USAGE,
        ) from None
    backend = {"postgres": "postgresql", "mariadb": "mysql"}.get(url.get_backend_name(), url.get_backend_name())
    if backend not in SUPPORTED:
        raise BackfillError(
            f"unsupported database {url.get_backend_name()!r}: use sqlite, postgresql or mysql",
            ExitCode.USAGE,
        )
    # Whatever driver the URI names (plain postgresql:// means psycopg2, mysql:// mysqlclient), the
    # project's own drivers are used: its retries, timeouts and frozen-server watchdog rely on psycopg 3's
    # and PyMySQL's error codes and sockets, and they are what the tests prove.
    driver = {"postgresql": "psycopg", "mysql": "pymysql"}.get(backend)
    return url.set(drivername=f"{backend}+{driver}" if driver else backend)


def display(url: URL) -> str:
    """The URL as it may be printed: password hidden."""
    return url.render_as_string(hide_password=True)


def _redact(raw: str) -> str:
    """Hide anything between ``user:`` and ``@`` in a string that could not be parsed as a URL."""
    head, sep, tail = raw.partition("://")
    if sep and "@" in tail:
        creds, _, rest = tail.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{head}://{user}:***@{rest}" if ":" in creds else raw
    return raw


def create_engine(url: URL, timeouts: Timeouts = Timeouts()) -> Engine:
    """An engine with the dialect's session settings (timeouts, isolation) applied on every connect."""
    backend = url.get_backend_name()
    kwargs: dict = {"pool_pre_ping": False}
    connect_args: dict = {}
    if backend == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:") and not os.path.exists(database):
            # sqlite3 would silently create an empty file: refuse instead, nothing written.
            raise BackfillError(f"no SQLite database at {database!r} (not an MLflow database)", ExitCode.NOT_MLFLOW)
        connect_args["timeout"] = timeouts.lock  # the busy timeout, in seconds
    elif backend == "postgresql":
        connect_args["connect_timeout"] = max(1, math.ceil(timeouts.connect))
    elif backend == "mysql":
        connect_args["connect_timeout"] = max(1, math.ceil(timeouts.connect))
        # A client-side limit too: a frozen server cannot enforce its own statement timeout.
        connect_args["read_timeout"] = max(1, math.ceil(timeouts.deadline))
        # READ COMMITTED: INSERT ... SELECT then takes no gap locks that would block MLflow's own inserts.
        kwargs["isolation_level"] = "READ COMMITTED"
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
    if backend == "sqlite":
        _sqlite_transactions(engine)
    elif backend == "mysql":
        _mysql_session(engine, timeouts)
    else:
        _postgresql_session(engine, timeouts)
    return engine


def _sqlite_transactions(engine: Engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, emit BEGIN, so a batch can ask for BEGIN IMMEDIATE.

    Batches run with ``conn.execution_options(sqlite_begin="IMMEDIATE")``: the write lock is taken at the
    start of the transaction, so the batch never fails half-way on a lock upgrade.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") != "AUTOCOMMIT":
            conn.exec_driver_sql(f"BEGIN {options.get('sqlite_begin', 'DEFERRED')}")


def _postgresql_session(engine: Engine, timeouts: Timeouts) -> None:
    """Session defaults for every statement; batches also set them locally per transaction."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        settings = pg_transaction_settings(timeouts)
        with dbapi_connection.cursor() as cur:
            cur.execute(f"SET lock_timeout = '{settings['lock_timeout']}'")
            cur.execute(f"SET statement_timeout = '{settings['statement_timeout']}'")
        dbapi_connection.commit()


def _mysql_session(engine: Engine, timeouts: Timeouts) -> None:
    """Lock-wait and statement limits on every new MySQL-family session (MariaDB's names differ)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cur = dbapi_connection.cursor()
        cur.execute("SELECT VERSION()")
        is_mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
        cur.execute(f"SET SESSION innodb_lock_wait_timeout = {max(1, math.ceil(timeouts.lock))}")
        cur.execute(f"SET SESSION lock_wait_timeout = {max(1, math.ceil(timeouts.lock))}")
        if is_mariadb:
            cur.execute(f"SET SESSION max_statement_time = {timeouts.statement:.3f}")
        else:  # MySQL limits SELECTs only
            cur.execute(f"SET SESSION max_execution_time = {int(timeouts.statement * 1000)}")
        cur.close()


def pg_transaction_settings(timeouts: Timeouts) -> dict[str, str]:
    """Bind values for the per-transaction ``set_config`` of PostgreSQL."""
    return {
        "lock_timeout": f"{int(timeouts.lock * 1000)}ms",
        "statement_timeout": f"{int(timeouts.statement * 1000)}ms",
    }


def connect(engine: Engine) -> Connection:
    """Open a connection, turning driver errors into one clear line."""
    try:
        return engine.connect()
    except SQLAlchemyError as exc:
        raise describe(exc, engine.url, connecting=True) from None


def require_mlflow(conn: Connection) -> None:
    """Refuse a database without MLflow's experiments and experiment_tags tables."""
    inspector = sa.inspect(conn)
    missing = [t for t in ("experiments", "experiment_tags") if not inspector.has_table(t)]
    if missing:
        raise BackfillError(
            f"{display(conn.engine.url)} is not an MLflow tracking database (no table {', '.join(missing)})",
            ExitCode.NOT_MLFLOW,
        )


def has_project_tables(conn: Connection) -> bool:
    from backfill.schema import ledger, runs

    inspector = sa.inspect(conn)
    return inspector.has_table(runs.name) and inspector.has_table(ledger.name)


_PERMISSION = (
    "permission denied",
    "command denied",
    "access denied for user",
    "readonly database",
    "read-only",
    "insufficient privilege",
)
_CONNECT = (
    "could not connect",
    "connection refused",
    "can't connect",
    "lost connection",
    "server closed the connection",
    "connection timed out",
    "timeout expired",
)


def describe(exc: BaseException, url: URL, connecting: bool = False) -> BackfillError:
    """One line for a database error, with the password never shown."""
    if isinstance(exc, BackfillError):
        return exc
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    password = url.password
    if password:
        text = text.replace(str(password), "***")
    lowered = text.lower()
    where = display(url)
    if "file is not a database" in lowered:
        return BackfillError(f"{where} is not an MLflow tracking database: {text[:300]}", ExitCode.NOT_MLFLOW)
    if connecting:
        return BackfillError(f"cannot connect to {where}: {text[:300]}", ExitCode.CONNECT)
    if any(p in lowered for p in _PERMISSION):
        return BackfillError(f"permission denied on {where}: {text[:300]}", ExitCode.PERMISSION)
    if isinstance(exc, DBAPIError) and (exc.connection_invalidated or any(p in lowered for p in _CONNECT)):
        return BackfillError(f"cannot connect to {where}: {text[:300]}", ExitCode.CONNECT)
    if any(p in lowered for p in _CONNECT):
        return BackfillError(f"cannot connect to {where}: {text[:300]}", ExitCode.CONNECT)
    return BackfillError(f"database error on {where}: {text[:300]}", ExitCode.STOPPED)
