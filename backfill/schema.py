"""The database the tool works on: which MLflow tables, their shape, and the project's own tables beside them.

MLflow's tables are never altered. The project's three tables live in the same schema as the MLflow tables
the tool works on (on PostgreSQL the schema ``experiment_tags`` resolves to through the session's
``search_path``, as MLflow itself resolves it; elsewhere the database itself):

* ``gateway_backfill_runs`` is the durable record of each run (cursor, counts, state): resume and audit.
* ``gateway_backfill_rows`` is the ledger: one row per isGateway tag this project inserted, so that
  ``revert`` removes exactly those rows and never one that MLflow or a user wrote.
* ``gateway_backfill_lock`` holds the single-runner lease (``lock.py``): one row.

On PostgreSQL, ``--schema`` (Alembic: ``-x schema=``) names the MLflow tables' schema explicitly; without
it, the schema is the one ``experiment_tags`` resolves to through the ``search_path`` (which may come from
the URL's ``?options=-csearch_path%3D...``, applied in every transaction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table
from sqlalchemy.engine import Connection

from backfill import sql
from backfill.connect import reading, transaction
from backfill.errors import BackfillError, ExitCode
from backfill.urls import display

metadata = MetaData()


def runs_columns() -> list[Column]:
    """Fresh Column objects (a Column belongs to one table), for the Table below and the migration."""
    return [
        Column("id", Integer, primary_key=True, autoincrement=True),
        # running | done | stopped (interrupted or gave up after retries: resumable) | reverting | reverted
        Column("state", String(16), nullable=False),
        Column("started_at_ns", BigInteger, nullable=False),
        Column("updated_at_ns", BigInteger, nullable=False),
        Column("last_id", BigInteger, nullable=True),  # the cursor: the last experiment_id done in this pass
        Column("passes", Integer, nullable=False, default=0),
        Column("batches", Integer, nullable=False, default=0),
        Column("inserted", Integer, nullable=False, default=0),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("message", String(500), nullable=True),
    ]


def ledger_columns() -> list[Column]:
    return [
        Column("experiment_id", Integer, primary_key=True, autoincrement=False),
        # experiments.creation_time when the row was inserted: an id reused after `mlflow gc` is another experiment.
        Column("experiment_created", BigInteger, nullable=True),
        Column("run_id", Integer, nullable=True),  # NULL: inserted by the offline `alembic upgrade --sql` script
        # Nanoseconds since the epoch; also identifies the batch that inserted the row.
        Column("inserted_at_ns", BigInteger, nullable=False),
    ]


def lease_columns() -> list[Column]:
    return [
        Column("name", String(32), primary_key=True),  # one row, 'runner'
        Column("owner", String(64), nullable=True),  # the holder's random token; NULL: free
        Column("holder", String(255), nullable=True),  # host:pid of the holder, for messages
        Column("renewals", BigInteger, nullable=False, default=0),  # moves with every renewal: the holder lives
        Column("taken_at_ns", BigInteger, nullable=True),
    ]


runs = Table(sql.RUNS_TABLE, metadata, *runs_columns())
ledger = Table(sql.LEDGER_TABLE, metadata, *ledger_columns())
lease = Table(sql.LOCK_TABLE, metadata, *lease_columns())

# What the tool relies on: these columns, and experiment_tags' primary key exactly (key, experiment_id).
REQUIRED_COLUMNS = {
    "experiment_tags": ("key", "value", "experiment_id"),
    "experiments": ("experiment_id", "creation_time", "lifecycle_stage"),
}
TAGS_PRIMARY_KEY = ("key", "experiment_id")


@dataclass(frozen=True)
class Target:
    """The MLflow database a command works on, as found on the server."""

    dialect: str  # sqlite | postgresql | mysql
    flavor: str  # sqlite | postgresql | mysql | mariadb
    schema: str | None  # PostgreSQL: the schema of MLflow's tables; None elsewhere
    database: str | None  # MySQL family: DATABASE(); None elsewhere
    prefix: str  # how statements qualify table names: '"mlf".' or ''
    has_runs: bool
    has_ledger: bool
    has_lease: bool = False

    @property
    def existing(self) -> set[str]:
        """The project's tables that exist."""
        found = {sql.RUNS_TABLE: self.has_runs, sql.LEDGER_TABLE: self.has_ledger, sql.LOCK_TABLE: self.has_lease}
        return {name for name, exists in found.items() if exists}

    @property
    def sql(self) -> sql.DialectSQL:
        return sql.statements(self.dialect, self.prefix)

    def tables(self, conn: Connection) -> Connection:
        """``conn`` with the project's Table objects mapped into the target's schema (same Connection)."""
        return conn.execution_options(schema_translate_map={None: self.schema})


def _pg_schema(conn: Connection, explicit: str | None) -> str | None:
    """The schema of MLflow's tables: ``explicit``, else where ``experiment_tags`` resolves through the
    search_path. A schema the user may not use is exit 5, not "not MLflow"."""
    if explicit is not None:
        row = conn.execute(
            sa.text("SELECT has_schema_privilege(n.oid, 'USAGE') FROM pg_catalog.pg_namespace n WHERE n.nspname = :s"),
            {"s": explicit},
        ).first()
        if row is None:
            raise BackfillError(f"no schema {explicit!r} in this database (--schema)", ExitCode.NOT_MLFLOW)
        if not row[0]:
            raise _no_usage(explicit)
        found = conn.execute(
            sa.text("SELECT to_regclass(quote_ident(:s) || '.experiment_tags') IS NOT NULL"), {"s": explicit}
        ).scalar()
        schema = explicit if found else None
    else:
        schema = conn.execute(
            sa.text(
                "SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.oid = to_regclass('experiment_tags')"
            )
        ).scalar()
    if schema is None:
        # Not found: in a schema the user may not use (the search_path skips those), or elsewhere?
        hidden = conn.execute(
            sa.text(
                "SELECT n.nspname, has_schema_privilege(n.oid, 'USAGE') FROM pg_catalog.pg_class c"
                " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relname = 'experiment_tags' AND c.relkind IN ('r', 'p') ORDER BY n.nspname"
            )
        ).all()
        for name, usable in hidden:
            if not usable and (explicit is None or name == explicit):
                raise _no_usage(name)
        if hidden and explicit is None:
            raise BackfillError(
                "no experiment_tags table on the search_path; MLflow's tables are in schema "
                f"{hidden[0][0]!r}: add --schema {hidden[0][0]} (Alembic: -x schema={hidden[0][0]})",
                ExitCode.NOT_MLFLOW,
            )
        return None
    if not conn.execute(
        sa.text("SELECT to_regclass(quote_ident(:s) || '.experiments') IS NOT NULL"), {"s": schema}
    ).scalar():
        raise BackfillError(
            f"schema {schema!r} holds experiment_tags but not experiments: not an MLflow schema the tool knows "
            "(name the schema of MLflow's tables with --schema)",
            ExitCode.NOT_MLFLOW,
        )
    return str(schema)


def _no_usage(schema: str) -> BackfillError:
    return BackfillError(
        f"permission denied: the database user lacks USAGE on schema {schema!r}, which holds MLflow's tables "
        f"(GRANT USAGE ON SCHEMA {schema} TO <user>; docs/privileges.md)",
        ExitCode.PERMISSION,
    )


def inspect_target(conn: Connection, schema: str | None = None) -> Target:
    """Find the MLflow tables (on PostgreSQL in ``schema`` when given), check their shape, and see whether
    the project's tables exist.

    Refuses (exit 4, nothing written) a database without MLflow's tables, or whose tables differ from
    the shape the tool relies on (an MLflow that was never upgraded, or a future one that changed them).
    """
    with reading(conn):
        return _inspect(conn, schema)


def _inspect(conn: Connection, explicit: str | None) -> Target:
    dialect = conn.dialect.name
    schema = database = None
    flavor = dialect
    if explicit is not None and dialect != "postgresql":
        raise BackfillError(
            "--schema names a PostgreSQL schema; on MySQL and MariaDB the URL's database is the schema, and SQLite "
            "has none",
            ExitCode.USAGE,
        )
    if dialect == "postgresql":
        schema = _pg_schema(conn, explicit)
    elif dialect == "mysql":
        database = conn.execute(sa.text("SELECT DATABASE()")).scalar()
        flavor = "mariadb" if getattr(conn.dialect, "is_mariadb", False) else "mysql"
    inspector = sa.inspect(conn)
    where = display(conn.engine.url)
    # The tables the user can see (on the MySQL family, has_table() would DESCRIBE each, which a user without
    # privileges on a project table, such as a reader on the lease, is refused: exit 5 for nothing).
    tables = set() if dialect == "postgresql" and schema is None else set(inspector.get_table_names(schema=schema))
    missing = [t for t in REQUIRED_COLUMNS if t not in tables]
    if missing:
        raise BackfillError(
            f"{where} is not an MLflow tracking database (no table {', '.join(missing)}"
            + ((f" in schema {explicit!r}" if explicit else " on the search_path") if dialect == "postgresql" else "")
            + ")",
            ExitCode.NOT_MLFLOW,
        )
    _check_shape(inspector, schema, where)
    prefix = conn.dialect.identifier_preparer.quote_schema(schema) + "." if schema else ""
    return Target(
        dialect=dialect,
        flavor=flavor,
        schema=schema,
        database=database,
        prefix=prefix,
        has_runs=sql.RUNS_TABLE in tables,
        has_ledger=sql.LEDGER_TABLE in tables,
        has_lease=sql.LOCK_TABLE in tables,
    )


def _check_shape(inspector: sa.Inspector, schema: str | None, where: str) -> None:
    problems = []
    for table, needed in REQUIRED_COLUMNS.items():
        columns = {c["name"].lower() for c in inspector.get_columns(table, schema=schema)}
        lacking = [c for c in needed if c not in columns]
        if lacking:
            problems.append(f"{table} has no column {', '.join(lacking)}")
    # In the key's order (every dialect's inspector reports it so): the keyset walk reads one key's rows in
    # experiment_id order from this index, which (experiment_id, key) does not give.
    pk = tuple(c.lower() for c in inspector.get_pk_constraint("experiment_tags", schema=schema)["constrained_columns"])
    if pk != TAGS_PRIMARY_KEY:
        shown = f"({', '.join(pk)})" if pk else "missing"
        problems.append(f"experiment_tags' primary key is {shown}, not (key, experiment_id)")
    if problems:
        raise BackfillError(
            f"{where} does not have the MLflow schema this tool knows: {'; '.join(problems)}. Nothing was "
            "written. Upgrade the database with `mlflow db upgrade` (MLflow 2.0 or later), or use a version of "
            "this tool that knows this MLflow release",
            ExitCode.NOT_MLFLOW,
        )


def probe_privileges(conn: Connection, target: Target, revert: bool) -> None:
    """Fail before anything is written when the user may not write what `run` (or `revert`) writes: statements
    of the real ones' shape that match no row, on MLflow's tables and the project's that exist, rolled back
    (and, on PostgreSQL, whether the user may draw run ids, which a statement matching no row cannot tell)."""
    with transaction(conn, target.sql.begin_write, keep=False):
        for statement in target.sql.probes(revert, target.existing):
            conn.execute(sa.text(statement))
        if target.has_runs and target.sql.sequence_check:
            if conn.execute(sa.text(target.sql.sequence_check)).scalar() is False:
                raise BackfillError(
                    f"permission denied on the sequence of {target.prefix}{sql.RUNS_TABLE}.id: `run` and "
                    "`revert` record each run there (GRANT USAGE ON SEQUENCE "
                    f"{target.prefix}{sql.RUNS_TABLE}_id_seq TO <user>; docs/privileges.md)",
                    ExitCode.PERMISSION,
                )


def ensure_project_tables(
    conn: Connection, target: Target, write: Callable[[], AbstractContextManager[None]]
) -> Target:
    """The project's tables, created if missing, in a ``write`` of the lock's (which proves the lock is
    still this runner's); on the MySQL family, whose DDL commits at once, right after such a proof."""
    if target.has_runs and target.has_ledger:
        return target
    if target.dialect == "mysql":  # no transaction (nor savepoint) can hold DDL there
        with write():
            pass
        metadata.create_all(target.tables(conn), checkfirst=True)
    else:
        with write():
            metadata.create_all(target.tables(conn), checkfirst=True)
    return dataclasses.replace(target, has_runs=True, has_ledger=True, has_lease=True)
