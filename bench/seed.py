"""Fill an MLflow database with N synthetic experiments using set-based SQL (never row by row).

The row source is ``generate_series`` on PostgreSQL, MariaDB's ``seq_1_to_N`` sequence table, and a
recursive CTE on SQLite; each table (and each tag key) is one ``INSERT ... SELECT``, so a million
experiments take seconds, not the hour a per-row loop would.

What experiment ``i`` (1..N) looks like, so every figure in the benchmark can be checked by hand:

* ``i % 10 == 0``: gateway (``sourceType=GATEWAY``, ``sourceId=ep-<i>``), named ``gateway/endpoint-<i>``;
  of those, ``i % 200 == 0`` already carries ``isGateway=true`` (as MLflow 3.10.1 writes it).
* ``i % 29 == 0``: deleted (``lifecycle_stage='deleted'``), gateway or not: deleted experiments keep tags.
* ``i % 5000 == 1`` / ``== 2``: near misses, ``sourceType='gateway'`` / ``'GATEWAY '`` (must stay untouched).
* every experiment has ``mlflow.note.content`` and ``team``; non-gateway ones also ``mlflow.user``:
  3 tags each (4 for near misses), 4 for gateway experiments (5 when already tagged).

Usable on its own: ``python -m bench.seed --database-url URL --experiments 100000`` creates MLflow's
schema first when the database is empty (through MLflow itself), then replaces any bench rows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from backfill.sql import GATEWAY, IS_GATEWAY_KEY, SOURCE_TYPE_KEY, TRUE

SOURCE_ID_KEY = "mlflow.experiment.sourceId"


@dataclass(frozen=True)
class Expected:
    """What the seed guarantees for N experiments (derived from the rules above, not queried)."""

    experiments: int
    gateway: int
    deleted_gateway: int  # MLflow's client API cannot tag these
    already_tagged: int
    missing: int  # gateway experiments lacking isGateway: what a complete backfill inserts
    tag_rows: int


def expected(n: int) -> Expected:
    """The counts :func:`seed` produces for ``n`` experiments."""
    gateway, tagged = n // 10, n // 200
    near = (n - 1 + 5000) // 5000 + (n - 2 + 5000) // 5000
    tag_rows = 2 * n + (n - gateway) + 2 * gateway + tagged + near
    return Expected(n, gateway, n // 290, tagged, gateway - tagged, tag_rows)


def _numbers(dialect: str, n: int) -> str:
    """A FROM clause yielding column ``i`` = 1..n."""
    if dialect == "postgresql":
        return f"generate_series(1, {n}) AS g(i)"
    if dialect == "mysql":
        return f"(SELECT seq AS i FROM seq_1_to_{n}) g"
    return "g"  # SQLite: the recursive CTE named by _with()


def _with(dialect: str, n: int) -> str:
    if dialect == "sqlite":
        return f"WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < {n}) "
    return ""


def _concat(dialect: str) -> Callable[..., str]:
    if dialect == "mysql":
        return lambda *parts: f"CONCAT({', '.join(parts)})"
    # Parenthesised: SQLite's || binds tighter than %.
    return lambda *parts: "(" + " || ".join(f"({p})" for p in parts) + ")"


def statements(dialect: str, n: int) -> list[str]:
    """The INSERT ... SELECT statements that seed experiments 1..n (dialect: sqlite, postgresql, mysql)."""
    cat = _concat(dialect)
    k = "`key`" if dialect == "mysql" else "key"
    src = f"{_with(dialect, n)}SELECT"
    frm = f"FROM {_numbers(dialect, n)}"
    tag = f"INSERT INTO experiment_tags ({k}, value, experiment_id) {src}"
    gateway_name, exp_name = cat("'gateway/endpoint-'", "i"), cat("'exp-'", "i")
    artifacts, team, source_id = cat("'mlflow-artifacts:/'", "i"), cat("'team-'", "i % 17"), cat("'ep-'", "i")
    note = cat("'Notes on experiment '", "i", "': baseline sweep, see dashboard'")
    user = cat("'user'", "i % 97", "'@example.com'")
    return [
        "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage,"
        f" creation_time, last_update_time, workspace) {src} i,"
        f" CASE WHEN i % 10 = 0 THEN {gateway_name} ELSE {exp_name} END, {artifacts},"
        " CASE WHEN i % 29 = 0 THEN 'deleted' ELSE 'active' END,"
        f" 1700000000000 + i * 1000, 1700000000000 + i * 1000, 'default' {frm}",
        f"{tag} 'mlflow.note.content', {note}, i {frm}",
        f"{tag} 'team', {team}, i {frm}",
        f"{tag} 'mlflow.user', {user}, i {frm} WHERE i % 10 <> 0",
        f"{tag} '{SOURCE_TYPE_KEY}',"
        f" CASE WHEN i % 10 = 0 THEN '{GATEWAY}' WHEN i % 5000 = 1 THEN 'gateway' ELSE 'GATEWAY ' END, i"
        f" {frm} WHERE i % 10 = 0 OR i % 5000 IN (1, 2)",
        f"{tag} '{SOURCE_ID_KEY}', {source_id}, i {frm} WHERE i % 10 = 0",
        f"{tag} '{IS_GATEWAY_KEY}', '{TRUE}', i {frm} WHERE i % 200 = 0",
    ]


def _clear(conn: sa.Connection, dialect: str) -> None:
    """Remove every experiment but MLflow's Default (id 0) and every project table's rows."""
    conn.execute(sa.text("DELETE FROM experiment_tags WHERE experiment_id <> 0"))
    conn.execute(sa.text("DELETE FROM experiments WHERE experiment_id <> 0"))
    names = set(sa.inspect(conn).get_table_names())
    for table in ("gateway_backfill_rows", "gateway_backfill_runs"):
        if table in names:
            conn.execute(sa.text(f"DROP TABLE {table}"))


def seed(url: str, n: int, create_schema: bool = True) -> float:
    """Seed ``url`` with ``n`` experiments (replacing earlier bench rows); returns the seconds it took.

    ``create_schema``: run MLflow's own schema creation first when the database has no ``experiments``.
    """
    engine = sa.create_engine(url)
    try:
        if create_schema and not sa.inspect(engine).has_table("experiments"):
            from tests.mlflow_data import mlflow_store

            mlflow_store(url).engine.dispose()
        t0 = time.monotonic()
        dialect = engine.dialect.name
        with engine.begin() as conn:
            if dialect == "mysql":
                # Bulk-load settings for this session only; the data satisfies both constraints by construction.
                conn.execute(sa.text("SET SESSION foreign_key_checks = 0, unique_checks = 0"))
            elif dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA synchronous = OFF")
            _clear(conn, dialect)
            for statement in statements(dialect, n):
                conn.execute(sa.text(statement.replace(":", r"\:")))
        analyze(engine)
        return time.monotonic() - t0
    finally:
        engine.dispose()


def analyze(engine: sa.Engine) -> None:
    """Fresh planner statistics, as a long-lived server would have (autovacuum / InnoDB's auto stats).

    SQLite is left alone: MLflow never runs ANALYZE there, so users' files have no sqlite_stat1.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE experiments"))
            conn.execute(sa.text("VACUUM ANALYZE experiment_tags"))
    elif engine.dialect.name == "mysql":
        with engine.connect() as conn:
            conn.execute(sa.text("ANALYZE TABLE experiments, experiment_tags")).all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="SQLAlchemy URL of an empty or MLflow database")
    parser.add_argument("--experiments", type=int, default=100_000, help="how many experiments (default 100000)")
    args = parser.parse_args(argv)
    seconds = seed(args.database_url, args.experiments)
    print(f"seeded {args.experiments} experiments in {seconds:.1f}s: {expected(args.experiments)}")


if __name__ == "__main__":
    main()
