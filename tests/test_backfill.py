"""The rule, on every backend: exactly the gateway experiments get isGateway=true, nothing else changes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa

from backfill.connect import create_engine
from backfill.errors import BackfillError, ExitCode
from backfill.job import Backfill
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, RUNS_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from backfill.urls import parse_url
from backfill.walk import Settings
from tests.conftest import REPO, Db


def job(db: Db, **settings: object) -> Backfill:
    return Backfill(create_engine(parse_url(db.url)), Settings(**settings))  # type: ignore[arg-type]


NEAR_MISSES = ["gateway", "Gateway", " GATEWAY", "GATEWAY ", "GATEWAYS", "GATE WAY", "", None]


@pytest.fixture
def mixed(db: Db) -> Db:
    """Gateway experiments (active, deleted, already tagged with any value) and near misses."""
    rows: list = [
        (1001, "active", [(SRC, "GATEWAY"), ("mlflow.experiment.sourceId", "e1")]),
        (1002, "deleted", [(SRC, "GATEWAY")]),
        (1003, "active", [(SRC, "GATEWAY"), (ISGW, "true")]),  # written by MLflow 3.10.1: not ours
        (1004, "active", [(SRC, "GATEWAY"), (ISGW, "false")]),  # conflicts: never changed
        (1005, "active", [(SRC, "GATEWAY"), (ISGW, "TRUE")]),
        (1006, "active", [("other", "GATEWAY")]),  # GATEWAY under another key
        (1007, "active", []),
        (1008, "active", [(SRC, "NOTEBOOK")]),
    ]
    rows += [(2000 + i, "active", [(SRC, v)]) for i, v in enumerate(NEAR_MISSES)]
    db.add_experiments(rows)
    return db


def test_tags_exactly_the_gateway_experiments(mixed: Db) -> None:
    before = mixed.tags()
    job(mixed).run()
    after = mixed.tags()
    assert after - before == {(1001, ISGW, "true"), (1002, ISGW, "true")}
    assert before - after == set()


def test_near_misses_are_not_tagged(mixed: Db) -> None:
    job(mixed).run()
    tagged = {e for e, k, _ in mixed.tags() if k == ISGW}
    assert not tagged & {2000 + i for i in range(len(NEAR_MISSES))}
    assert not tagged & {1006, 1007, 1008}


def test_status_counts_and_conflicts(mixed: Db) -> None:
    j = job(mixed)
    before = j.status()
    assert (before.gateway, before.deleted, before.tagged, before.missing, before.conflicts) == (5, 1, 1, 2, 2)
    assert before.inserted_by_backfill == 0
    j.run()
    after = j.status()
    assert (after.gateway, after.tagged, after.missing, after.conflicts, after.inserted_by_backfill) == (5, 3, 0, 2, 2)
    assert after.last_run is not None and after.last_run["state"] == "done"


def test_nothing_else_changes(mixed: Db) -> None:
    experiments = mixed.table("experiments")
    job(mixed).run()
    assert mixed.table("experiments") == experiments
    assert "alembic_version" in mixed.table_names()


def test_second_run_inserts_nothing(mixed: Db) -> None:
    first = job(mixed).run()
    tags = mixed.tags()
    second = job(mixed).run()
    assert first.inserted == 2
    assert second.inserted == 0 and second.batches == 0
    assert mixed.tags() == tags


@pytest.mark.parametrize("batch_size", [1, 2, 3, 10_000])
def test_batch_sizes(db: Db, batch_size: int) -> None:
    db.add_experiments([(3000 + i, "active", [(SRC, "GATEWAY" if i % 3 else "OTHER")]) for i in range(25)])
    report = job(db, batch_size=batch_size, min_batch_size=1, adaptive=False).run()
    expected = {3000 + i for i in range(25) if i % 3}
    assert {e for e, k, v in db.tags() if k == ISGW and v == "true"} == expected
    assert report.inserted == len(expected)
    if batch_size == 1:
        # one sourceType row per batch, from the first experiment that needs the tag (3001) to the end
        assert report.batches == 24
    if batch_size == 10_000:
        assert report.batches == 1


def test_dry_run_writes_nothing(mixed: Db) -> None:
    tags, tables = mixed.tags(), mixed.table_names()
    report = job(mixed).run(dry_run=True)
    assert report.would_insert == 2
    assert mixed.tags() == tags
    assert mixed.table_names() == tables  # not even the project's tables


def test_revert_removes_exactly_what_it_inserted(mixed: Db) -> None:
    before = mixed.tags()
    j = job(mixed)
    j.run()
    assert j.revert().removed == 2
    assert mixed.tags() == before  # the isGateway rows MLflow wrote (1003-1005) are still there
    assert mixed.table(LEDGER_TABLE) == []


def test_revert_keeps_a_row_whose_value_was_changed_since(mixed: Db) -> None:
    j = job(mixed)
    j.run()
    with mixed.engine.begin() as conn:
        tags = sa.Table("experiment_tags", sa.MetaData(), autoload_with=conn)
        conn.execute(tags.update().where(tags.c.experiment_id == 1001, tags.c.key == ISGW).values(value="yes"))
    assert j.revert().removed == 1
    assert (1001, ISGW, "yes") in mixed.tags()


def test_ledger_records_each_inserted_row_with_its_run(mixed: Db) -> None:
    report = job(mixed).run()
    ledger = mixed.table(LEDGER_TABLE)
    # experiment id, its creation time (0 for these), run, time of insertion
    assert [(e, created, run) for e, created, run, _ in ledger] == [(1001, 0, report.run_id), (1002, 0, report.run_id)]


def test_refuses_a_database_without_mlflow_tables(server) -> None:  # type: ignore[no-untyped-def]
    url = server.new_database()
    with pytest.raises(BackfillError) as err:
        Backfill(create_engine(parse_url(url))).run()
    assert err.value.code == ExitCode.NOT_MLFLOW
    assert sa.inspect(sa.create_engine(url)).get_table_names() == []


def test_stop_between_batches_then_resume(db: Db) -> None:
    db.add_experiments([(4000 + i, "active", [(SRC, "GATEWAY")]) for i in range(10)])
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    j = job(db, batch_size=2, min_batch_size=1, adaptive=False)
    with pytest.raises(BackfillError) as err:
        j.run(should_stop=stop_after_three)
    assert err.value.code == ExitCode.STOPPED
    assert "resume" in str(err.value)
    runs = db.table(RUNS_TABLE)
    assert len(runs) == 1
    assert len(db.table(LEDGER_TABLE)) == 6  # three whole batches, nothing partial
    # meanwhile a gateway experiment appears below the cursor, and one above it
    db.add_experiments([(3999, "active", [(SRC, "GATEWAY")]), (5000, "active", [(SRC, "GATEWAY")])])
    report = j.run()
    assert report.resumed and report.run_id == runs[0][0]
    assert report.inserted == 4 + 2
    assert {e for e, k, _ in db.tags() if k == ISGW} == {3999, 5000, *range(4000, 4010)}
    assert job(db).status().missing == 0


def test_a_live_runner_blocks_a_second_one(db: Db) -> None:
    """The single-runner lock, held by another process (a `run` in another container, say): `run` and
    `revert` exit 6 while it lives, and the lock goes with the process, with nothing to wait for."""
    db.add_experiments([(6000, "active", [(SRC, "GATEWAY")])])
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.hold_lock", db.url], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(BackfillError) as err:
            job(db).run()
        assert err.value.code == ExitCode.LOCKED
        # nothing was written, not even the project's tables (the lock comes first)
        assert not {RUNS_TABLE, LEDGER_TABLE} & set(sa.inspect(db.engine).get_table_names())
    finally:
        holder.kill()
        holder.wait()
    assert job(db).run().state == "done"  # the holder died: its lock went with it
    db.add_experiments([(6001, "active", [(SRC, "GATEWAY")])])
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.hold_lock", db.url], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for blocked in (job(db).run, job(db).revert):  # a revert may not run beside a live run either
            with pytest.raises(BackfillError) as err:
                blocked()
            assert err.value.code == ExitCode.LOCKED
        assert job(db).status().missing == 1 and len(db.table(LEDGER_TABLE)) == 1
    finally:
        holder.kill()
        holder.wait()


def test_revert_spares_a_reused_experiment_id(mixed: Db) -> None:
    """`mlflow gc` removes an experiment; a new one gets its id (SQLite reuses the highest) and MLflow
    tags it isGateway itself: that row is not ours, whatever the ledger says about the id."""
    j = job(mixed)
    j.run()
    with mixed.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM experiment_tags WHERE experiment_id = 1001"))
        conn.execute(sa.text("DELETE FROM experiments WHERE experiment_id = 1001"))
    meta = sa.MetaData()
    experiments = sa.Table("experiments", meta, autoload_with=mixed.engine)
    with mixed.engine.begin() as conn:
        conn.execute(
            experiments.insert().values(
                experiment_id=1001,
                name="reborn",
                artifact_location="/tmp/r",
                lifecycle_stage="active",
                creation_time=42,
                last_update_time=42,
            )
        )
    mixed.set_tag(1001, SRC, "GATEWAY")
    mixed.set_tag(1001, ISGW, "true")
    assert j.revert().removed == 1  # only 1002's row
    assert (1001, ISGW, "true") in mixed.tags()


@pytest.mark.backends("sqlite")
def test_reads_never_hold_the_sqlite_write_lock(db: Db) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 8)])
    engine = create_engine(parse_url(db.url))
    in_write: list[bool] = [False]
    reads_inside: list[str] = []
    writes: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def track(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if statement == "BEGIN IMMEDIATE":
            in_write[0] = True
        elif statement in ("COMMIT", "ROLLBACK"):
            in_write[0] = False
        elif "MIN(s.experiment_id)" in statement or statement.startswith("SELECT COUNT(*)"):
            if in_write[0]:
                reads_inside.append(statement)
        elif statement.startswith("INSERT INTO experiment_tags"):
            writes.append(statement) if in_write[0] else reads_inside.append("unguarded write: " + statement)

    Backfill(engine, Settings(batch_size=3, adaptive=False)).run()
    assert writes  # batches write inside BEGIN IMMEDIATE
    assert not reads_inside
