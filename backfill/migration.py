"""What the Alembic revision runs, and what ``migrations/env.py`` hands it.

``env.py`` checks the database, takes the single-runner lock on a connection of its own and puts that
connection, the lock and the signal handler in ``config.attributes["gateway_backfill"]``; the revision
runs the same batched job as ``mlflow-gateway-backfill run`` on it. Alembic's own connection only
creates and stamps the version table, so Alembic's transactions and the batches' never mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.engine import Connection, Engine

from backfill.connect import close, connect, prepare_session
from backfill.errors import BackfillError, ExitCode
from backfill.job import Backfill
from backfill.lock import RunnerLock
from backfill.retry import Timeouts
from backfill.schema import Target
from backfill.walk import Settings

KEY = "gateway_backfill"


@dataclass
class Shared:
    """What env.py hands the revision."""

    conn: Connection
    target: Target
    lock: RunnerLock
    should_stop: Callable[[], bool]
    settings: Settings

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


def upgrade(attributes: dict) -> None:
    s = shared(attributes)
    s.job.run_locked(s.conn, s.target, s.lock, should_stop=s.should_stop, again="`alembic upgrade head`")


def downgrade(attributes: dict) -> None:
    """Remove exactly the ledger's rows; then the project's tables may go, and only if the ledger is empty."""
    s = shared(attributes)
    job = s.job
    job.revert_locked(s.conn, s.target, s.lock, should_stop=s.should_stop, again="`alembic downgrade`")
    left = job.ledger_rows(s.conn, s.target)
    if left:
        raise BackfillError(
            f"the ledger still lists {left} rows this tool inserted: it is kept, so that `revert` can remove them",
            ExitCode.STOPPED,
        )
