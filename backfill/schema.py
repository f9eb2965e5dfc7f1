"""The project's own tables. MLflow's tables are never altered; these sit beside them.

``gateway_backfill_runs`` is the durable record of each run (cursor, counts, state), which makes resume
and the audit trail possible. ``gateway_backfill_rows`` is the ledger: one row per isGateway tag this
project inserted, so that ``revert`` removes exactly those rows and never one that MLflow or a user wrote.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table

from backfill.sql import LEDGER_TABLE, RUNS_TABLE

metadata = MetaData()


def runs_columns() -> list[Column]:
    """Fresh Column objects (a Column belongs to one table), for the Table below and the migration."""
    return [
        Column("id", Integer, primary_key=True, autoincrement=True),
        # running | done | stopped (interrupted or gave up after retries: resumable) | reverted
        Column("state", String(16), nullable=False),
        Column("started_at_ns", BigInteger, nullable=False),
        Column("updated_at_ns", BigInteger, nullable=False),
        Column("last_id", BigInteger, nullable=True),  # the cursor: last experiment_id done in this pass
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


runs = Table(RUNS_TABLE, metadata, *runs_columns())
ledger = Table(LEDGER_TABLE, metadata, *ledger_columns())
