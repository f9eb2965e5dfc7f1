"""Engines, connections and transactions: each dialect's limits, and connection failures as one line.

Every connection the tool makes is in autocommit mode: the job opens and ends its transactions with
explicit statements (``BEGIN IMMEDIATE``, ``START TRANSACTION``, ``COMMIT``; see ``sql.py``), so the same
code runs on its own connections and on the one Alembic shares with a revision inside
``autocommit_block()``.

Nothing depends on a database session surviving, so that every guarantee holds through a connection pooler
(PgBouncer in transaction pooling hands each transaction whichever server connection is free): on
PostgreSQL the limits are set inside each transaction (:func:`pg_transaction_setup`), every read runs in a
transaction of its own (:func:`reading`), no start-up parameter is sent but ``application_name`` and no
statement is ever prepared on the server. The single-runner lock is a lease row (``lock.py``).
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

from backfill import credentials, retry
from backfill.errors import BackfillError, ExitCode, describe, driver_text
from backfill.retry import Timeouts
from backfill.urls import display, secrets, sqlite_path

APPLICATION_NAME = "mlflow-gateway-backfill"


def failure(exc: BaseException, url: URL, connecting: bool = False) -> BackfillError:
    """What a failure of an operation on ``url`` means: one line (the password never shown) and an exit code."""
    return describe(exc, display(url), secrets(url), connecting)


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


def pg_options(raw: str) -> dict[str, str]:
    """The settings of a libpq ``options`` value (``-c name=value``, ``-cname=value``, ``--name=value``; a
    backslash escapes the next character), which the tool applies per transaction instead of at start-up."""
    words, word, escaped = [], "", False
    for ch in raw:
        if escaped or (ch != "\\" and not ch.isspace()):
            word, escaped = word + ch, False
        elif ch == "\\":
            escaped = True
        elif word:
            words, word = [*words, word], ""
    words += [word] if word else []
    settings: dict[str, str] = {}
    rest = iter(words)
    for w in rest:
        body = next(rest, "") if w == "-c" else w[2:] if w.startswith(("-c", "--")) else ""
        name, sep, value = body.partition("=")
        if not (sep and name):
            raise BackfillError(
                f"?options= holds {w!r}, which the tool cannot apply: use -c name=value settings "
                "(e.g. ?options=-csearch_path%3Dmlflow), or --schema to name MLflow's schema",
                ExitCode.USAGE,
            )
        settings[name.replace("-", "_")] = value
    return settings


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def pg_transaction_setup(timeouts: Timeouts, settings: dict[str, str] | None = None) -> str:
    """What follows every ``BEGIN`` on PostgreSQL, in the same round trip: the limits and the URL's ``-c``
    settings, local to the transaction (``set_config(..., true)`` is ``SET LOCAL``).

    Per transaction, not per session, so that they hold through a transaction-pooling PgBouncer (where a
    session's settings would stay on a server connection other clients then use, and the next transaction
    may run on another one), and no start-up parameter is sent that a stock PgBouncer refuses.
    """
    values = {
        **(settings or {}),
        "lock_timeout": str(retry.seconds_ms(timeouts.lock)),
        "statement_timeout": str(retry.seconds_ms(timeouts.statement)),
    }
    return "; SELECT " + ", ".join(f"set_config({_literal(k)}, {_literal(v)}, true)" for k, v in values.items())


def create_engine(url: URL, timeouts: Timeouts | None = None, read_only: bool = False) -> Engine:
    """An autocommit engine with the dialect's limits (per transaction on PostgreSQL, per session on the MySQL
    family, the busy timeout on SQLite) and the watchdog."""
    timeouts = timeouts or Timeouts()
    backend = url.get_backend_name()
    connect_args: dict = {}
    setup = ""
    seconds = max(2, math.ceil(timeouts.connect))  # whole seconds; libpq treats less than 2 as 2
    if backend == "sqlite":
        url = _sqlite_url(url, read_only)
        connect_args["timeout"] = min(timeouts.lock, retry.SQLITE_BUSY_STEP)  # the rest is waited in steps (retry)
    elif backend == "postgresql":
        # The URL's ?options= (else libpq's $PGOPTIONS) are applied per transaction; options="" keeps libpq
        # from sending $PGOPTIONS as a start-up parameter, which a stock PgBouncer refuses.
        options = str(url.query.get("options", os.environ.get("PGOPTIONS", "")))
        setup = pg_transaction_setup(timeouts, pg_options(options))
        # No server-side prepared statement: one would outlive its transaction on a pooled server connection
        # (psycopg prepares a statement run 5 times by default), and another client's would collide with ours.
        connect_args.update(connect_timeout=seconds, prepare_threshold=None, options="")
        if "application_name" not in url.query:
            connect_args["application_name"] = APPLICATION_NAME
        url = url.difference_update_query(["options", "prepare_threshold"])
    elif backend == "mysql":
        # The handshake reads under read_timeout: it is the connect timeout until the session is set up.
        connect_args.update(connect_timeout=seconds, read_timeout=seconds, write_timeout=seconds)
    engine = sa.create_engine(
        url,
        connect_args=connect_args,
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=False,
        execution_options={SETUP: setup},
    )
    credentials.install(engine, timeouts.connect)  # a password file or command, MLflow's MySQL TLS variables
    if backend == "mysql":
        sa.event.listen(engine, "do_connect", _utf8_credentials)
        sa.event.listen(engine, "connect", lambda dbapi_connection, _record: _mysql_session(dbapi_connection, timeouts))
    sa.event.listen(engine, "begin", _explicit_begin)
    engine._mgb_owned = True  # type: ignore[attr-defined]
    return retry.guard(engine)


BEGIN = {"postgresql": "BEGIN", "mysql": "START TRANSACTION", "sqlite": "BEGIN"}
SETUP = "mgb_transaction_setup"  # the execution option holding what follows each BEGIN (PostgreSQL)


def _explicit_begin(conn: Connection) -> None:
    """On a connection marked ``explicit_begin`` (Alembic's), a SQLAlchemy transaction is a real one.

    The engine is autocommit, which the job's batches need (they send their own BEGIN); Alembic's own
    statements get a real transaction this way, under the same limits, on SQLite too (whose driver would
    otherwise begin one only before INSERT, UPDATE and DELETE, leaving DDL outside it).
    """
    options = conn.get_execution_options()
    if options.get("explicit_begin") and options.get("isolation_level") != "AUTOCOMMIT":
        conn.exec_driver_sql(BEGIN[conn.dialect.name] + options.get(SETUP, ""))


def _utf8_credentials(_dialect: Any, _record: Any, _args: list, params: dict) -> None:
    """The MySQL family: send the user name and password as UTF-8, as MySQL's own client and MLflow's other
    drivers do (the server compares the UTF-8 bytes it stored); PyMySQL would send a password as latin-1."""
    for key in ("user", "password", "passwd"):
        if isinstance(params.get(key), str):
            params[key] = params[key].encode()


def prepare_session(conn: Connection, timeouts: Timeouts) -> Connection:
    """The limits of :func:`create_engine` on a connection of an engine the tool did not create (an
    application's, handed to the Alembic revision): for every transaction the tool begins on it."""
    if conn.dialect.name == "postgresql":
        # No server-side prepared statement on it either (see create_engine): it may be a pooled connection.
        conn.connection.dbapi_connection.prepare_threshold = None
        return conn.execution_options(**{SETUP: pg_transaction_setup(timeouts)})
    if conn.dialect.name == "mysql":
        _mysql_session(conn.connection.dbapi_connection, timeouts)
    return conn


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
    # From now on a read may take as long as a statement may: the watchdog bounds it (and tells a server that
    # stopped answering from a transient failure); the socket's own timeout is only a backstop behind it.
    dbapi_connection._read_timeout = dbapi_connection._write_timeout = math.ceil(timeouts.deadline) + 5


def connect(engine: Engine, timeouts: Timeouts | None = None) -> Connection:
    """Open a connection, again after a transient failure (a server starting up or restarting, too many
    connections) with the retry policy; every way it can fail becomes one line and a documented exit code."""
    url = engine.url
    try:
        if timeouts is None:
            return engine.connect()
        return retry.with_retries(
            timeouts, engine.connect, lambda: None, lambda e, c: failure(e, url, c), what="connecting"
        )
    except BackfillError:
        raise
    except DBAPIError as exc:
        if _bad_parameter(exc):
            raise BackfillError(
                f"the database URL has a parameter the driver rejects: {driver_text(exc, secrets(url))}",
                ExitCode.USAGE,
            ) from None
        raise failure(exc, url, connecting=True) from None
    except SQLAlchemyError as exc:
        raise failure(exc, url, connecting=True) from None
    except TypeError as exc:  # PyMySQL: an unknown keyword, i.e. a URL query parameter it does not know
        raise BackfillError(
            f"the database URL has a parameter the driver rejects ({exc}); see docs/databases.md for the "
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
        raise failure(exc, url, connecting=True) from None
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
    """One database transaction on an autocommit connection: ``begin`` (with the dialect's per-transaction
    setup, in the same round trip), the block, ``COMMIT`` (``keep`` false: ``ROLLBACK``, for a probe).
    Inside a caller's transaction, a savepoint of it instead.

    On any failure the transaction is rolled back before the error goes on (SQLite keeps a transaction
    open after a failed COMMIT; a later BEGIN would fail with "cannot start a transaction within a
    transaction").
    """
    setup = conn.get_execution_options().get(SETUP, "")
    if in_callers_transaction(conn):
        with _savepoint(conn, keep, setup):
            yield
        return
    conn.exec_driver_sql(begin + setup)
    try:
        yield
        conn.exec_driver_sql("COMMIT" if keep else "ROLLBACK")
    except BaseException:
        recover(conn)
        raise


@contextmanager
def reading(conn: Connection) -> Iterator[None]:
    """Reads in a transaction of their own on PostgreSQL, so that the limits hold for them too (they are set
    per transaction); elsewhere the session's limits apply and a read needs no transaction (and must not
    take SQLite's write lock)."""
    if conn.dialect.name != "postgresql":
        yield
        return
    with transaction(conn, "BEGIN READ ONLY"):
        yield


@contextmanager
def _savepoint(conn: Connection, keep: bool, setup: str) -> Iterator[None]:
    conn.exec_driver_sql("SAVEPOINT mgb_step" + setup)
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
    with reading(conn):
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
