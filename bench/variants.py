"""Prototype changes to the backfill package, measured by the benchmark before they are proposed.

Each variant patches :mod:`backfill` in the process that runs it (bench.child applies it before the CLI
starts), so a proposal is measured through exactly the code path users run. ``trace`` is a profiling aid
(seconds per statement shape, in the results' ``runs[].trace``). Comma-separate names to combine them:
``python -m bench --variant trace --backends postgresql``.
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
    """Time every statement the run sends (its engines are autocommit: BEGIN and COMMIT are statements too);
    print the totals per statement shape to stderr at exit."""
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

    def report() -> None:
        wall = time.perf_counter() - started
        print(f"trace: {wall:.3f}s in the process after start-up", file=sys.stderr)
        for statement, (count, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:14]:
            print(f"trace: {seconds:8.3f}s {count:5d}x  {statement}", file=sys.stderr)

    atexit.register(report)
