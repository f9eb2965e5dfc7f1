"""What the tool needs of MLflow's schema, and nothing more (docs/mlflow-versions.md).

The contract (backfill/schema.py): ``experiments`` with ``experiment_id``, ``creation_time`` and
``lifecycle_stage`` (``status`` counts deleted experiments); ``experiment_tags`` with ``key``, ``value`` and
``experiment_id``, and a primary key of exactly ``(key, experiment_id)``, in that order: the keyset walk reads
one key's rows in experiment_id order from that index. Whatever else a future MLflow adds (columns, indexes,
tables) is accepted; the same two columns keyed the other way round are refused (exit 4) and left untouched.
These run on real MLflow databases (the session's template), reshaped the way a future release could.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from backfill.errors import ExitCode
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import OURS, Db, alembic, run_cli, snapshot

COMMANDS = (["run"], ["status"], ["verify"], ["run", "--dry-run"], ["revert", "--yes"])


def _rekey_tags(db: Db, columns: tuple[str, ...], primary_key: tuple[str, ...]) -> None:
    """Rebuild experiment_tags with its columns declared in ``columns``' order and ``primary_key`` as its key
    (rows, column types and the foreign key kept)."""
    types = {"key": sa.String(250), "value": sa.Text(), "experiment_id": sa.Integer()}
    staging = "experiment_tags_rekeyed"
    meta = sa.MetaData()
    sa.Table("experiments", meta, sa.Column("experiment_id", sa.Integer, primary_key=True))  # referenced only
    table = sa.Table(
        staging,
        meta,
        *(sa.Column(c, types[c], nullable=c == "value") for c in columns),
        sa.PrimaryKeyConstraint(*primary_key, name=f"{staging}_pk"),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.experiment_id"]),
    )
    quote = db.engine.dialect.identifier_preparer.quote
    listed = ", ".join(quote(c) for c in columns)
    with db.engine.begin() as conn:
        table.create(conn)
        conn.execute(sa.text(f"INSERT INTO {staging} ({listed}) SELECT {listed} FROM experiment_tags"))
        conn.execute(sa.text("DROP TABLE experiment_tags"))
        conn.execute(sa.text(f"ALTER TABLE {staging} RENAME TO experiment_tags"))


def _gateway(db: Db, ids: list[int]) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in ids])


def _tagged(db: Db) -> set[int]:
    return {e for e, k, v in db.tags() if k == ISGW and v == "true"}


def test_the_primary_key_in_the_other_order_is_refused_untouched(db: Db) -> None:
    """(experiment_id, key): the same columns, but one key's rows are no longer an index range in
    experiment_id order. Every command and the Alembic revision refuse it in one line, writing nothing."""
    _gateway(db, [1, 2])
    _rekey_tags(db, ("key", "value", "experiment_id"), ("experiment_id", "key"))
    db.engine.dispose()
    before = snapshot(db.url)
    for command in COMMANDS:
        result = run_cli(*command, "--database-url", db.url)
        assert result.returncode == ExitCode.NOT_MLFLOW, (command, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert "primary key is (experiment_id, key), not (key, experiment_id)" in result.stderr
    up = alembic(db.url, "upgrade", "head")
    assert up.returncode == ExitCode.NOT_MLFLOW, up.stderr
    assert "primary key is (experiment_id, key)" in up.stderr and "Traceback" not in up.stderr
    assert snapshot(db.url) == before


def test_the_key_order_counts_not_the_column_order(db: Db) -> None:
    """Columns declared (experiment_id, value, key) under the primary key (key, experiment_id): accepted, so the
    check reads the key's own order (each backend's catalog), not the table's column order."""
    _gateway(db, [1, 2])
    _rekey_tags(db, ("experiment_id", "value", "key"), ("key", "experiment_id"))
    db.engine.dispose()
    result = run_cli("run", "--database-url", db.url, "-q")
    assert result.returncode == 0, result.stderr
    assert _tagged(db) == {1, 2}


def test_what_a_future_mlflow_may_add_is_accepted(db: Db) -> None:
    """New columns in both tables (one NOT NULL with a default, as MLflow adds them), a new index on
    experiment_tags and a new table: run, verify, revert and the Alembic revision work as on MLflow's own."""
    _gateway(db, [1, 2, 3])
    with db.engine.begin() as conn:
        for statement in (
            "ALTER TABLE experiments ADD COLUMN owner_id VARCHAR(64)",
            "ALTER TABLE experiment_tags ADD COLUMN updated_time BIGINT",
            "ALTER TABLE experiment_tags ADD COLUMN scope VARCHAR(63) NOT NULL DEFAULT 'default'",
            "CREATE INDEX index_experiment_tags_experiment_id ON experiment_tags (experiment_id)",
            "CREATE TABLE experiment_owners (owner_id VARCHAR(64) PRIMARY KEY, name VARCHAR(256))",
        ):
            conn.execute(sa.text(statement))
    before = snapshot(db.url)
    status = run_cli("status", "--database-url", db.url, "--json")
    assert status.returncode == 0, status.stderr
    result = run_cli("run", "--database-url", db.url, "-q")
    assert result.returncode == 0, result.stderr
    assert _tagged(db) == {1, 2, 3}
    assert run_cli("verify", "--database-url", db.url).returncode == 0
    revert = run_cli("revert", "--yes", "--database-url", db.url)
    assert revert.returncode == 0, revert.stderr
    assert snapshot(db.url, skip=OURS) == before
    up = alembic(db.url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert _tagged(db) == {1, 2, 3}


@pytest.mark.parametrize("primary_key", [("key", "experiment_id"), ("experiment_id", "key")])
def test_the_inspector_reports_the_key_in_key_order(db: Db, primary_key: tuple[str, str]) -> None:
    """What the shape check reads, on each backend: the primary key's columns in the key's order, whatever
    the order the columns were declared in."""
    _rekey_tags(db, (primary_key[1], "value", primary_key[0]), primary_key)
    db.engine.dispose()
    reported = sa.inspect(db.engine).get_pk_constraint("experiment_tags")["constrained_columns"]
    assert tuple(c.lower() for c in reported) == primary_key
