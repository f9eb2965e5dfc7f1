"""The run record: one row of ``gateway_backfill_runs`` per run, holding its state, cursor and counts.

A batch moves its run's cursor in the batch's own transaction, so a run killed at any point, SIGKILL
included, leaves whole batches and a cursor that agrees with them; the next `run` takes the latest
unfinished run over (the single-runner lock guarantees nobody else is working on it) and resumes there.
Every write goes through the lock's :meth:`~backfill.lock.RunnerLock.write`, which proves in the same
transaction that this runner still holds the lock.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill.lock import RunnerLock
from backfill.schema import Target, runs


@dataclass(frozen=True)
class Claim:
    """A run this invocation works on: its id, where it stopped (the last experiment id done), its totals."""

    run_id: int
    last_id: int | None
    resumed: bool
    inserted_before: int


def now_ns() -> int:
    return time.time_ns()


def claim(lock: RunnerLock, state: str) -> Claim:
    """Record a ``running`` run (taking over the latest unfinished one) or a ``reverting`` one."""
    c = lock.target.tables(lock.conn)
    host, pid, now = socket.gethostname(), os.getpid(), now_ns()
    with lock.write():
        last = None
        if state == "running":
            last = (
                c.execute(sa.select(runs).where(runs.c.state.in_(("running", "stopped"))).order_by(runs.c.id.desc()))
                .mappings()
                .first()
            )
        if last is not None:
            c.execute(
                runs.update()
                .where(runs.c.id == last["id"])
                .values(state=state, host=host, pid=pid, updated_at_ns=now, message=None)
            )
            last_id = last["last_id"]
            return Claim(int(last["id"]), None if last_id is None else int(last_id), True, int(last["inserted"]))
        result = c.execute(
            runs.insert().values(
                state=state, started_at_ns=now, updated_at_ns=now, passes=0, batches=0, inserted=0, host=host, pid=pid
            )
        )
        return Claim(int(result.inserted_primary_key[0]), None, False, 0)


def advance(conn: Connection, target: Target, run_id: int, last_id: int, added: int) -> None:
    """Inside a batch's transaction: move the cursor past the batch and count it."""
    target.tables(conn).execute(
        runs.update()
        .where(runs.c.id == run_id)
        .values(last_id=last_id, batches=runs.c.batches + 1, inserted=runs.c.inserted + added, updated_at_ns=now_ns())
    )


def start_pass(lock: RunnerLock, run_id: int) -> None:
    """A new walk from the first experiment still missing the tag (no cursor: a resume looks it up again)."""
    with lock.write():
        lock.target.tables(lock.conn).execute(
            runs.update()
            .where(runs.c.id == run_id)
            .values(last_id=None, passes=runs.c.passes + 1, updated_at_ns=now_ns())
        )


def finish(lock: RunnerLock, run_id: int, state: str, message: str | None) -> None:
    """``done`` (the cursor is cleared), ``stopped`` (resumable) or ``reverted``."""
    values: dict[str, Any] = {"state": state, "updated_at_ns": now_ns(), "message": message}
    if state == "done":
        values["last_id"] = None
    with lock.write():
        lock.target.tables(lock.conn).execute(runs.update().where(runs.c.id == run_id).values(**values))


def mark_reverted(lock: RunnerLock) -> None:
    """After a complete revert nothing is left to resume: every run ends as ``reverted``."""
    with lock.write():
        lock.target.tables(lock.conn).execute(runs.update().values(state="reverted", updated_at_ns=now_ns()))


def last_run(conn: Connection, target: Target) -> dict[str, Any] | None:
    """The latest run's row (read in the caller's read transaction)."""
    row = target.tables(conn).execute(sa.select(runs).order_by(runs.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None
