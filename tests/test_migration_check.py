"""The CI migration check (`make migration-check`), on every backend, with data real MLflow wrote.

upgrade -> every MLflow row intact and the tags right; downgrade -> MLflow's tables exactly as before;
upgrade again; one head; the --sql script applied with the database's own client reaches the same end
state; MLflow still opens the database and `mlflow db upgrade` still succeeds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory
from mlflow.entities import ViewType

from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, RUNS_TABLE, VERSION_TABLE
from tests.conftest import REPO, alembic, snapshot
from tests.mlflow_data import mlflow_store, populate

pytestmark = pytest.mark.migration_check
OURS = (LEDGER_TABLE, RUNS_TABLE, VERSION_TABLE)


def tag_rows(snap: dict[str, list[tuple]]) -> set[tuple]:
    return set(snap["experiment_tags"])


def mlflow_db_upgrade(url: str) -> None:
    result = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", url], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_migration_check(server) -> None:  # type: ignore[no-untyped-def]
    url = server.new_database()
    data = populate(url, gateway=4, ordinary=3, deleted_gateway=2, with_runs=True)
    gateway = [*data.gateway, *data.deleted_gateway]
    scripted = server.clone(url)  # the same data, for the --sql script
    before = snapshot(url)
    assert before["runs"] and before["metrics"] and before["params"]

    up = alembic(url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    after = snapshot(url, skip=OURS)
    for table, rows in before.items():
        if table != "experiment_tags":
            assert after[table] == rows, f"MLflow table {table} changed"
    added = tag_rows(after) - tag_rows(before)
    assert tag_rows(before) <= tag_rows(after)
    columns = [c["name"] for c in sa.inspect(sa.create_engine(url)).get_columns("experiment_tags")]
    values = {"key": ISGW, "value": "true"}
    assert added == {tuple(repr(values.get(c, e)) for c in columns) for e in gateway}
    assert alembic(url, "upgrade", "head").returncode == 0

    down = alembic(url, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert snapshot(url, skip=(VERSION_TABLE,)) == before

    again = alembic(url, "upgrade", "head")
    assert again.returncode == 0, again.stderr
    assert ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))).get_heads() == ["gateway_backfill_0001"]

    script = alembic(scripted, "upgrade", "head", "--sql")
    assert script.returncode == 0, script.stderr
    server.run_sql_script(scripted, script.stdout)
    online, offline = snapshot(url, skip=OURS), snapshot(scripted, skip=OURS)
    assert online == offline

    for target in (url, scripted):
        store = mlflow_store(target)  # MLflow's schema check passes on start-up
        try:
            names = {
                e.name
                for e in store.search_experiments(
                    view_type=ViewType.ALL, filter_string="tags.`mlflow.experiment.isGateway` IS NULL"
                )
            }
            assert not any(n.startswith("gateway/") for n in names)
        finally:
            store.engine.dispose()
        mlflow_db_upgrade(target)
