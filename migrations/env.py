"""Alembic environment: the CLI's database resolution, limits, lock and exit codes, and a version table of our own.

MLflow keeps its own history in ``alembic_version`` and refuses to start when that table holds a revision
it does not know, so this project's history lives in ``alembic_version_gateway_backfill``, in the schema of
MLflow's tables (MLflow's "is this database empty" check also ignores tables whose names start with
``alembic_``).

The connection: the one handed over in ``config.attributes["connection"]`` (Alembic's recipe for sharing a
connection; how pytest-alembic and application code drive migrations), else one opened on the URL
resolved like the CLI's (``-x database-url=URL``, ``$DATABASE_URL``, ``$MLFLOW_BACKEND_STORE_URI``,
``$MLFLOW_TRACKING_URI`` when it is a database URI, ``sqlite:///mlflow.db``). ``-x`` also takes the run's
tunables under the CLI's option names (``-x sleep=0.1 -x batch-size=500``); an unknown key is refused.

Before Alembic writes anything (its version table included), a command that changes the database takes
the single-runner lock on a connection of its own, which the revision's batches then use; the lock is held
until the command ends. Every statement, Alembic's own included, runs under the watchdog's limits, and a
signal ends the command the CLI's way (exit 7, resumable).
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack

import click
from alembic import context
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from backfill import credentials, signals
from backfill.cli import TUNABLES, settings_from
from backfill.connect import close, connect, create_engine, failure
from backfill.errors import BackfillError, ExitCode
from backfill.job import Backfill
from backfill.lock import runner_lock
from backfill.migration import KEY, Shared, job_connection, open_connection
from backfill.retry import guard, limits
from backfill.schema import inspect_target
from backfill.sql import VERSION_TABLE
from backfill.urls import parse_url, resolve_url
from backfill.walk import Settings

config = context.config
X_KEYS = ("database-url", "replica-url", "schema", "password-file", "password-command", *TUNABLES)


def _x_arguments() -> tuple[str | None, Settings]:
    """``-x database-url=URL``, ``-x replica-url=URL`` (repeatable) and the tunables; an unknown key
    (``database_url``, a typo) is refused rather than ignored."""
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


def _changes_the_database() -> bool:
    """Only a command with a destination revision (upgrade, downgrade, stamp) changes the database and takes
    the lock. `alembic current`, `check` and an inspection run through ``EnvironmentContext(fn=...)`` (how
    pytest-alembic asks for the current revision) only read the version table, and write nothing (not even
    the lease table)."""
    proxy = getattr(context, "_proxy", None)
    if proxy is None:
        return True
    return not proxy.context_opts.get("dont_mutate") and proxy.context_opts.get("destination_rev") is not None


def _migrate(conn: Connection, settings: Settings, stack: ExitStack) -> None:
    target = inspect_target(conn, settings.schema)  # before anything is written: a non-MLflow database gets nothing
    if conn.in_transaction() and not isinstance(config.attributes.get("connection"), Connection):
        conn.rollback()  # the inspection's reads; Alembic begins its own transaction
    if _changes_the_database():
        job_conn = stack.enter_context(job_connection(conn.engine, settings.timeouts))
        # Replica URLs that are no replicas are refused before Alembic writes its version table.
        Backfill(conn.engine, settings).check_replicas(job_conn, target)
        stop = stack.enter_context(signals.handled())
        lock = runner_lock(job_conn, target, lambda: open_connection(conn.engine, settings.timeouts))
        lock.acquire(stop)
        stack.callback(lock.release)
        config.attributes[KEY] = Shared(job_conn, target, lock, stop, settings)
    context.configure(connection=conn, version_table=VERSION_TABLE, version_table_schema=target.schema)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    explicit_url, settings = _x_arguments()
    given: Connection | Engine | None = config.attributes.get("connection")
    with ExitStack() as stack, limits(settings.timeouts):
        if isinstance(given, Engine):  # handed an engine (pytest-alembic does): a connection of it
            given = stack.enter_context(guard(given).connect())
        if given is not None:
            url = guard(given.engine).url
            conn = given
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
    try:
        if context.is_offline_mode():
            run_migrations_offline()
        else:
            run_migrations_online()
    except BackfillError as error:
        # One line and the documented exit code, as from the CLI (alembic would print a traceback).
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(int(error.code))
    except KeyboardInterrupt:
        print("Error: interrupted; nothing was left half-written", file=sys.stderr)
        sys.exit(int(ExitCode.STOPPED))
    finally:
        credentials.reset()


main()
