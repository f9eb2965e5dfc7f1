"""Dialect details, proven on the real servers."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from backfill.connect import create_engine
from backfill.job import Backfill
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from backfill.urls import parse_url
from backfill.walk import Settings
from tests.conftest import Db


@pytest.mark.backends("mysql")
def test_exact_matching_despite_a_case_insensitive_collation(db: Db) -> None:
    with db.engine.connect() as conn:  # the premise: this database's default collation ignores case and padding
        assert conn.execute(sa.text("SELECT 'gateway' = 'GATEWAY', 'GATEWAY ' = 'GATEWAY'")).one() == (1, 1)
    db.add_experiments(
        [
            (1, "active", [(SRC, "GATEWAY")]),
            (2, "active", [(SRC, "gateway")]),
            (3, "active", [(SRC, "GATEWAY ")]),
            (4, "active", [(SRC, "Gateway"), (ISGW, "TRUE")]),
        ]
    )
    job = Backfill(create_engine(parse_url(db.url)))
    assert job.status().gateway == 1
    job.run()
    assert {e for e, k, _ in db.tags() if k == ISGW} == {1, 4}
    assert job.status().conflicts == 0  # experiment 4 is not a gateway experiment, so its TRUE is no conflict


@pytest.mark.backends("mysql")
def test_batches_run_at_read_committed(db: Db) -> None:
    db.add_experiments([(1, "active", [(SRC, "GATEWAY")])])
    engine = create_engine(parse_url(db.url))
    levels: list[str] = []

    @event.listens_for(engine, "after_cursor_execute")
    def isolation(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO experiment_tags") and not levels:
            cursor.execute("SELECT @@tx_isolation")
            levels.append(cursor.fetchone()[0])

    Backfill(engine).run()
    assert levels == ["READ-COMMITTED"]


@pytest.mark.backends("postgresql")
def test_psycopg_gets_integer_binds(db: Db) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 6)])
    engine = create_engine(parse_url(db.url))
    seen: list[dict] = []

    @event.listens_for(engine, "before_cursor_execute")
    def binds(conn, cursor, statement, parameters, *_):  # type: ignore[no-untyped-def]
        if statement.startswith("WITH ins"):
            seen.append(parameters)

    Backfill(engine, Settings(batch_size=2, adaptive=False)).run()
    assert len(seen) == 3
    for parameters in seen:
        assert all(type(parameters[k]) is int for k in ("lo", "hi", "run", "now"))
    with engine.connect() as conn:  # integer binds keep the keyset range on the primary key index
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                sa.text(
                    "EXPLAIN SELECT 1 FROM experiment_tags s WHERE s.key = :k AND s.experiment_id > :lo "
                    "AND s.experiment_id <= :hi"
                ),
                {"k": SRC, "lo": 1, "hi": 3},
            )
        )
    assert "experiment_tag_pk" in plan and "Seq Scan" not in plan


@pytest.mark.backends("mysql")
def test_a_row_written_between_ledger_and_insert_is_retried_not_claimed(db: Db) -> None:
    """MySQL has no RETURNING: a batch writes its ledger, then a plain INSERT of those rows. A writer that adds
    one of them in between makes that INSERT fail with a duplicate key; the batch is rolled back and retried,
    and the ledger never claims the other writer's row (so revert leaves it, even though it is identical)."""
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 6)])
    engine = create_engine(parse_url(db.url))
    raced: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def other_writer(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if raced or not statement.startswith("INSERT INTO experiment_tags") or LEDGER_TABLE not in statement:
            return
        with db.engine.begin() as other:  # commits at once: the batch holds no lock that would stop it
            other.execute(
                sa.text("INSERT INTO experiment_tags (`key`, value, experiment_id) VALUES (:k, 'true', 3)"), {"k": ISGW}
            )
        raced.append(statement)

    job = Backfill(engine, Settings(batch_size=10, adaptive=False))
    report = job.run()
    assert raced and report.state == "done" and report.inserted == 4
    assert {e for e, k, v in db.tags() if k == ISGW and v == "true"} == {1, 2, 3, 4, 5}
    assert {row[0] for row in db.table(LEDGER_TABLE)} == {1, 2, 4, 5}
    job.revert()
    assert {e for e, k, _ in db.tags() if k == ISGW} == {3}
