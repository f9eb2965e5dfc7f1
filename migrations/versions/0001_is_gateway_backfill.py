"""Backfill mlflow.experiment.isGateway=true on gateway experiments made by MLflow 3.10.0.

Online, the upgrade runs the same batched job as ``mlflow-gateway-backfill run`` (it creates the
project's two tables under the single-runner lock) inside ``autocommit_block()``, on the connection and
lock ``env.py`` holds, so each batch commits on its own and a large table is never held in one long
transaction (on a connection handed over inside a transaction of the caller's, inside that transaction
instead: ``backfill/migration.py``). Offline (``--sql``) it renders one idempotent statement set for the
URL's dialect, without reading the database.

The downgrade removes exactly the rows recorded in the ledger, then drops the project's tables (the lease
table too; a runner that holds the lease meanwhile is refused its next write); a ledger that still lists
rows is never dropped. MLflow's own tables keep their structure either way.

Revision ID: gateway_backfill_0001
Revises:
"""

from __future__ import annotations

import re
import time

import sqlalchemy as sa
from alembic import context, op

from backfill import migration, sql
from backfill.schema import lease, ledger, ledger_columns, runs, runs_columns

revision = "gateway_backfill_0001"
down_revision = None
branch_labels = None
depends_on = None


def _execute_all(statements: tuple[str, ...], **binds: object) -> None:
    """Emit statements with their parameters rendered as literals (offline mode)."""
    values = {**sql.CONSTANTS, **binds}
    for statement in statements:
        used = set(re.findall(r"(?<!:):(\w+)", statement))
        op.execute(sa.text(statement).bindparams(**{k: v for k, v in values.items() if k in used}))


def upgrade() -> None:
    if context.is_offline_mode():
        op.create_table(runs.name, *runs_columns(), if_not_exists=True)
        op.create_table(ledger.name, *ledger_columns(), if_not_exists=True)
        # run_id NULL marks rows inserted by the script; the timestamp doubles as the batch identifier.
        _execute_all(sql.offline_backfill(op.get_context().dialect.name), run=None, now=time.time_ns())
        return
    with migration.batches(context.config.attributes, op.get_context()):
        migration.upgrade(context.config.attributes)


def downgrade() -> None:
    if context.is_offline_mode():
        _execute_all(sql.offline_revert(op.get_context().dialect.name))
        for table in (ledger, runs, lease):
            op.drop_table(table.name, if_exists=True)
        return
    with migration.batches(context.config.attributes, op.get_context()):
        migration.downgrade(context.config.attributes)
    schema = migration.shared(context.config.attributes).target.schema
    for table in (ledger, runs, lease):  # the lease last: the lock is held until the command ends
        op.drop_table(table.name, schema=schema, if_exists=True)
