"""Engines and connections: the session settings of each dialect, and connection failures as one line.

Every connection the tool makes is in autocommit mode: the job opens and ends its transactions with
explicit statements (``BEGIN IMMEDIATE``, ``START TRANSACTION``, ``COMMIT``; see ``sql.py``), so the same
code runs on its own connections and on the one Alembic shares with a revision inside
``autocommit_block()``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from backfill import retry
from backfill.errors import BackfillError, ExitCode, describe, driver_text
from backfill.retry import Timeouts
from backfill.urls import display, sqlite_path

APPLICATION_NAME = "mlflow-gateway-backfill"


def _sqlite_url(url: URL, read_only: bool) -> URL:
    """The same file as a URI that SQLite never creates: ``mode=rw`` (or ``ro`` for read-only commands)."""
    path = sqlite_path(url)
    if path is None:
        raise BackfillError("an in-memory SQLite database holds no MLflow tables", ExitCode.NOT_MLFLOW)
    if os.path.isdir(path):
        raise BackfillError(f"{path!r} is a directory, not an MLflow SQLite database", ExitCode.NOT_MLFLOW)
    if not os.path.exists(path):
        raise BackfillError(f"no SQLite database at {path!r} (not an MLflow database)", ExitCode.NOT_MLFLOW)
    # Keep what else the user asked of SQLite (vfs, cache, ...) but never a mode that may create the file.
    query = {k: v for k, v in url.query.items() if k not in ("uri", "mode")}
    if read_only and _quiescent_wal_out_of_reach(path):
        query["immutable"] = "1"
    return url.set(
        database="file:" + quote(os.path.abspath(path)),
        query={**query, "uri": "true", "mode": "ro" if read_only else "rw"},
    )


def _quiescent_wal_out_of_reach(path: str) -> bool:
    """A WAL database that nobody has open (no ``-wal`` file) in a directory we may not write to.

    SQLite opens a WAL database read-only only if its ``-shm`` file exists or can be created; here it
    cannot, so a read-only command opens the file as immutable instead. That is exact while no ``-wal``
    file exists: every committed page is in the database file itself.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    is_wal = header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x02\x02"
    directory = os.path.dirname(os.path.abspath(path))
    return is_wal and not os.path.exists(path + "-wal") and not os.access(directory, os.W_OK)


def create_engine(url: URL, timeouts: Timeouts | None = None, read_only: bool = False) -> Engine:
    """An autocommit engine with the dialect's session limits applied on every connect, and the watchdog."""
    timeouts = timeouts or Timeouts()
    backend = url.get_backend_name()
    connect_args: dict = {}
    seconds = max(2, math.ceil(timeouts.connect))  # whole seconds; libpq treats less than 2 as 2
    if backend == "sqlite":
        url = _sqlite_url(url, read_only)
        connect_args["timeout"] = min(timeouts.lock, retry.SQLITE_BUSY_STEP)  # the rest is waited in steps (retry)
    elif backend == "postgresql":
        # Given at start-up, so even the first statement runs under them, with no extra round trip.
        limits = (
            f"-c lock_timeout={retry.seconds_ms(timeouts.lock)}"
            f" -c statement_timeout={retry.seconds_ms(timeouts.statement)}"
        )
        options = " ".join(filter(None, (url.query.get("options"), limits)))
        connect_args.update(connect_timeout=seconds, options=options)
        if "application_name" not in url.query:
            connect_args["application_name"] = APPLICATION_NAME
        url = url.difference_update_query(["options"])
    elif backend == "mysql":
        # The handshake reads under read_timeout: it is the connect timeout until the session is set up.
        connect_args.update(connect_timeout=seconds, read_timeout=seconds, write_timeout=seconds)
    engine = sa.create_engine(url, connect_args=connect_args, isolation_level="AUTOCOMMIT", pool_pre_ping=False)
    if backend == "mysql":
        sa.event.listen(engine, "do_connect", _utf8_credentials)
        sa.event.listen(engine, "connect", lambda dbapi_connection, _record: _mysql_session(dbapi_connection, timeouts))
    sa.event.listen(engine, "begin", _explicit_begin)
    engine._mgb_owned = True  # type: ignore[attr-defined]
    return retry.guard(engine)


BEGIN = {"postgresql": "BEGIN", "mysql": "START TRANSACTION", "sqlite": "BEGIN"}


def _explicit_begin(conn: Connection) -> None:
    """On a connection marked ``explicit_begin`` (Alembic's), a SQLAlchemy transaction is a real one.

    The engine is autocommit, which the job's batches need (they send their own BEGIN); Alembic's own
    statements get a real transaction this way, on SQLite too (whose driver would otherwise begin one
    only before INSERT, UPDATE and DELETE, leaving DDL outside it).
    """
    options = conn.get_execution_options()
    if options.get("explicit_begin") and options.get("isolation_level") != "AUTOCOMMIT":
        conn.exec_driver_sql(BEGIN[conn.dialect.name])


def _utf8_credentials(_dialect: Any, _record: Any, _args: list, params: dict) -> None:
    """The MySQL family: send the user name and password as UTF-8, as MySQL's own client and MLflow's other
    drivers do (the server compares the UTF-8 bytes it stored); PyMySQL would send a password as latin-1."""
    for key in ("user", "password", "passwd"):
        if isinstance(params.get(key), str):
            params[key] = params[key].encode()


def prepare_session(conn: Connection, timeouts: Timeouts) -> None:
    """The session limits of :func:`create_engine`, on a connection of an engine the tool did not create
    (an application's, handed to the Alembic revision): they last for that session."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET lock_timeout = {retry.seconds_ms(timeouts.lock)}")
        conn.exec_driver_sql(f"SET statement_timeout = {retry.seconds_ms(timeouts.statement)}")
    elif conn.dialect.name == "mysql":
        _mysql_session(conn.connection.dbapi_connection, timeouts)


def _mysql_session(dbapi_connection, timeouts: Timeouts) -> None:  # type: ignore[no-untyped-def]
    """Lock-wait and statement limits and READ COMMITTED on a MySQL-family session (MariaDB's names differ)."""
    lock = max(1, math.ceil(timeouts.lock))  # whole seconds
    cursor = dbapi_connection.cursor()
    cursor.execute("SELECT VERSION()")
    is_mariadb = "mariadb" in str(cursor.fetchone()[0]).lower()
    limit = (
        f"max_statement_time = {timeouts.statement:.3f}"  # MariaDB: every statement
        if is_mariadb
        else f"max_execution_time = {retry.seconds_ms(timeouts.statement)}"  # MySQL: SELECT only (see retry)
    )
    cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {lock}, lock_wait_timeout = {lock}, {limit}")
    # READ COMMITTED: INSERT ... SELECT then takes no gap locks that would block MLflow's own inserts.
    cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    cursor.close()
    # From now on a read may take as long as a statement may; the watchdog still bounds it.
    dbapi_connection._read_timeout = dbapi_connection._write_timeout = math.ceil(timeouts.deadline)


def connect(engine: Engine, timeouts: Timeouts | None = None) -> Connection:
    """Open a connection, again after a transient failure (a server starting up or restarting, too many
    connections) with the retry policy; every way it can fail becomes one line and a documented exit code."""
    url = engine.url
    try:
        if timeouts is None:
            return engine.connect()
        return retry.with_retries(timeouts, engine.connect, lambda: None, url, what="connecting")
    except BackfillError:
        raise
    except DBAPIError as exc:
        if _bad_parameter(exc):
            raise BackfillError(
                f"the database URL has a parameter the driver rejects: {driver_text(exc, url)}", ExitCode.USAGE
            ) from None
        raise describe(exc, url, connecting=True) from None
    except SQLAlchemyError as exc:
        raise describe(exc, url, connecting=True) from None
    except TypeError as exc:  # PyMySQL: an unknown keyword, i.e. a URL query parameter it does not know
        raise BackfillError(
            f"the database URL has a parameter the driver rejects ({exc}); see the README for the "
            "parameters of psycopg and PyMySQL",
            ExitCode.USAGE,
        ) from None
    except (AttributeError, LookupError) as exc:  # PyMySQL: an unknown ?charset=
        raise BackfillError(f"the database URL has a value the driver rejects ({exc!r})", ExitCode.USAGE) from None
    except RuntimeError as exc:
        if "cryptography" in str(exc):
            raise BackfillError(
                f"cannot connect to {display(url)}: the server asks for caching_sha2_password and the "
                "'cryptography' package is missing (pip install 'PyMySQL[rsa]'), or use TLS",
                ExitCode.CONNECT,
            ) from None
        raise describe(exc, url, connecting=True) from None
    except OSError as exc:
        raise BackfillError(f"cannot connect to {display(url)}: {exc.strerror or exc}", ExitCode.CONNECT) from None


def _bad_parameter(exc: DBAPIError) -> bool:
    """psycopg refusing the connection string itself (an unknown option, an invalid value)."""
    text = str(exc.orig).lower()
    return "invalid connection option" in text or ("invalid" in text and "value" in text and "connection" in text)


# An execution option: this connection is inside a transaction of the caller's (an application or a test
# hands Alembic a connection it has begun): each of the job's transactions is then a savepoint of it.
SAVEPOINTS = "mgb_savepoints"


def in_callers_transaction(conn: Connection) -> bool:
    return bool(conn.get_execution_options().get(SAVEPOINTS))


@contextmanager
def transaction(conn: Connection, begin: str, keep: bool = True) -> Iterator[None]:
    """One database transaction on an autocommit connection: ``begin``, the block, ``COMMIT`` (``keep``
    false: ``ROLLBACK``, for a probe or a read whose session settings must end with it). Inside a caller's
    transaction, a savepoint of it instead.

    On any failure the transaction is rolled back before the error goes on (SQLite keeps a transaction
    open after a failed COMMIT; a later BEGIN would fail with "cannot start a transaction within a
    transaction").
    """
    if in_callers_transaction(conn):
        with _savepoint(conn, keep):
            yield
        return
    conn.exec_driver_sql(begin)
    try:
        yield
        conn.exec_driver_sql("COMMIT" if keep else "ROLLBACK")
    except BaseException:
        recover(conn)
        raise


@contextmanager
def _savepoint(conn: Connection, keep: bool) -> Iterator[None]:
    conn.exec_driver_sql("SAVEPOINT mgb_step")
    try:
        yield
    except BaseException:
        with suppress(Exception):
            conn.exec_driver_sql("ROLLBACK TO SAVEPOINT mgb_step")
            conn.exec_driver_sql("RELEASE SAVEPOINT mgb_step")
        raise
    if not keep:
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT mgb_step")
    conn.exec_driver_sql("RELEASE SAVEPOINT mgb_step")


def read_whole_table(conn: Connection, setup: tuple[str, ...], statement: str, params: dict[str, Any]) -> Any:
    """The scalar of a whole-table read (verify's count, the end-of-pass check), after the dialect's planner
    settings (``DialectSQL.whole_table_setup``) in a transaction of its own, so they end with it."""
    if not setup:
        return conn.execute(sa.text(statement), params).scalar()
    with transaction(conn, "BEGIN", keep=False):
        for line in setup:
            conn.exec_driver_sql(line)
        return conn.execute(sa.text(statement), params).scalar()


def recover(conn: Connection) -> None:
    """Bring a connection back to a clean state after a failure: no open transaction, usable again.

    Inside a caller's transaction, :func:`transaction` has rolled its savepoint back already, and nothing
    more is done: the caller's transaction is the caller's (a lost connection takes it along, and the next
    statement fails rather than write outside it).
    """
    if conn.closed or in_callers_transaction(conn):
        return
    if retry.stopped_answering(conn.engine) and not conn.invalidated:
        conn.invalidate()  # close it without a word to the server; it rolls back when it sees the socket gone
    if conn.invalidated:
        conn.rollback()  # SQLAlchemy: forget the lost connection; the next statement opens a new one
        return
    raw = conn.connection.dbapi_connection
    if conn.dialect.name == "sqlite" and not getattr(raw, "in_transaction", True):
        return
    with suppress(Exception):
        conn.exec_driver_sql("ROLLBACK")
    if conn.invalidated:
        conn.rollback()


def close(conn: Connection) -> None:
    """Close a connection after :func:`recover` (quietly: the server may be gone; the real error follows)."""
    with suppress(Exception):
        recover(conn)
    with suppress(Exception):
        conn.close()
