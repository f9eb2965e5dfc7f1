"""What the Alembic revision runs, and what ``migrations/env.py`` hands it.

``env.py`` checks the database, takes the single-runner lock on a connection of its own and puts that
connection, the lock and the signal handler in ``config.attributes["gateway_backfill"]``; the revision
runs the same batched job as ``mlflow-gateway-backfill run`` on it. Alembic's own connection only
creates and stamps the version table, so Alembic's transactions and the batches' never mix.

Handed a connection inside a transaction of the caller's (``with engine.begin() as conn``, Alembic's recipe
for sharing a connection; pytest-alembic), the job runs on that connection instead, each batch a savepoint
of the caller's transaction: nothing is committed by the tool, and the caller's commit or rollback decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, Engine

from backfill.connect import close, connect, prepare_session
from backfill.errors import BackfillError, ExitCode
from backfill.job import Backfill
from backfill.lock import RunnerLock
from backfill.retry import Timeouts
from backfill.schema import Target
from backfill.walk import Progress, Settings

KEY = "gateway_backfill"


@dataclass
class Shared:
    """What env.py hands the revision."""

    conn: Connection
    target: Target
    lock: RunnerLock
    should_stop: Callable[[], bool]
    settings: Settings
    in_callers_transaction: bool = False  # the job's connection is the caller's, inside its transaction
    progress: Progress | None = None  # where replica waits are reported (Alembic's command line: stderr)

    @property
    def job(self) -> Backfill:
        return Backfill(self.conn.engine, self.settings)


def open_connection(engine: Engine, timeouts: Timeouts) -> Connection:
    """An autocommit connection for the batches (and the lease's heartbeat): of the tool's own engine, or of
    an application's engine (then with the tool's limits applied to the transactions it begins)."""
    if getattr(engine, "_mgb_owned", False):
        return connect(engine, timeouts)
    return prepare_session(engine.connect().execution_options(isolation_level="AUTOCOMMIT"), timeouts)


@contextmanager
def job_connection(engine: Engine, timeouts: Timeouts) -> Iterator[Connection]:
    conn = open_connection(engine, timeouts)
    try:
        yield conn
    finally:
        close(conn)


def shared(attributes: dict) -> Shared:
    found = attributes.get(KEY)
    if not isinstance(found, Shared):
        raise BackfillError(
            "the gateway backfill revision must run through this project's migrations/env.py "
            "(it takes the single-runner lock first)",
            ExitCode.USAGE,
        )
    return found


def batches(attributes: dict, migration_context: MigrationContext) -> AbstractContextManager[None]:
    """Where the revision's batches run: outside Alembic's transaction, each committing on its own; or inside
    the caller's transaction, when the connection was handed over in one."""
    if shared(attributes).in_callers_transaction:
        return nullcontext()
    return migration_context.autocommit_block()


def upgrade(attributes: dict) -> None:
    s = shared(attributes)
    s.job.run_locked(s.conn, s.target, s.lock, s.progress, s.should_stop, again="`alembic upgrade head`")


def downgrade(attributes: dict) -> None:
    """Remove exactly the ledger's rows; then the project's tables may go, and only if the ledger is empty."""
    s = shared(attributes)
    job = s.job
    job.revert_locked(s.conn, s.target, s.lock, s.should_stop, "`alembic downgrade`", s.progress)
    left = job.ledger_rows(s.conn, s.target)
    if left:
        raise BackfillError(
            f"the ledger still lists {left} rows this tool inserted: it is kept, so that `revert` can remove them",
            ExitCode.STOPPED,
        )
