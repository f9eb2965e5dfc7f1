"""Prototype changes to the backfill package, measured by the benchmark before they are proposed.

Each variant patches :mod:`backfill` in the process that runs it (bench.child applies it before the CLI
starts), so a proposal is measured through exactly the code path users run. ``trace`` is a profiling aid
(seconds per statement shape, in the results' ``runs[].trace``); ``pg-batch-ledger`` is the rejected
cheaper ledger the README's benchmark section discusses. Comma-separate names to combine them:
``python -m bench --variant trace,pg-batch-ledger --backends postgresql``.
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
