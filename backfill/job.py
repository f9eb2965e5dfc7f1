"""The commands as a library: `status`, `verify`, `run` and `revert` on one database.

Each opens a connection and finds and checks the MLflow tables (``schema.py``). The writing commands then
check the read replicas and the user's privileges, take the single-runner lock (``lock.py``) and only then
write; the batches themselves are in ``walk.py``. Every statement runs under the watchdog's limits
(``retry.py``). Alembic's revision calls :meth:`Backfill.run_locked` / :meth:`Backfill.revert_locked` with
the connection and lock its ``env.py`` already holds.
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

from backfill import record
from backfill.connect import close, connect, create_engine, failure, read_whole_table, reading, recover
from backfill.errors import BackfillError, ExitCode
from backfill.lock import RunnerLock, runner_lock
from backfill.replicas import Replicas
from backfill.retry import limits, with_retries
from backfill.schema import Target, ensure_project_tables, inspect_target, ledger, probe_privileges
from backfill.urls import parse_url
from backfill.walk import Progress, Report, RevertReport, RevertWalk, Settings, Walk, binds, stopped


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
                target = self._retried(conn, lambda: inspect_target(conn, self.settings.schema), setting_up=True)
                yield conn, target
            except SQLAlchemyError as exc:
                raise failure(exc, self.engine.url) from None
            finally:
                close(conn)

    def _retried(self, conn: Connection, step: Callable[[], Any], setting_up: bool = False) -> Any:
        """``step`` with the retry policy; ``setting_up``: nothing is under way yet (a failure to reach the
        server is then exit 3, not a resumable stop)."""
        url = self.engine.url
        return with_retries(
            self.settings.timeouts,
            step,
            lambda: recover(conn),
            lambda exc, _connecting: failure(exc, url),
            what="setting up" if setting_up else "",
        )

    def lock(self, conn: Connection, target: Target) -> RunnerLock:
        """The single-runner lock on ``conn`` (its heartbeat, if any, on a connection of its own)."""
        return runner_lock(conn, target, lambda: connect(self.engine, self.settings.timeouts))

    # ---------------------------------------------------------------- read-only

    def status(self) -> Status:
        with self.session() as (conn, target), reading(conn):
            row = conn.execute(sa.text(target.sql.status), binds()).one()
            gateway, deleted, tagged, missing, orphans = (int(v or 0) for v in row)
            inserted = last = None
            if target.has_ledger:
                inserted = target.tables(conn).execute(sa.select(sa.func.count()).select_from(ledger)).scalar_one()
            if target.has_runs:
                last = record.last_run(conn, target)
            conflicts = gateway - tagged - missing
            return Status(gateway, deleted, tagged, missing, conflicts, orphans, int(inserted or 0), last)

    def replica_report(self, urls: list[str], settle: float = 2.0) -> list[dict[str, Any]]:
        """Each replica: has it replayed the primary's current position (given ``settle`` seconds), and how
        many gateway experiments does it show without isGateway? Read-only on both sides."""
        if not urls:
            return []
        with self.session() as (conn, target), self._replicas(target, urls) as replicas:
            assert replicas is not None
            self._retried(conn, lambda: replicas.note(conn))
            lags = replicas.settle(settle)
        report = []
        for url, lag in zip(urls, lags, strict=True):
            replica = Backfill(create_engine(parse_url(url), self.settings.timeouts, read_only=True), self.settings)
            try:
                missing: int | None = replica.missing()
            except BackfillError as exc:
                missing, lag = None, dataclasses.replace(lag, reason=lag.reason or str(exc))
            caught_up = not lag.pending and not lag.reason
            report.append(
                {"replica": lag.replica, "caught_up": caught_up, "lag_seconds": round(lag.seconds, 2)}
                | {"missing": missing, "reason": lag.reason}
            )
        return report

    def missing(self) -> int:
        """How many gateway experiments lack isGateway: one query (verify, `run --dry-run`)."""
        with self.session() as (conn, target):
            return int(read_whole_table(conn, target.sql.whole_table_setup, target.sql.missing, binds()))

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
        with self.session() as (conn, target):
            with self._checked_and_locked(conn, target, should_stop, "`run`") as lock:
                return self._run(conn, target, lock, progress, should_stop, "`run`")

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
        self._check_before_writing(conn, target, should_stop, again)
        return self._run(conn, target, lock, progress, should_stop, again)

    def _run(
        self,
        conn: Connection,
        target: Target,
        lock: RunnerLock,
        progress: Progress | None,
        should_stop: Callable[[], bool],
        again: str,
    ) -> Report:
        with _before_writing(should_stop, f"nothing was written: {again} again to start"):
            target = self._retried(conn, lambda: ensure_project_tables(lock.conn, target, lock.write))
        with self._replicas(target) as replicas:
            return Walk(conn, target, lock, self.settings, should_stop, again, replicas, progress).run()

    @contextmanager
    def _checked_and_locked(
        self, conn: Connection, target: Target, should_stop: Callable[[], bool], again: str, revert: bool = False
    ) -> Iterator[RunnerLock]:
        """The checks before anything is written, and the single-runner lock. A lock whose taking writes to
        the database (the lease) is taken after the checks, so a refused user writes nothing; SQLite's file
        lock first, so a second runner is told at once rather than after waiting on the first one's writes."""
        lock = self.lock(conn, target)
        try:
            if not lock.writes:
                lock.acquire(should_stop)
            self._check_before_writing(conn, target, should_stop, again, revert)
            if lock.writes:
                lock.acquire(should_stop)
            yield lock
        finally:
            lock.release()

    def _check_before_writing(
        self, conn: Connection, target: Target, should_stop: Callable[[], bool], again: str, revert: bool = False
    ) -> None:
        """Fail before anything is written: a replica URL that is not a replica of this primary, or a user
        who may not write (statements of the real ones' shape that match no row, rolled back)."""
        nothing = "nothing was removed" if revert else "nothing was written"
        with _before_writing(should_stop, f"{nothing}: {again} again to start"):
            self.check_replicas(conn, target)
            self._retried(conn, lambda: probe_privileges(conn, target, revert), setting_up=True)

    def check_replicas(self, conn: Connection, target: Target) -> None:
        """Every replica URL answers and is a replica of this primary (else exit 2 or 3, nothing written)."""
        with self._replicas(target) as replicas:
            if replicas:
                replicas.check(conn)

    @contextmanager
    def _replicas(self, target: Target, urls: list[str] | None = None) -> Iterator[Replicas | None]:
        """The read replicas (``urls``, else settings.replicas), or None."""
        urls = list(self.settings.replicas) if urls is None else urls
        if not urls:
            yield None
            return
        if target.dialect == "sqlite":
            raise BackfillError("SQLite has no read replicas: drop --replica-url", ExitCode.USAGE)
        s = self.settings
        replicas = Replicas(urls, target.flavor, s.timeouts, s.max_replica_lag, s.replica_timeout)
        try:
            yield replicas
        finally:
            replicas.close()

    # ---------------------------------------------------------------- revert

    def revert(self, should_stop: Callable[[], bool] = lambda: False, progress: Progress | None = None) -> RevertReport:
        """Remove exactly the rows the ledger says this project inserted."""
        with self.session() as (conn, target):
            if not target.has_ledger:
                return RevertReport(0, 0, 0.0)
            with self._checked_and_locked(conn, target, should_stop, "`revert`", revert=True) as lock:
                return self._revert(conn, target, lock, should_stop, "`revert`", progress)

    def revert_locked(
        self,
        conn: Connection,
        target: Target,
        lock: RunnerLock,
        should_stop: Callable[[], bool] = lambda: False,
        again: str = "`revert`",
        progress: Progress | None = None,
    ) -> RevertReport:
        """`revert` on a connection that holds the lock. Needs only the ledger (not the runs table)."""
        if not target.has_ledger:
            return RevertReport(0, 0, 0.0)
        self._check_before_writing(conn, target, should_stop, again, revert=True)
        return self._revert(conn, target, lock, should_stop, again, progress)

    def _revert(
        self,
        conn: Connection,
        target: Target,
        lock: RunnerLock,
        should_stop: Callable[[], bool],
        again: str,
        progress: Progress | None = None,
    ) -> RevertReport:
        with self._replicas(target) as replicas:
            return RevertWalk(conn, target, lock, self.settings, should_stop, again, replicas, progress).run()

    def ledger_rows(self, conn: Connection, target: Target) -> int:
        """How many rows the ledger still lists (a ledger that lists rows is never dropped)."""
        if not target.has_ledger:
            return 0
        with reading(conn):
            return int(target.tables(conn).execute(sa.select(sa.func.count()).select_from(ledger)).scalar_one())


@contextmanager
def _before_writing(should_stop: Callable[[], bool], how_to_go_on: str) -> Iterator[None]:
    """A stop before the first write says that nothing was written, and how to start again."""
    try:
        yield
    except BaseException as exc:
        error = stopped(exc, should_stop)
        if error is not None and error.code == ExitCode.STOPPED:
            raise BackfillError(f"{error}; {how_to_go_on}", error.code) from None
        raise
