"""Alembic environment: the same database resolution as the CLI, and a version table of our own.

MLflow keeps its own history in ``alembic_version`` and refuses to start when that table holds a revision
it does not know, so this project's history lives in ``alembic_version_gateway_backfill`` (MLflow's
"is this database empty" check also ignores tables whose names start with ``alembic_``).
"""

from __future__ import annotations

import sys

from alembic import context
from sqlalchemy.exc import SQLAlchemyError

from backfill.db import BackfillError, create_engine, describe, parse_url, require_mlflow, resolve_url
from backfill.sql import VERSION_TABLE

config = context.config


def _url():  # type: ignore[no-untyped-def]
    return parse_url(resolve_url(context.get_x_argument(as_dictionary=True).get("database-url")))


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: render the script for the URL's dialect; never connects."""
    url = _url()
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


def run_migrations_online() -> None:
    url = _url()
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            # Before Alembic creates its version table: a non-MLflow database gets nothing written.
            require_mlflow(connection)
            connection.rollback()
            context.configure(connection=connection, version_table=VERSION_TABLE)
            with context.begin_transaction():
                context.run_migrations()
    except SQLAlchemyError as exc:
        raise describe(exc, url) from None
    finally:
        engine.dispose()


try:
    if context.is_offline_mode():
        run_migrations_offline()
    else:
        run_migrations_online()
except BackfillError as error:
    # One line and the documented exit code, as from the CLI (alembic would print a traceback).
    print(f"Error: {error}", file=sys.stderr)
    sys.exit(int(error.code))
