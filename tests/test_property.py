"""Property: over random tag tables, the rule holds, nothing else changes, reruns are no-ops, revert is exact."""

from __future__ import annotations

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backfill.connect import create_engine
from backfill.job import Backfill
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, RUNS_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from backfill.urls import parse_url
from backfill.walk import Settings
from tests.conftest import Db

VALUES = st.one_of(
    st.sampled_from(["GATEWAY", "gateway", "GATEWAY ", " GATEWAY", "true", "false", "TRUE", "", "x"]),
    st.none(),
    st.text(alphabet="GATEWYgatewy ", max_size=8),
)
KEYS = st.sampled_from([SRC, ISGW, "mlflow.experiment.sourceId", "note"])
EXPERIMENT = st.tuples(
    st.sampled_from(["active", "deleted"]),
    st.dictionaries(KEYS, VALUES, max_size=4),
)
TABLES = st.lists(EXPERIMENT, max_size=30)


def expected(rows: list[tuple[int, str, dict]]) -> set[tuple[int, str, str | None]]:
    tags = {(e, k, v) for e, _, kv in rows for k, v in kv.items()}
    return tags | {(e, ISGW, "true") for e, _, kv in rows if kv.get(SRC) == "GATEWAY" and ISGW not in kv}


def reset(db: Db) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM experiment_tags WHERE experiment_id >= 100"))
        conn.execute(sa.text("DELETE FROM experiments WHERE experiment_id >= 100"))
        for table in (LEDGER_TABLE, RUNS_TABLE):
            if sa.inspect(conn).has_table(table):
                conn.execute(sa.text(f"DELETE FROM {table}"))


def test_rule_rerun_and_revert_on_random_tag_tables(db: Db) -> None:
    examples = 40 if db.dialect == "sqlite" else 15

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(table=TABLES, batch_size=st.integers(min_value=1, max_value=8), gap=st.integers(min_value=1, max_value=3))
    def check(table: list, batch_size: int, gap: int) -> None:
        reset(db)
        rows = [(100 + i * gap, stage, kv) for i, (stage, kv) in enumerate(table)]
        db.add_experiments([(e, stage, list(kv.items())) for e, stage, kv in rows])
        before_tags, before_experiments = db.tags(), db.table("experiments")
        job = Backfill(create_engine(parse_url(db.url)), Settings(batch_size=batch_size, min_batch_size=1))

        first = job.run()
        assert db.tags() - {t for t in db.tags() if t[0] < 100} == expected(rows)
        assert first.inserted == len(expected(rows)) - len(before_tags - {t for t in before_tags if t[0] < 100})
        assert db.table("experiments") == before_experiments
        assert job.run().inserted == 0
        job.revert()
        assert db.tags() == before_tags

    check()
