"""Every statement's cost stays proportional to its batch (or linear for a whole-table count), whatever the
planner's statistics say. Checked with the servers' own EXPLAIN ANALYZE, never a timing.

The situation that once made PostgreSQL quadratic (issue 9): statistics gathered while a real 3.10.0 database
had no isGateway row at all, then a run's first batches insert thousands of them, and autovacuum has not
analyzed again. Here: 30,000 experiments, 3,000 gateway; ANALYZE; isGateway and ledger rows for the first two
thirds (2,000 = 8 batches) without new statistics; then each statement of the next batch, the end-of-pass
check, verify, status and a revert batch, under EXPLAIN ANALYZE, rolled back.

Rows examined on experiment_tags (returned, plus removed by filters and join filters, times loops) may be at
most 4x the batch (bounded statements) or twice the table's rows (whole-table ones: linear, where the quadratic
plan examined millions; a server may well read the whole table for a count). On PostgreSQL no Materialize
may sit above a scan of experiment_tags, and the isGateway lookup of a batch is an index probe on the primary
key by experiment_id. Plans are pinned to custom plans (psycopg prepares a statement after five executions and
PostgreSQL may then switch to a generic plan, which would hide a bad custom one).
The whole-table reads (first_missing, missing) are explained after ``whole_table_setup``, in the same
transaction, as the tool runs them: on PostgreSQL that is what keeps their anti-join linear.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import sqlalchemy as sa

from backfill.schema import metadata
from backfill.sql import CONSTANTS, statements
from tests.conftest import Db

pytestmark = pytest.mark.backends("postgresql", "mysql")

N, BATCH = 30_000, 250
CUT = 2 * N // 3  # isGateway rows already exist for the gateway experiments up to here


def _seed(db: Db) -> None:
    """N experiments, one in ten gateway, MLflow-like tags; statistics taken before any isGateway row exists."""
    k = "`key`" if db.dialect == "mysql" else "key"
    if db.dialect == "postgresql":
        numbers = f"SELECT g AS n FROM generate_series(1, {N}) g"
    else:
        d = _digits()
        n = "a.i * 10000 + b.i * 1000 + c.i * 100 + d.i * 10 + e.i + 1"
        numbers = f"SELECT {n} AS n FROM {d} a, {d} b, {d} c, {d} d, {d} e WHERE {n} <= {N}"
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, creation_time,"
                f" last_update_time) SELECT n, CONCAT('e', n), CONCAT('/a/', n), 'active', n, n FROM ({numbers}) x"
            )
        )
        for key, value, where in (
            ("mlflow.experiment.sourceType", "'GATEWAY'", "MOD(n, 10) = 0"),
            ("team", "CONCAT('t', MOD(n, 7))", "1 = 1"),
            ("mlflow.note.content", "'notes'", "MOD(n, 3) = 0"),
        ):
            conn.execute(
                sa.text(
                    f"INSERT INTO experiment_tags ({k}, value, experiment_id) SELECT '{key}', {value}, n"
                    f" FROM ({numbers}) x WHERE {where}"
                ).execution_options(no_parameters=True)
            )
        metadata.create_all(conn)
        if db.dialect == "postgresql":
            for table in ("experiments", "experiment_tags", "gateway_backfill_rows"):
                conn.execute(sa.text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            sa.text(
                "ANALYZE experiments, experiment_tags"
                if db.dialect == "postgresql"
                else "ANALYZE TABLE experiments, experiment_tags"
            )
        )
    with db.engine.begin() as conn:  # a run's first batches: isGateway and ledger rows, no new statistics
        conn.execute(
            sa.text(
                "INSERT INTO gateway_backfill_rows (experiment_id, experiment_created, run_id, inserted_at_ns)"
                f" SELECT experiment_id, experiment_id, 1, 1 FROM experiment_tags WHERE {k} = :src AND"
                f" experiment_id <= {CUT}"
            ),
            CONSTANTS,
        )
        conn.execute(
            sa.text(
                f"INSERT INTO experiment_tags ({k}, value, experiment_id) SELECT :isgw, :tv, experiment_id"
                " FROM gateway_backfill_rows"
            ),
            CONSTANTS,
        )


def _digits() -> str:
    return "(" + " UNION ALL ".join(f"SELECT {i} AS i" for i in range(10)) + ")"


def _pg_examined(plan: dict[str, Any], batch: bool) -> tuple[int, list[str]]:
    total, bad = 0, []

    def walk(node: dict[str, Any], under_materialize: bool) -> None:
        nonlocal total
        loops = node.get("Actual Loops", 1) or 0
        total += int(node.get("Rows Removed by Join Filter", 0) * loops)
        if node.get("Relation Name") == "experiment_tags" and "Scan" in node["Node Type"]:
            rows = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
            total += int((rows + node.get("Rows Removed by Index Recheck", 0)) * loops)
            if under_materialize:
                bad.append(f"Materialize over {node['Node Type']} of experiment_tags {node.get('Alias')}")
            probe = (
                node["Node Type"] in ("Index Scan", "Index Only Scan") and node.get("Index Name") == "experiment_tag_pk"
            )
            if batch and node.get("Alias") == "g" and not (probe and "experiment_id = " in node.get("Index Cond", "")):
                bad.append(f"the isGateway lookup is a {node['Node Type']} ({node.get('Index Cond')})")
        for child in node.get("Plans", []):
            walk(child, under_materialize or node["Node Type"] == "Materialize")

    walk(plan["Plan"], False)
    return total, bad


def _mariadb_examined(plan: Any) -> int:
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, dict):
            table = x.get("table")
            if isinstance(table, dict) and table.get("table_name") in ("s", "g", "experiment_tags"):
                total += int((table.get("r_loops") or 1) * (table.get("r_rows") or 0))
            for value in x.values():
                walk(value)
        elif isinstance(x, list):
            for value in x:
                walk(value)

    walk(plan)
    return total


def _mysql_examined(tree: str) -> int:
    total = 0
    for line in tree.splitlines():
        counted = re.search(r"rows=([\d.e+]+) loops=(\d+)\)", line)
        if counted and re.search(r"(scan|lookup) on (s|g|experiment_tags)\b", line):
            total += int(float(counted.group(1)) * int(counted.group(2)))
    return total


def test_every_statement_stays_proportional_after_a_large_first_batch(db: Db) -> None:
    _seed(db)
    sql = statements(db.dialect)
    k = "`key`" if db.dialect == "mysql" else "key"
    checks = {
        "batch": (sql.batch[0], True),
        "first_missing": (sql.first_missing, False),
        "missing": (sql.missing, False),
        "status": (sql.status, False),
        "revert": (sql.revert[0], True),
    }
    failures = []
    with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            conn.execute(sa.text("SET plan_cache_mode = force_custom_plan"))
        else:
            conn.execute(sa.text("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"))
        flavor = (
            "mariadb" if "mariadb" in str(conn.execute(sa.text("SELECT VERSION()")).scalar()).lower() else db.dialect
        )
        hi = conn.execute(
            sa.text(
                f"SELECT MAX(experiment_id) FROM (SELECT experiment_id FROM experiment_tags WHERE {k} = :src"
                f" AND experiment_id > {CUT} ORDER BY experiment_id LIMIT {BATCH}) b"
            ),
            CONSTANTS,
        ).scalar()
        rows = int(conn.execute(sa.text("SELECT COUNT(*) FROM experiment_tags")).scalar_one())
        conn.rollback()
        for name, (statement, bounded) in checks.items():
            lo, upper = (CUT // 4, CUT // 4 + 10 * BATCH) if name == "revert" else (CUT + 1, int(hi))
            binds = {**CONSTANTS, "lo": lo, "hi": upper, "run": 2, "now": 2}
            limit = 4 * BATCH if bounded else 2 * rows
            bad: list[str] = []
            if name in ("first_missing", "missing"):  # as they run: after the whole-table settings
                for line in sql.whole_table_setup:
                    conn.execute(sa.text(line))
            if db.dialect == "postgresql":
                plan = conn.execute(sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + statement), binds).scalar()[0]
                examined, bad = _pg_examined(plan, bounded)
            elif flavor == "mariadb":
                plan = json.loads(conn.execute(sa.text("ANALYZE FORMAT=JSON " + statement), binds).all()[0][0])
                examined = _mariadb_examined(plan)
            else:  # MySQL explains the SELECT of an INSERT ... SELECT, not the INSERT
                query = (
                    statement[statement.index("SELECT") :].split(" ON DUPLICATE KEY")[0]
                    if statement.startswith("INSERT")
                    else statement
                )
                plan = conn.execute(sa.text("EXPLAIN ANALYZE " + query), binds).all()[0][0]
                examined = _mysql_examined(plan)
            conn.rollback()
            if examined > limit or bad:
                failures.append(f"{name}: {examined} rows of experiment_tags examined (at most {limit}) {bad}")
    assert not failures, failures
