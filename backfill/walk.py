"""The batching walk: a keyset cursor and a small per-batch step (after Shopify's job-iteration).

A run walks the ``(key, experiment_id)`` primary key of ``experiment_tags`` from the first experiment
that is missing the tag, ``size`` sourceType rows at a time. Each batch is one short transaction that
inserts the missing isGateway rows of its id range, records them in the ledger and moves the run's
cursor. When the walk reaches the end, one read-only query looks for anything still missing (rows that
appeared below the cursor meanwhile) and, if it finds some, walks again from there.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill import record, signals
from backfill.connect import failure, read_whole_table, reading, recover
from backfill.errors import BackfillError, ExitCode
from backfill.lock import RunnerLock
from backfill.replicas import DEFAULT_MAX_LAG, DEFAULT_TIMEOUT, Lag, Replicas
from backfill.retry import Timeouts, stopped_answering, with_retries
from backfill.schema import Target, ledger
from backfill.sql import CONSTANTS

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# The first batch's size; later ones adapt to the time target. Small, so that the first batch on a busy
# database is short; the controller reaches the throughput plateau within a few batches (docs/benchmark.md).
DEFAULT_BATCH_SIZE = 2000


@dataclass(frozen=True)
class Settings:
    """How a run paces itself. Every field has a CLI option of the same name."""

    batch_size: int = DEFAULT_BATCH_SIZE
    min_batch_size: int = 50
    max_batch_size: int = 20_000
    target_batch_seconds: float = 0.15  # with the controller's overshoot, batches stay near 0.25 s at most
    sleep: float = 0.0
    max_rows_per_second: float | None = None
    max_passes: int = 3
    adaptive: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    schema: str | None = None  # PostgreSQL: the MLflow tables' schema (default: the search_path's)
    replicas: tuple[str, ...] = ()  # URLs of read replicas to wait for (replicas.py)
    max_replica_lag: float = DEFAULT_MAX_LAG
    replica_timeout: float = DEFAULT_TIMEOUT


@dataclass
class Report:
    """What `run` reports (and prints with --json). Counts are this invocation's; ``run_inserted`` is the
    run's total across resumes."""

    run_id: int | None
    state: str
    dry_run: bool
    resumed: bool
    inserted: int
    would_insert: int | None
    batches: int
    passes: int
    run_inserted: int
    seconds: float
    replica_wait_seconds: float = 0.0
    batch_seconds: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        times = data.pop("batch_seconds")
        data["batch_seconds_p50"] = round(statistics.median(times), 4) if times else None
        data["batch_seconds_p99"] = round(_percentile(times, 0.99), 4) if times else None
        data["batch_seconds_max"] = round(max(times), 4) if times else None
        data["seconds"] = round(self.seconds, 3)
        return data


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, scanned: int, inserted: int) -> None: ...
    def waiting(self, lag: Lag) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int) -> None: ...
    def advance(self, scanned: int, inserted: int) -> None: ...
    def waiting(self, lag: Lag) -> None: ...
    def close(self) -> None: ...


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def binds(**extra: Any) -> dict[str, Any]:
    return {**CONSTANTS, **extra}


def stopped(exc: BaseException, should_stop: Callable[[], bool]) -> BackfillError | None:
    """The BackfillError ``exc`` is, or the one a second signal (KeyboardInterrupt) stands for."""
    if isinstance(exc, BackfillError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        reason = getattr(should_stop, "reason", "interrupted")
        return BackfillError(f"{reason}, at once (the batch in flight was rolled back)", ExitCode.STOPPED)
    return None


def after(last: int) -> int | None:
    """Where the walk goes on after experiment id ``last`` (None: past the largest 64-bit id)."""
    return last + 1 if last < INT64_MAX else None


class _Walk:
    """What both walks share: a connection that holds the single-runner lock, the settings, the stop
    request, the command that resumes (for messages), the read replicas and progress."""

    def __init__(
        self,
        conn: Connection,
        target: Target,
        lock: RunnerLock,
        settings: Settings,
        should_stop: Callable[[], bool],
        again: str,
        replicas: Replicas | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.conn = conn
        self.target = target
        self.sql = target.sql
        self.lock = lock
        self.s = settings
        self.should_stop = should_stop
        self.again = again
        self.replicas = replicas
        self.progress = progress or NoProgress()

    def _retried(self, step: Callable[[], Any], before_retry: Callable[[], None] | None = None) -> Any:
        url = self.conn.engine.url
        return with_retries(
            self.s.timeouts, step, lambda: recover(self.conn), lambda e, c: failure(e, url, c), before_retry
        )

    def _stop_if_asked(self) -> None:
        if self.should_stop():
            raise BackfillError(getattr(self.should_stop, "reason", "stopped on request"), ExitCode.STOPPED)

    def _hold(self, when: str, everything: bool = False) -> None:
        """Wait while a replica lags (at the end: until every replica has replayed every batch)."""
        if self.replicas:
            limit = 0.0 if everything else self.s.max_replica_lag
            self.replicas.hold(limit, self.should_stop, self.progress.waiting, when)

    def _note(self) -> None:
        """After a batch committed: the position every replica must reach."""
        if self.replicas:
            self._retried(lambda: self.replicas.note(self.conn))  # type: ignore[union-attr]


class Walk(_Walk):
    """One invocation of `run` on a connection that holds the single-runner lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.size = self.s.batch_size
        self.batch_seconds: list[float] = []
        self.run_id: int | None = None

    def run(self) -> Report:
        started = time.monotonic()
        claim = self._retried(lambda: record.claim(self.lock, "running"))
        self.run_id = claim.run_id
        inserted = batches = passes = 0
        lo: int | None = None
        final_wait = False
        try:
            self._note()  # a resumed run also waits until the replicas have what earlier invocations wrote
            lo = after(claim.last_id) if claim.last_id is not None else None
            if lo is None:
                lo = self._next_pass()
            passes += lo is not None
            if lo is not None:
                self.progress.start(self._remaining(lo))
            while lo is not None:
                self._stop_if_asked()
                self._hold("before the next batch")
                t0 = time.monotonic()
                step = self._retried(lambda lo=lo: self._step(lo), self._shrink)
                if step is not None:
                    self._note()
                    hi, scanned, added, elapsed = step
                    inserted += added
                    batches += 1
                    self.batch_seconds.append(elapsed)
                    self.progress.advance(scanned, added)
                    self._adapt(elapsed)
                    self._throttle(time.monotonic() - t0, scanned)
                    lo = after(hi)
                    if lo is not None:
                        continue
                # End of this walk: is anything left, or did something appear below the cursor?
                lo = self._next_pass()
                if lo is None:
                    break
                passes += 1
                if passes > self.s.max_passes:
                    raise BackfillError(
                        f"gateway experiments are still appearing without isGateway after {self.s.max_passes} "
                        "passes (a writer older than MLflow 3.10.1 is probably still running)",
                        ExitCode.STOPPED,
                    )
                self.progress.start(self._remaining(lo))
            final_wait = True
            self._hold("after the last batch", everything=True)
            self._record_end("done", None)
        except BaseException as exc:
            error = stopped(exc, self.should_stop)
            with signals.finishing(self.should_stop):
                self._record_end("stopped", str(error or exc)[:500] or type(exc).__name__)
            if error is not None and error.code in (ExitCode.STOPPED, ExitCode.LOCKED):
                where = f"experiment id {lo}" if lo is not None else "the first experiment still missing the tag"
                go_on = (
                    f"every batch is written ({inserted} rows this time) but not yet on every replica: "
                    f"{self.again} again waits for them"
                    if final_wait
                    else f"nothing is half-written: {inserted} rows inserted this time, "
                    f"{self.again} again to resume from {where}"
                )
                raise BackfillError(f"{error}; {go_on} (run {claim.run_id})", error.code) from None
            raise
        finally:
            self.progress.close()
        return Report(
            claim.run_id,
            "done",
            False,
            claim.resumed,
            inserted,
            None,
            batches,
            passes,
            claim.inserted_before + inserted,
            time.monotonic() - started,
            self.replicas.waited if self.replicas else 0.0,
            self.batch_seconds,
        )

    def _record_end(self, state: str, message: str | None) -> None:
        assert self.run_id is not None
        if stopped_answering(self.conn.engine):
            return  # the run row still says `running`; the next run takes it over all the same
        try:
            recover(self.conn)
            record.finish(self.lock, self.run_id, state, message)
        except Exception:  # noqa: BLE001 - the database may be gone (or, on SQLite, held by another writer):
            pass  # the run row then still says `running`, which the next run takes over all the same.

    # -- queries

    def _next_pass(self) -> int | None:
        """The first experiment that still needs the tag (starting a walk there), or None."""

        def find() -> int | None:
            first = read_whole_table(self.conn, self.sql.whole_table_setup, self.sql.first_missing, binds())
            if first is not None:
                record.start_pass(self.lock, self.run_id or 0)
            return None if first is None else int(first)

        return self._retried(find)

    def _remaining(self, lo: int) -> int:
        def count() -> int:
            with reading(self.conn):
                return int(self.conn.execute(sa.text(self.sql.count_from), binds(lo=lo)).scalar_one())

        return int(self._retried(count))

    # -- one batch

    def _shrink(self) -> None:
        self.size = max(self.s.min_batch_size, self.size // 2)

    def _step(self, lo: int) -> tuple[int, int, int, float] | None:
        conn = self.conn
        t0 = time.monotonic()
        with self.lock.write():
            hi, scanned = conn.execute(sa.text(self.sql.next_bound), binds(lo=lo, n=self.size)).one()
            if hi is None:
                return None
            hi = int(hi)
            values = binds(lo=lo, hi=hi, run=self.run_id, now=record.now_ns())
            added = 0
            for statement in self.sql.batch:
                added = conn.execute(sa.text(statement), values).rowcount
            added = max(added, 0)
            record.advance(conn, self.target, self.run_id or 0, hi, added)
        return hi, int(scanned), added, time.monotonic() - t0

    # -- pacing

    def _adapt(self, elapsed: float) -> None:
        """Aim at the target time per batch: grow by at most 1.5x a step, shrink as far as needed."""
        if not self.s.adaptive or elapsed <= 0:
            return
        ideal = self.size * self.s.target_batch_seconds / elapsed
        grown = math.ceil(min(ideal, self.size * 1.5))
        self.size = int(min(self.s.max_batch_size, max(self.s.min_batch_size, grown)))

    def _throttle(self, elapsed: float, scanned: int) -> None:
        pause = self.s.sleep
        if self.s.max_rows_per_second:
            pause = max(pause, scanned / self.s.max_rows_per_second - elapsed)
        if pause > 0:
            time.sleep(pause)


@dataclass
class RevertReport:
    """What `revert` reports (and prints with --json)."""

    removed: int
    batches: int
    seconds: float
    replica_wait_seconds: float = 0.0


class RevertWalk(_Walk):
    """One invocation of `revert`: the ledger's keyset, a batch of its rows at a time, on a connection that
    holds the single-runner lock. Needs only the ledger (the runs table is optional)."""

    def run(self) -> RevertReport:
        started = time.monotonic()
        conn, target = self.conn, self.target
        claim = None
        removed = batches = 0
        lo: int | None = INT64_MIN
        final_wait = False
        try:
            if target.has_runs:
                claim = self._retried(lambda: record.claim(self.lock, "reverting"))
            self._note()  # a resumed revert also waits until the replicas have what earlier ones removed
            while lo is not None:
                self._stop_if_asked()
                self._hold("before the next batch")
                step = self._retried(lambda lo=lo: self._batch(lo))
                if step is None:
                    break
                self._note()
                hi, deleted = step
                removed += deleted
                batches += 1
                lo = after(hi)
                if self.s.sleep:
                    time.sleep(self.s.sleep)
            final_wait = True
            self._hold("after the last batch", everything=True)
            final_wait = False
            if target.has_runs:
                self._retried(lambda: record.mark_reverted(self.lock))
        except BaseException as exc:
            error = stopped(exc, self.should_stop)
            if claim is not None and not stopped_answering(conn.engine):
                with signals.finishing(self.should_stop), suppress(Exception):
                    recover(conn)
                    record.finish(self.lock, claim.run_id, "stopped", str(error or exc)[:500] or type(exc).__name__)
            if error is not None and error.code == ExitCode.STOPPED:
                with signals.finishing(self.should_stop):
                    left = self._ledger_left()
                if left == 0:
                    rest = f"every row this tool inserted is removed ({removed} this time)"
                    if final_wait:
                        rest += ", but a replica had not replayed the removal yet"
                else:
                    listed = "the rest" if left is None else f"{left} more"
                    rest = (
                        f"{removed} rows removed this time and the ledger lists {listed}, which {self.again} again "
                        "removes (do not `run`: it would insert them again)"
                    )
                raise BackfillError(f"{error}; revert stopped: {rest}", ExitCode.STOPPED) from None
            raise
        waited = self.replicas.waited if self.replicas else 0.0
        return RevertReport(removed, batches, time.monotonic() - started, waited)

    def _ledger_left(self) -> int | None:
        """How many rows the ledger still lists, when that can be told now (the server may be gone)."""
        if stopped_answering(self.conn.engine):
            return None
        try:
            recover(self.conn)
            query = sa.select(sa.func.count()).select_from(ledger)
            with reading(self.conn):
                return int(self.target.tables(self.conn).execute(query).scalar_one())
        except Exception:  # noqa: BLE001 - the message then says less, and the error that stopped it stands
            return None

    def _batch(self, lo: int) -> tuple[int, int] | None:
        """Delete the ledger's rows in the next keyset range; returns (upper end, tags deleted) or None."""
        conn = self.conn
        with self.lock.write():
            hi = conn.execute(sa.text(self.sql.revert_bound), {"lo": lo, "n": self.s.batch_size}).scalar()
            if hi is None:
                return None
            tags, ledger_rows = self.sql.revert
            deleted = conn.execute(sa.text(tags), binds(lo=lo, hi=int(hi))).rowcount
            conn.execute(sa.text(ledger_rows), binds(lo=lo, hi=int(hi)))
        return int(hi), max(deleted, 0)
