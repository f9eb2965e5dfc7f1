"""Alembic environment: the CLI's database resolution, limits, lock and exit codes, and a version table of our own.

MLflow keeps its own history in ``alembic_version`` and refuses to start when that table holds a revision
it does not know, so this project's history lives in ``alembic_version_gateway_backfill``, in the schema of
MLflow's tables (MLflow's "is this database empty" check also ignores tables whose names start with
``alembic_``). A downgrade to base drops it too (once empty), so that nothing of the project is left.

The connection: the one handed over in ``config.attributes["connection"]`` (Alembic's recipe for sharing a
connection; how pytest-alembic and application code drive migrations): a Connection, an Engine, or anything
whose ``connect()`` gives a Connection (pytest-alembic hands over an Engine, or a connection wrapped to look
like one). Else one opened on the URL resolved like the CLI's (``-x database-url=URL``, ``$DATABASE_URL``,
``$MLFLOW_BACKEND_STORE_URI``, ``$MLFLOW_TRACKING_URI`` when it is a database URI, ``sqlite:///mlflow.db``).
``-x`` also takes the run's tunables under the CLI's option names (``-x sleep=0.1 -x batch-size=500``); an
unknown key is refused. A connection handed over inside a transaction of the caller's keeps the whole
migration inside that transaction (backfill/migration.py).

Before Alembic writes anything (its version table included), a command that changes the database takes
the single-runner lock on a connection of its own, which the revision's batches then use; the lock is held
until the command ends. Every statement, Alembic's own included, runs under the watchdog's limits.

Command line or Python: from ``alembic``'s command line (Alembic's own ``main`` sets ``config.cmd_opts``),
a failure ends the process with one line and the CLI's exit code, a signal ends the command the CLI's way
(exit 7, resumable), and replica waits are reported on stderr. Called from Python (``alembic.command.upgrade``
with a ``Config`` of one's own; pytest-alembic), a failure is raised, as a ``BackfillError`` (an Exception
with the exit code as ``.code``) or SQLAlchemy's own error, and the process's signal handlers are left alone.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack, nullcontext

import click
import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from backfill import credentials, output, signals
from backfill.cli import TUNABLES, settings_from
from backfill.connect import SAVEPOINTS, close, connect, create_engine, failure, prepare_session
from backfill.errors import BackfillError, ExitCode
from backfill.job import Backfill
from backfill.lock import runner_lock
from backfill.migration import KEY, Shared, job_connection, open_connection
from backfill.retry import guard, limits
from backfill.schema import Target, inspect_target
from backfill.sql import VERSION_TABLE
from backfill.urls import parse_url, resolve_url
from backfill.walk import Settings

config = context.config
X_KEYS = ("database-url", "replica-url", "schema", "password-file", "password-command", *TUNABLES)
FROM_COMMAND_LINE = config.cmd_opts is not None  # see the module docstring


def _x_arguments() -> tuple[str | None, Settings]:
    """``-x database-url=URL``, ``-x schema=NAME``, ``-x replica-url=URL`` (repeatable), ``-x password-file=``,
    ``-x password-command=`` and the tunables; an unknown key (``database_url``, a typo) is refused rather
    than ignored."""
    url, replicas, values, passwords = None, [], {}, {}
    schema: str | None = None
    for raw in context.get_x_argument(as_dictionary=False):
        key, sep, value = raw.partition("=")
        if not sep or key not in X_KEYS:
            raise BackfillError(
                f"unknown -x argument {key!r}: use -x KEY=VALUE, KEY one of {', '.join(X_KEYS)}", ExitCode.USAGE
            )
        if key == "database-url":
            url = value
        elif key == "replica-url":
            replicas.append(value)
        elif key == "schema":
            schema = value
        elif key.startswith("password-"):  # backfill/credentials.py: the password file or command
            passwords[key[len("password-") :]] = value
        else:
            try:
                values[key] = TUNABLES[key].convert(value, None, None)
            except click.BadParameter as exc:
                raise BackfillError(f"-x {key}: {exc.message}", ExitCode.USAGE) from None
    credentials.configure(passwords.get("file"), passwords.get("command"), via="-x password-")
    return url, dataclasses.replace(settings_from(values, tuple(replicas)), schema=schema)


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: render the script for the URL's dialect; never connects."""
    url = parse_url(resolve_url(_x_arguments()[0]).url)
    context.configure(
        url=url,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        # One transaction around the script on SQLite too, so the ledger and the tags commit together.
        transactional_ddl=url.get_backend_name() != "mysql",
    )
    with context.begin_transaction():
        context.run_migrations()


def _read_only() -> bool:
    """`alembic current`, `check`, `history`: Alembic itself writes nothing (not even its version table)."""
    proxy = getattr(context, "_proxy", None)
    return proxy is not None and bool(proxy.context_opts.get("dont_mutate"))


def _changes_the_database() -> bool:
    """Only a command with a destination revision (upgrade, downgrade, stamp) changes the database and takes
    the lock. `alembic current`, `check` and an inspection run through ``EnvironmentContext(fn=...)`` (how
    pytest-alembic asks for the current revision) only read the version table, and write nothing (not even
    the lease table)."""
    proxy = getattr(context, "_proxy", None)
    if proxy is None:
        return True
    return not _read_only() and proxy.context_opts.get("destination_rev") is not None


def _migrate(conn: Connection, settings: Settings, stack: ExitStack) -> None:
    in_callers_transaction = conn.in_transaction()  # before the inspection's reads begin one
    if in_callers_transaction:  # the tool's own transactions (the inspection's reads too) become savepoints
        conn.execution_options(**{SAVEPOINTS: True})
        stack.callback(conn.execution_options, **{SAVEPOINTS: False})
    target = inspect_target(conn, settings.schema)  # before anything is written: a non-MLflow database gets nothing
    if conn.in_transaction() and not in_callers_transaction:
        conn.rollback()  # the inspection's reads; Alembic begins its own transaction
    if _changes_the_database():
        config.attributes[KEY] = _shared(conn, target, settings, in_callers_transaction, stack)
        stack.callback(config.attributes.pop, KEY, None)
    context.configure(connection=conn, version_table=VERSION_TABLE, version_table_schema=target.schema)
    with context.begin_transaction():
        context.run_migrations()
        # Alembic creates its version table whenever it may write (an inspection through
        # EnvironmentContext(fn=...) too): at base, nothing of the project may be left.
        at_base = not _read_only() and not context.get_context().get_current_heads()
    if at_base:
        _drop_version_table(conn, target, in_callers_transaction)


def _drop_version_table(conn: Connection, target: Target, in_callers_transaction: bool) -> None:
    """After a downgrade to base, Alembic's (empty) version table goes too, so that nothing of the project is
    left: in the caller's transaction, else in one of its own (Alembic has committed its work by now; what
    it left open holds only its reading of the version table)."""
    if not in_callers_transaction and conn.in_transaction():
        conn.commit()
    with nullcontext() if in_callers_transaction else conn.begin():
        sa.Table(VERSION_TABLE, sa.MetaData(), schema=target.schema).drop(conn, checkfirst=True)


def _shared(
    conn: Connection, target: Target, settings: Settings, in_callers_transaction: bool, stack: ExitStack
) -> Shared:
    """The single-runner lock, on the connection the batches will use, and what the revision needs."""
    if in_callers_transaction:  # the batches become savepoints of the caller's transaction, on its connection
        job_conn = conn.execution_options(**{SAVEPOINTS: True})
        stack.callback(conn.execution_options, **{SAVEPOINTS: False})
        prepare_session(job_conn, settings.timeouts)
    else:
        job_conn = stack.enter_context(job_connection(conn.engine, settings.timeouts))
    # Replica URLs that are no replicas are refused before the lock and Alembic's version table.
    Backfill(conn.engine, settings).check_replicas(job_conn, target)
    # The application's signals are the application's; from the command line, a signal ends the command.
    stop = stack.enter_context(signals.handled()) if FROM_COMMAND_LINE else (lambda: False)
    lock = runner_lock(job_conn, target, lambda: open_connection(conn.engine, settings.timeouts))
    lock.acquire(stop)
    stack.callback(lock.release)
    waits = output.Bar(progress=False, waits=True) if FROM_COMMAND_LINE else None  # replica waits on stderr
    return Shared(job_conn, target, lock, stop, settings, in_callers_transaction, waits)


def _connection(given: object, stack: ExitStack) -> Connection:
    """A Connection from what was handed over: itself, or what its ``connect()`` gives (an Engine's)."""
    if isinstance(given, Engine):
        guard(given)
    conn = given if isinstance(given, Connection) else None
    if conn is None and callable(getattr(given, "connect", None)):
        conn = stack.enter_context(given.connect())  # type: ignore[attr-defined]
    if not isinstance(conn, Connection):
        raise BackfillError(
            f"config.attributes['connection'] is a {type(given).__name__}: hand over a SQLAlchemy Connection or Engine",
            ExitCode.USAGE,
        )
    guard(conn.engine)
    return conn


def run_migrations_online() -> None:
    explicit_url, settings = _x_arguments()
    given = config.attributes.get("connection")
    with ExitStack() as stack, limits(settings.timeouts):
        if given is not None:
            conn = _connection(given, stack)
            url = conn.engine.url
        else:
            url = parse_url(resolve_url(explicit_url).url)
            engine = create_engine(url, settings.timeouts)
            stack.callback(engine.dispose)
            # Alembic's own connection runs real transactions (connect._explicit_begin).
            conn = connect(engine, settings.timeouts).execution_options(explicit_begin=True)
            stack.callback(close, conn)
        try:
            _migrate(conn, settings, stack)
        except SQLAlchemyError as exc:
            raise failure(exc, url) from None


def main() -> None:
    run = run_migrations_offline if context.is_offline_mode() else run_migrations_online
    if not FROM_COMMAND_LINE:  # from Python: errors are raised to the caller
        try:
            run()
        finally:
            credentials.reset()
        return
    signals.install()  # a signal from here on ends the command the CLI's way
    try:
        run()
    except BackfillError as error:
        # One line and the documented exit code, as from the CLI (alembic would print a traceback).
        output.error(str(error))
        sys.exit(int(error.code))
    except KeyboardInterrupt as exc:
        output.error(f"{exc or 'interrupted'}; nothing was left half-written")
        sys.exit(int(ExitCode.STOPPED))
    finally:
        signals.ignore()  # the outcome is decided: no late signal may end the process by itself
        credentials.reset()
        output.flush()


main()
