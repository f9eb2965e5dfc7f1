"""The Alembic revision: upgrade, rerun, downgrade, offline --sql, on every backend."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, LOCK_TABLE, VERSION_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import OURS, REPO, Db, alembic, snapshot


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
    assert snapshot(db.url) == before  # nothing of ours is left, Alembic's version table included

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


# ---------------------------------------------------------------- driven from Python (issue 17)


def test_from_python_a_failure_is_an_exception_not_an_exit(server) -> None:  # type: ignore[no-untyped-def]
    """`alembic.command.upgrade(cfg, "head")` from an application: a refused database raises BackfillError,
    with the exit code as ``.code`` (env.py once ended the whole process with SystemExit)."""
    from alembic import command

    from backfill.errors import BackfillError, ExitCode

    engine = sa.create_engine(server.new_database())
    for given in (engine, engine.connect()):
        cfg = Config(str(REPO / "alembic.ini"))
        cfg.attributes["connection"] = given
        with pytest.raises(BackfillError) as refused:
            command.upgrade(cfg, "head")
        assert refused.value.code == ExitCode.NOT_MLFLOW
    cfg = Config(str(REPO / "alembic.ini"))
    cfg.attributes["connection"] = object()
    with pytest.raises(BackfillError) as refused:
        command.upgrade(cfg, "head")
    assert refused.value.code == ExitCode.USAGE and "Connection or Engine" in str(refused.value)
    engine.dispose()


def test_from_python_inside_the_callers_transaction(db: Db) -> None:
    """Alembic's recipe for sharing a connection, `with engine.begin() as conn`: the migration runs inside the
    caller's transaction (it once failed on an assertion in Alembic's autocommit_block). Rolled back, nothing of
    it stays (on the MySQL family the tables' DDL commits at once, as any DDL does there: they stay, empty);
    committed, the tags are there; a downgrade the same way removes them and everything of ours."""
    from alembic import command

    gateway_rows(db)
    before = snapshot(db.url)
    engine = _transactional(sa.create_engine(db.url))
    cfg = Config(str(REPO / "alembic.ini"))
    key = "`key`" if db.dialect == "mysql" else "key"
    with engine.connect() as conn:
        transaction = conn.begin()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        tags = set(conn.execute(sa.text(f"SELECT experiment_id, {key}, value FROM experiment_tags")).all())
        assert {(1001, ISGW, "true"), (1002, ISGW, "true")} <= tags
        transaction.rollback()
    kept = OURS if db.dialect == "mysql" else ()
    assert snapshot(db.url, skip=kept) == before
    # The lease's row too was committed by the DDL after it: the next runner takes it over once unrenewed.
    assert all(db.table(name) == [] for name in kept if name != LOCK_TABLE)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    assert {(1001, ISGW, "true"), (1002, ISGW, "true")} <= db.tags()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert snapshot(db.url) == before
    engine.dispose()


def _transactional(engine: sa.Engine) -> sa.Engine:
    """SQLite: SQLAlchemy's recipe for transactions that hold DDL too (pysqlite's default begins none before
    a CREATE TABLE); the servers' transactions do already."""
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", lambda raw, _: setattr(raw, "isolation_level", None))
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
    return engine


# ---------------------------------------------------------------- pytest-alembic's built-in tests (issues 11, 17)
# They drive env.py the way pytest-alembic and application code do: with their own engine, or a connection of
# it inside a transaction, handed over in config.attributes["connection"], on a database real MLflow made, with
# gateway experiments.

from pytest_alembic.tests import (  # noqa: E402
    test_single_head_revision,  # noqa: F401
    test_up_down_consistency,  # noqa: F401
    test_upgrade,  # noqa: F401
)
from pytest_alembic.tests.experimental import test_downgrade_leaves_no_trace as builtin_leaves_no_trace  # noqa: E402


@pytest.mark.backends("sqlite", "postgresql")
def test_downgrade_leaves_no_trace(alembic_runner) -> None:  # type: ignore[no-untyped-def]
    """pytest-alembic's experimental test, as it is. It hands env.py a connection inside its own transaction
    (wrapped to look like an engine), runs upgrade and downgrade in a savepoint of it, compares the schema
    autogenerate sees before and after, and rolls back: the batches then are savepoints of that transaction
    (backfill/migration.py), and `downgrade base` drops Alembic's version table too.

    Not on the MySQL family, where it cannot pass for any revision that runs DDL: MySQL and MariaDB commit
    the transaction at every CREATE TABLE, Alembic's own version table first, which ends the test's savepoint.
    A revision with a single ``op.create_table`` and Alembic's plain env.py fails the same way (MySQL 9.7 and
    MariaDB 10.11, pytest-alembic 0.13.1); this project's, on mysql, mariadb and mariadb-11:

        E   sqlalchemy.exc.OperationalError: (pymysql.err.OperationalError)
                (1305, 'SAVEPOINT sa_savepoint_1 does not exist')
        E   [SQL: ROLLBACK TO SAVEPOINT sa_savepoint_1]

    There, :func:`test_downgrade_leaves_no_trace_committed` checks the same on the committed database.
    """
    builtin_leaves_no_trace(alembic_runner)


def test_downgrade_leaves_no_trace_committed(alembic_runner, alembic_engine) -> None:  # type: ignore[no-untyped-def]
    """The same autogenerate comparison as pytest-alembic's test, on the real, committed database (the batches
    commit one by one when env.py gets an engine), plus every row of every table: MLflow's data is what a
    downgrade must give back."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    def state() -> tuple[sa.MetaData, dict[str, list[tuple]]]:
        meta = sa.MetaData()
        meta.reflect(alembic_engine)
        return meta, snapshot(str(alembic_engine.url.render_as_string(hide_password=False)))

    before_meta, before_rows = state()
    alembic_runner.migrate_up_to("heads")
    assert alembic_runner.current == "gateway_backfill_0001"
    alembic_runner.migrate_down_to("base")
    after_meta, after_rows = state()
    with alembic_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), before_meta) == []
    assert set(after_meta.tables) == set(before_meta.tables)  # no table of ours, Alembic's version table included
    assert after_rows == before_rows


@pytest.fixture
def alembic_config() -> dict[str, str]:
    return {"file": str(REPO / "alembic.ini")}


@pytest.fixture
def alembic_engine(db: Db):  # type: ignore[no-untyped-def]
    from tests.mlflow_data import create_gateway_experiments, mlflow_store, strip_is_gateway

    store = mlflow_store(db.url)
    strip_is_gateway(db.url, create_gateway_experiments(store, 3))
    store.engine.dispose()
    engine = sa.create_engine(db.url)
    yield engine
    engine.dispose()
