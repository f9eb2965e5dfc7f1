"""The commands as a library: `status`, `verify`, `run` and `revert` on one database.

Each opens a connection, finds and checks the MLflow tables (``schema.py``), and for the writing
commands takes the single-runner lock (``lock.py``) before anything is written, the project's tables
included; the batches themselves are in ``walk.py``. Every statement runs under the watchdog's limits
(``retry.py``). Alembic's revision calls :meth:`Backfill.run_locked` / :meth:`Backfill.revert_locked`
with the connection and lock its ``env.py`` already holds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from backfill import record, signals
from backfill.connect import close, connect, recover, transaction
from backfill.errors import BackfillError, ExitCode, describe
from backfill.lock import RunnerLock
from backfill.retry import limits, stopped_answering, with_retries
from backfill.schema import Target, inspect_target, ledger, metadata
from backfill.walk import INT64_MIN, NoProgress, Progress, Report, Settings, after, binds, stopped


@dataclass
class Status:
    """What `status` reports. ``conflicts``: isGateway rows whose value is not exactly ``true``;
    ``orphans``: gateway tag rows whose experiment row is gone (nothing to tag; never counted missing)."""

    gateway: int
    deleted: int
    tagged: int
    missing: int
    conflicts: int
    orphans: int
    inserted_by_backfill: int
    last_run: dict[str, Any] | None


@dataclass
class RevertReport:
    removed: int
    batches: int
    seconds: float


class Backfill:
    """One database, one set of settings."""

    def __init__(self, engine: Engine, settings: Settings | None = None) -> None:
        self.engine = engine
        self.settings = settings or Settings()

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def session(self) -> Iterator[tuple[Connection, Target]]:
        """A connection under the watchdog's limits, and the checked MLflow target; failures as one line."""
        with limits(self.settings.timeouts):
            conn = connect(self.engine, self.settings.timeouts)
            try:
                target = with_retries(
                    self.settings.timeouts,
                    lambda: inspect_target(conn),
                    lambda: recover(conn),
                    self.engine.url,
                    what="connecting",
                )
                yield conn, target
            except SQLAlchemyError as exc:
                raise describe(exc, self.engine.url) from None
            finally:
                close(conn)

    def _retried(self, conn: Connection, step: Callable[[], Any]) -> Any:
        return with_retries(self.settings.timeouts, step, lambda: recover(conn), self.engine.url)

    # ---------------------------------------------------------------- read-only

    def status(self) -> Status:
        with self.session() as (conn, target):
            row = conn.execute(sa.text(target.sql.status), binds()).one()
            gateway, deleted, tagged, missing, orphans = (int(v or 0) for v in row)
            inserted = last = None
            if target.has_ledger:
                inserted = target.tables(conn).execute(sa.select(sa.func.count()).select_from(ledger)).scalar_one()
            if target.has_runs:
                last = record.last_run(conn, target)
            conflicts = gateway - tagged - missing
            return Status(gateway, deleted, tagged, missing, conflicts, orphans, int(inserted or 0), last)

    def missing(self) -> int:
        """How many gateway experiments lack isGateway: one query (verify, `run --dry-run`)."""
        with self.session() as (conn, target):
            return int(conn.execute(sa.text(target.sql.missing), binds()).scalar_one())

    # ---------------------------------------------------------------- run

    def run(
        self,
        dry_run: bool = False,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Report:
        """Insert every missing isGateway row. Raises BackfillError(STOPPED) when it stops early."""
        started = time.monotonic()
        if dry_run:
            would = self.missing()
            return Report(None, "dry-run", True, False, 0, would, 0, 0, 0, time.monotonic() - started)
        with self.session() as (conn, target), RunnerLock(conn, target) as lock:
            return self.run_locked(conn, target, lock, progress, should_stop)

    def run_locked(
        self,
        conn: Connection,
        target: Target,
        lock: RunnerLock,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        again: str = "`run`",
    ) -> Report:
        """`run` on a connection that holds the lock (the Alembic revision's way in). ``again``: the command
        that resumes, for the message of a stop."""
        from backfill.walk import Walk

        try:
            self._retried(conn, lambda: self._probe(conn, target.sql.begin_write, target.sql.probe_run))
            target = self._retried(conn, lambda: self._ensure_tables(conn, target))
        except BaseException as exc:
            error = stopped(exc, should_stop)
            if error is not None and error.code == ExitCode.STOPPED:
                raise BackfillError(f"{error}; nothing was written: {again} again to start", error.code) from None
            raise
        return Walk(conn, target, lock, self.settings, progress or NoProgress(), should_stop, again).run()

    @staticmethod
    def _probe(conn: Connection, begin: str, statements: tuple[str, ...]) -> None:
        """Fail before anything is written when the user may not write (statements that match no row,
        rolled back)."""
        conn.exec_driver_sql(begin)
        try:
            for statement in statements:
                conn.execute(sa.text(statement))
        finally:
            recover(conn)

    @staticmethod
    def _ensure_tables(conn: Connection, target: Target) -> Target:
        if target.has_runs and target.has_ledger:
            return target
        with transaction(conn, target.sql.begin_write):
            metadata.create_all(target.tables(conn), checkfirst=True)
        return dataclasses.replace(target, has_runs=True, has_ledger=True)

    # ---------------------------------------------------------------- revert

    def revert(self, should_stop: Callable[[], bool] = lambda: False) -> RevertReport:
        """Remove exactly the rows the ledger says this project inserted."""
        with self.session() as (conn, target):
            if not target.has_ledger:
                return RevertReport(0, 0, 0.0)
            with RunnerLock(conn, target) as lock:
                return self.revert_locked(conn, target, lock, should_stop)

    def revert_locked(
        self,
        conn: Connection,
        target: Target,
        lock: RunnerLock,
        should_stop: Callable[[], bool] = lambda: False,
        again: str = "`revert`",
    ) -> RevertReport:
        """`revert` on a connection that holds the lock. Needs only the ledger (not the runs table)."""
        started = time.monotonic()
        if not target.has_ledger:
            return RevertReport(0, 0, 0.0)
        claim = None
        removed = batches = 0
        lo: int | None = INT64_MIN
        try:
            self._retried(conn, lambda: self._probe(conn, target.sql.begin_write, target.sql.probe_revert))
            if target.has_runs:
                claim = self._retried(conn, lambda: record.claim(conn, target, "reverting"))
            while lo is not None:
                if should_stop():
                    raise BackfillError(getattr(should_stop, "reason", "stopped on request"), ExitCode.STOPPED)
                step = self._retried(conn, lambda lo=lo: self._revert_batch(conn, target, lock, lo))
                if step is None:
                    break
                hi, deleted = step
                removed += deleted
                batches += 1
                lo = after(hi)
                if self.settings.sleep:
                    time.sleep(self.settings.sleep)
            if target.has_runs:
                self._retried(conn, lambda: record.mark_reverted(conn, target))
        except BaseException as exc:
            error = stopped(exc, should_stop)
            if claim is not None and not stopped_answering(conn.engine):
                with signals.finishing(should_stop), _quietly():
                    recover(conn)
                    record.finish(conn, target, claim.run_id, "stopped", str(error or exc)[:500] or type(exc).__name__)
            if error is not None and error.code == ExitCode.STOPPED:
                raise BackfillError(
                    f"{error}; revert stopped: {removed} rows removed this time and the ledger lists the rest, "
                    f"which {again} again removes (do not `run`: it would insert them again)",
                    ExitCode.STOPPED,
                ) from None
            raise
        return RevertReport(removed, batches, time.monotonic() - started)

    def _revert_batch(self, conn: Connection, target: Target, lock: RunnerLock, lo: int) -> tuple[int, int] | None:
        """Delete the ledger's rows in the next keyset range; returns (upper end, tags deleted) or None."""
        lock.ensure()
        with transaction(conn, target.sql.begin_write):
            hi = conn.execute(sa.text(target.sql.revert_bound), {"lo": lo, "n": self.settings.batch_size}).scalar()
            if hi is None:
                return None
            tags, ledger_rows = target.sql.revert
            deleted = conn.execute(sa.text(tags), binds(lo=lo, hi=int(hi))).rowcount
            conn.execute(sa.text(ledger_rows), binds(lo=lo, hi=int(hi)))
        return int(hi), max(deleted, 0)

    def ledger_rows(self, conn: Connection, target: Target) -> int:
        """How many rows the ledger still lists (a ledger that lists rows is never dropped)."""
        if not target.has_ledger:
            return 0
        return int(target.tables(conn).execute(sa.select(sa.func.count()).select_from(ledger)).scalar_one())


@contextmanager
def _quietly() -> Iterator[None]:
    """For clean-up after a failure: the database may be gone, and the real error must win."""
    try:
        yield
    except Exception:  # noqa: BLE001
        pass
