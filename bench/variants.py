"""Prototype changes to the backfill package, measured by the benchmark before they are proposed.

Each variant patches :mod:`backfill` in the process that runs it (bench.child applies it before the CLI
starts), so a proposal is measured through exactly the code path users run. The proposed diffs for
backfill/ are in the benchmark's report; ``trace`` is a profiling aid, not a proposal.
"""

from __future__ import annotations

import atexit
import sys
import time
from collections import defaultdict
from collections.abc import Callable

VARIANTS: dict[str, Callable[[], None]] = {}


def variant(func: Callable[[], None]) -> Callable[[], None]:
    VARIANTS[func.__name__.replace("_", "-")] = func
    return func


def apply(names: str) -> None:
    """Apply the comma-separated prototypes ``names`` (keys of VARIANTS) in this process."""
    for name in names.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
        VARIANTS[name]()


@variant
def trace() -> None:
    """Time every statement and COMMIT the run sends; print the totals per statement shape to stderr at exit."""
    import sqlalchemy as sa
    from sqlalchemy import event

    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    started = time.perf_counter()

    @event.listens_for(sa.engine.Engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        conn.info["t0"] = time.perf_counter()

    @event.listens_for(sa.engine.Engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        entry = totals[" ".join(statement.split())[:110]]
        entry[0] += 1
        entry[1] += time.perf_counter() - conn.info.pop("t0", time.perf_counter())

    real_commit = sa.engine.Connection._commit_impl

    def _commit(self):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return real_commit(self)
        finally:
            entry = totals["COMMIT"]
            entry[0] += 1
            entry[1] += time.perf_counter() - t0

    sa.engine.Connection._commit_impl = _commit  # type: ignore[method-assign]

    def report() -> None:
        wall = time.perf_counter() - started
        print(f"trace: {wall:.3f}s in the process after start-up", file=sys.stderr)
        for statement, (count, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:14]:
            print(f"trace: {seconds:8.3f}s {count:5d}x  {statement}", file=sys.stderr)

    atexit.register(report)


@variant
def mariadb_returning() -> None:
    """MariaDB (10.5+): one ``INSERT IGNORE ... SELECT ... RETURNING`` per batch instead of lock + ledger + insert.

    RETURNING lists exactly the rows this statement inserted (an ignored duplicate is not returned), so the
    ledger stays exact without locking the experiments first, and the anti-join runs once per batch, not twice.
    IGNORE can only skip a duplicate (wanted) or a foreign-key miss (an experiment removed meanwhile: then
    nothing was inserted and nothing is recorded); the values are constants that fit their columns.
    MySQL 8 has no RETURNING and keeps the locking path.
    """
    import sqlalchemy as sa

    from backfill import job, sql

    original_step = job._Walk._step
    k = "`key`"

    def step(self: job._Walk, cursor: int) -> tuple[int, int, int, float] | None:
        conn = self.conn
        dialect = conn.dialect
        if not (dialect.name == "mysql" and dialect.is_mariadb and dialect.server_version_info >= (10, 5)):
            return original_step(self, cursor)
        self.lock.ensure()
        t0 = time.monotonic()
        with job._write_transaction(conn):
            self.job._per_transaction(conn)
            hi, scanned = conn.execute(sa.text(self.sql.next_bound), job._binds(lo=cursor, n=self.size)).one()
            if hi is None:
                return None
            hi = int(hi)
            binds = job._binds(lo=cursor, hi=hi, run=self.run_id, now=job._now_ns())
            insert = (
                f"INSERT IGNORE INTO experiment_tags ({k}, value, experiment_id)"
                f" {sql._candidates('mysql', ':isgw, :tv, s.experiment_id', True)} RETURNING experiment_id"
            )
            ids = conn.execute(sa.text(insert), binds).scalars().all()
            if ids:
                ledger = (
                    f"{sql._LEDGER_INSERT} SELECT e.experiment_id, e.creation_time, :run, :now FROM experiments e"
                    " WHERE e.experiment_id > :lo AND e.experiment_id <= :hi AND e.experiment_id IN :ids"
                    " ON DUPLICATE KEY UPDATE experiment_created = VALUES(experiment_created), run_id = VALUES(run_id),"
                    " inserted_at_ns = VALUES(inserted_at_ns)"
                )
                statement = sa.text(ledger).bindparams(sa.bindparam("ids", expanding=True))
                conn.execute(statement, {**binds, "ids": ids})
            conn.execute(
                job.runs.update()
                .where(job.runs.c.id == self.run_id)
                .values(
                    last_id=hi,
                    batches=job.runs.c.batches + 1,
                    inserted=job.runs.c.inserted + len(ids),
                    updated_at_ns=job._now_ns(),
                )
            )
        return hi, int(scanned), len(ids), time.monotonic() - t0

    job._Walk._step = step  # type: ignore[method-assign]


@variant
def pg_batch_ledger() -> None:
    """PostgreSQL: one ledger row per batch (arrays of ids and creation times) instead of one per tag.

    Measures what the per-row ledger costs; a real change needs a migration and an unnesting revert. The
    run's ``inserted`` count then reads one per batch (the rowcount of the ledger insert).
    """
    from backfill import sql

    original = sql._batch

    def batch(dialect: str, bounded: bool, *args: object, **kwargs: object) -> tuple[str, ...]:
        if dialect != "postgresql":
            return original(dialect, bounded, *args, **kwargs)  # type: ignore[arg-type]
        cte = original(dialect, bounded, *args, **kwargs)[0].split(f" {sql._LEDGER_INSERT}")[0]  # type: ignore[arg-type]
        return (
            "CREATE TABLE IF NOT EXISTS gateway_backfill_batches"
            " (run_id INTEGER, inserted_at_ns BIGINT NOT NULL, ids INTEGER[] NOT NULL, created BIGINT[] NOT NULL)",
            f"{cte} INSERT INTO gateway_backfill_batches (run_id, inserted_at_ns, ids, created)"
            " SELECT :run, :now, array_agg(ins.experiment_id), array_agg(e.creation_time)"
            " FROM ins JOIN experiments e ON e.experiment_id = ins.experiment_id HAVING COUNT(*) > 0",
        )

    sql._batch = batch  # type: ignore[assignment]
