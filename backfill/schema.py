"""The database the tool works on: which MLflow tables, their shape, and the project's own tables beside them.

MLflow's tables are never altered. The project's two tables live in the same schema as the MLflow tables
the tool works on (on PostgreSQL the schema ``experiment_tags`` resolves to through the session's
``search_path``, as MLflow itself resolves it; elsewhere the database itself):

* ``gateway_backfill_runs`` is the durable record of each run (cursor, counts, state): resume and audit.
* ``gateway_backfill_rows`` is the ledger: one row per isGateway tag this project inserted, so that
  ``revert`` removes exactly those rows and never one that MLflow or a user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table
from sqlalchemy.engine import Connection

from backfill import sql
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


runs = Table(sql.RUNS_TABLE, metadata, *runs_columns())
ledger = Table(sql.LEDGER_TABLE, metadata, *ledger_columns())

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

    @property
    def sql(self) -> sql.DialectSQL:
        return sql.statements(self.dialect, self.prefix)

    def tables(self, conn: Connection) -> Connection:
        """``conn`` with the project's Table objects mapped into the target's schema (same Connection)."""
        return conn.execution_options(schema_translate_map={None: self.schema})


def _pg_schema(conn: Connection) -> str | None:
    row = conn.execute(
        sa.text(
            "SELECT n.nspname, to_regclass(quote_ident(n.nspname) || '.experiments') IS NOT NULL"
            " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass('experiment_tags')"
        )
    ).first()
    if row is None:
        return None
    if not row[1]:
        raise BackfillError(
            f"schema {row[0]!r} holds experiment_tags but not experiments: not an MLflow schema the tool knows "
            "(set search_path, e.g. ?options=-csearch_path%3Dmlflow, to the schema of MLflow's tables)",
            ExitCode.NOT_MLFLOW,
        )
    return str(row[0])


def inspect_target(conn: Connection) -> Target:
    """Find the MLflow tables, check their shape, and see whether the project's tables exist.

    Refuses (exit 4, nothing written) a database without MLflow's tables, or whose tables differ from
    the shape the tool relies on (an MLflow that was never upgraded, or a future one that changed them).
    """
    dialect = conn.dialect.name
    schema = database = None
    flavor = dialect
    if dialect == "postgresql":
        schema = _pg_schema(conn)
    elif dialect == "mysql":
        database = conn.execute(sa.text("SELECT DATABASE()")).scalar()
        flavor = "mariadb" if getattr(conn.dialect, "is_mariadb", False) else "mysql"
    inspector = sa.inspect(conn)
    where = display(conn.engine.url)
    if dialect == "postgresql" and schema is None:
        missing = ["experiments", "experiment_tags"]
    else:
        missing = [t for t in REQUIRED_COLUMNS if not inspector.has_table(t, schema=schema)]
    if missing:
        raise BackfillError(
            f"{where} is not an MLflow tracking database (no table {', '.join(missing)}"
            + (" on the search_path" if dialect == "postgresql" else "")
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
        has_runs=inspector.has_table(sql.RUNS_TABLE, schema=schema),
        has_ledger=inspector.has_table(sql.LEDGER_TABLE, schema=schema),
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
