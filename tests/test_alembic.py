"""The Alembic revision: upgrade, rerun, downgrade, offline --sql, on every backend."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, RUNS_TABLE, VERSION_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import REPO, Db, alembic, snapshot

OURS = (LEDGER_TABLE, RUNS_TABLE, VERSION_TABLE)


def gateway_rows(db: Db) -> None:
    db.add_experiments(
        [
            (1001, "active", [(SRC, "GATEWAY")]),
            (1002, "deleted", [(SRC, "GATEWAY")]),
            (1003, "active", [(SRC, "GATEWAY"), (ISGW, "true")]),
            (1004, "active", [(SRC, "gateway")]),
        ]
    )


def test_single_head() -> None:
    heads = ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))).get_heads()
    assert heads == ["gateway_backfill_0001"]


def test_upgrade_rerun_downgrade(db: Db) -> None:
    gateway_rows(db)
    before = snapshot(db.url)

    up = alembic(db.url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert db.tags() - {(e, k, v) for e, k, v in db.tags() if k != ISGW or e in (1003,)} == {
        (1001, ISGW, "true"),
        (1002, ISGW, "true"),
    }
    after = snapshot(db.url, skip=OURS)
    assert after["experiments"] == before["experiments"]
    assert after["alembic_version"] == before["alembic_version"]  # MLflow's history untouched

    assert alembic(db.url, "upgrade", "head").returncode == 0  # already at head: a no-op
    current = alembic(db.url, "current")
    assert "gateway_backfill_0001 (head)" in current.stdout

    down = alembic(db.url, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert snapshot(db.url, skip=(VERSION_TABLE,)) == before
    tables = db.table_names()
    assert not {LEDGER_TABLE, RUNS_TABLE} & tables  # nothing of ours but Alembic's (now empty) version table
    assert db.table(VERSION_TABLE) == []

    again = alembic(db.url, "upgrade", "head")
    assert again.returncode == 0, again.stderr
    assert {(1001, ISGW, "true"), (1002, ISGW, "true")} <= db.tags()


def test_offline_sql_script_reaches_the_same_end_state(db: Db) -> None:
    gateway_rows(db)
    online = db.server.new_mlflow_database()
    Db(db.backend, online, db.server, sa.create_engine(online)).add_experiments(
        [
            (1001, "active", [(SRC, "GATEWAY")]),
            (1002, "deleted", [(SRC, "GATEWAY")]),
            (1003, "active", [(SRC, "GATEWAY"), (ISGW, "true")]),
            (1004, "active", [(SRC, "gateway")]),
        ]
    )
    assert alembic(online, "upgrade", "head").returncode == 0

    script = alembic(db.url, "upgrade", "head", "--sql")
    assert script.returncode == 0, script.stderr
    db.server.run_sql_script(db.url, script.stdout)
    data = [s for s in script.stdout.split(";\n") if s.strip().startswith(("WITH ins", "INSERT INTO gateway_backfill"))]
    data += [s for s in script.stdout.split(";\n") if s.strip().startswith("INSERT INTO experiment_tags")]
    assert data
    db.server.run_sql_script(db.url, ";\n".join(data) + ";\n")  # the data statements are idempotent

    assert db.tags() == snapshot_tags(online)
    assert [r[0] for r in db.table(VERSION_TABLE)] == ["gateway_backfill_0001"]
    assert {row[0] for row in db.table(LEDGER_TABLE)} == {1001, 1002}

    down = alembic(db.url, "downgrade", "gateway_backfill_0001:base", "--sql")
    db.server.run_sql_script(db.url, down.stdout)
    assert ISGW not in {k for e, k, _ in db.tags() if e in (1001, 1002)}
    assert (1003, ISGW, "true") in db.tags()


def snapshot_tags(url: str) -> set[tuple[int, str, str | None]]:
    engine = sa.create_engine(url)
    tags = sa.Table("experiment_tags", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        rows = {(int(e), k, v) for e, k, v in conn.execute(sa.select(tags.c.experiment_id, tags.c.key, tags.c.value))}
    engine.dispose()
    return rows


def test_offline_mode_never_connects() -> None:
    result = alembic("postgresql://nobody:secret@127.0.0.1:1/none", "upgrade", "head", "--sql")
    assert result.returncode == 0, result.stderr
    assert "ON CONFLICT (key, experiment_id) DO NOTHING" in result.stdout
    assert "secret" not in result.stdout + result.stderr


def test_refuses_a_non_mlflow_database_and_writes_nothing(server) -> None:  # type: ignore[no-untyped-def]
    url = server.new_database()
    result = alembic(url, "upgrade", "head")
    assert result.returncode == 4
    assert "not an MLflow tracking database" in result.stderr
    assert "Traceback" not in result.stderr
    assert sa.inspect(sa.create_engine(url)).get_table_names() == []


def test_same_database_resolution_as_the_cli(db: Db) -> None:
    import os

    gateway_rows(db)
    env = {**os.environ, "DATABASE_URL": db.url}
    assert alembic(None, "upgrade", "head", env=env).returncode == 0
    assert (1001, ISGW, "true") in db.tags()
