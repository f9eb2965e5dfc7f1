"""Fill an MLflow database with N synthetic experiments using set-based SQL (never row by row).

The row source is ``generate_series`` on PostgreSQL, a recursive CTE on SQLite and a cross join of
digits on the MySQL family (Oracle MySQL has no sequence engine); each table (and each tag key) is one
``INSERT ... SELECT``, so a million experiments take seconds, not the hour a per-row loop would.

Two shapes, the data users really have:

* ``3.10.0``: MLflow 3.10.0 wrote every gateway experiment: no ``isGateway`` row anywhere;
* ``mixed``: 3.10.0 wrote the older half of the gateway experiments, 3.10.1+ the newer half, with
  ``isGateway=true``.

Experiment ``i`` (1..N), so that every figure can be checked by hand:

* ``i % 10 == 0``: gateway (``sourceType=GATEWAY``, ``sourceId=ep-<i>``), named ``gateway/endpoint-<i>``;
  in the ``mixed`` shape those with ``i > N / 2`` also carry ``isGateway=true``.
* ``i % 29 == 0``: deleted (``lifecycle_stage='deleted'``), gateway or not: deleted experiments keep tags.
* ``i % 5000 == 1`` / ``== 2``: near misses, ``sourceType='gateway'`` / ``'GATEWAY '`` (must stay untouched).
* every experiment has ``mlflow.note.content`` and ``team``; non-gateway ones also ``mlflow.user``.

Then the statistics are what a server that has run MLflow for a while has: PostgreSQL's autovacuum has
analyzed both tables (``VACUUM ANALYZE``), InnoDB has recalculated its persistent index statistics
(``ANALYZE TABLE``; on MariaDB without engine-independent statistics, which it collects only when asked
to). SQLite is left without ``sqlite_stat1``: MLflow never runs ANALYZE there. Experiment ids continue
after N (PostgreSQL's sequence is moved on), so MLflow-like writers can create experiments meanwhile.

Usable on its own: ``python -m bench.seed --database-url URL --experiments 100000 --shape mixed`` creates
MLflow's schema first when the database is empty (through MLflow itself), then replaces any bench rows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from backfill.sql import GATEWAY, IS_GATEWAY_KEY, SOURCE_TYPE_KEY, TRUE

SOURCE_ID_KEY = "mlflow.experiment.sourceId"
SHAPES = ("3.10.0", "mixed")


@dataclass(frozen=True)
class Expected:
    """What the seed guarantees for N experiments of one shape (derived from the rules above, not queried)."""

    experiments: int
    shape: str
    gateway: int
    deleted_gateway: int  # MLflow's client API cannot tag these
    already_tagged: int
    missing: int  # gateway experiments lacking isGateway: what a complete backfill inserts
    tag_rows: int


def tagged_from(n: int, shape: str) -> int:
    """Gateway experiments with an id above this carry isGateway (nothing above ``n``: none do)."""
    return n // 2 if shape == "mixed" else n


def expected(n: int, shape: str) -> Expected:
    """The counts :func:`seed` produces for ``n`` experiments of ``shape``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    gateway = n // 10
    tagged = gateway - tagged_from(n, shape) // 10
    near = (n - 1 + 5000) // 5000 + (n - 2 + 5000) // 5000
    tag_rows = 2 * n + (n - gateway) + 2 * gateway + tagged + near
    return Expected(n, shape, gateway, n // 290, tagged, gateway - tagged, tag_rows)


def _numbers(dialect: str, n: int) -> str:
    """A FROM clause yielding column ``i`` = 1..n."""
    if dialect == "postgresql":
        return f"generate_series(1, {n}) AS g(i)"
    if dialect == "mysql":
        digits = "(SELECT 0 d UNION ALL " + " UNION ALL ".join(f"SELECT {d}" for d in range(1, 10)) + ")"
        places = len(str(max(n - 1, 1)))
        total = " + ".join(f"{10**p} * d{p}.d" for p in range(places))
        joins = ", ".join(f"{digits} d{p}" for p in range(places))
        return f"(SELECT {total} + 1 AS i FROM {joins}) g"
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


def statements(dialect: str, n: int, shape: str) -> list[str]:
    """The INSERT ... SELECT statements that seed experiments 1..n (dialect: sqlite, postgresql, mysql)."""
    cat = _concat(dialect)
    k = "`key`" if dialect == "mysql" else "key"
    src = f"{_with(dialect, n)}SELECT"
    frm = f"FROM {_numbers(dialect, n)} WHERE i <= {n}"
    tag = f"INSERT INTO experiment_tags ({k}, value, experiment_id) {src}"
    gateway_name, exp_name = cat("'gateway/endpoint-'", "i"), cat("'exp-'", "i")
    artifacts, team, source_id = cat("'mlflow-artifacts:/'", "i"), cat("'team-'", "i % 17"), cat("'ep-'", "i")
    note = cat("'Notes on experiment '", "i", "': baseline sweep, see dashboard'")
    user = cat("'user'", "i % 97", "'@example.com'")
    seeded = [
        "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage,"
        f" creation_time, last_update_time, workspace) {src} i,"
        f" CASE WHEN i % 10 = 0 THEN {gateway_name} ELSE {exp_name} END, {artifacts},"
        " CASE WHEN i % 29 = 0 THEN 'deleted' ELSE 'active' END,"
        f" 1700000000000 + i * 1000, 1700000000000 + i * 1000, 'default' {frm}",
        f"{tag} 'mlflow.note.content', {note}, i {frm}",
        f"{tag} 'team', {team}, i {frm}",
        f"{tag} 'mlflow.user', {user}, i {frm} AND i % 10 <> 0",
        f"{tag} '{SOURCE_TYPE_KEY}',"
        f" CASE WHEN i % 10 = 0 THEN '{GATEWAY}' WHEN i % 5000 = 1 THEN 'gateway' ELSE 'GATEWAY ' END, i"
        f" {frm} AND (i % 10 = 0 OR i % 5000 IN (1, 2))",
        f"{tag} '{SOURCE_ID_KEY}', {source_id}, i {frm} AND i % 10 = 0",
    ]
    if tagged_from(n, shape) < n:
        seeded.append(f"{tag} '{IS_GATEWAY_KEY}', '{TRUE}', i {frm} AND i % 10 = 0 AND i > {tagged_from(n, shape)}")
    if dialect == "postgresql":  # MLflow's own inserts take the next id from the sequence
        seeded.append(f"SELECT setval(pg_get_serial_sequence('experiments', 'experiment_id'), {n})")
    return seeded


def _clear(conn: sa.Connection) -> None:
    """Remove every experiment but MLflow's Default (id 0) and the project's tables."""
    conn.execute(sa.text("DELETE FROM experiment_tags WHERE experiment_id <> 0"))
    conn.execute(sa.text("DELETE FROM experiments WHERE experiment_id <> 0"))
    names = set(sa.inspect(conn).get_table_names())
    for table in ("gateway_backfill_rows", "gateway_backfill_runs"):
        if table in names:
            conn.execute(sa.text(f"DROP TABLE {table}"))


def seed(url: str, n: int, shape: str, create_schema: bool = True) -> float:
    """Seed ``url`` with ``n`` experiments of ``shape`` (replacing earlier bench rows) and analyze it, as
    :func:`analyze` does; returns the seconds it took. ``create_schema``: run MLflow's own schema creation
    first when the database has no ``experiments``."""
    expected(n, shape)  # checks the shape
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        if create_schema and not sa.inspect(engine).has_table("experiments"):
            from tests.mlflow_data import mlflow_store

            mlflow_store(url).engine.dispose()
        t0 = time.monotonic()
        dialect = engine.dialect.name
        with engine.begin() as conn:
            if dialect == "mysql":
                # Bulk-load settings for this session only; the data satisfies both constraints by construction.
                conn.execute(sa.text("SET SESSION foreign_key_checks = 0, unique_checks = 0, sql_log_bin = 0"))
            elif dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA synchronous = OFF")
            _clear(conn)
            for statement in statements(dialect, n, shape):
                conn.execute(sa.text(statement.replace(":", r"\:")))
        analyze(engine)
        return time.monotonic() - t0
    finally:
        engine.dispose()


def analyze(engine: sa.Engine) -> None:
    """The statistics a long-running server has of both MLflow tables (see the module docstring)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE experiments"))
            conn.execute(sa.text("VACUUM ANALYZE experiment_tags"))
    elif engine.dialect.name == "mysql":
        with engine.connect() as conn:
            if "mariadb" in str(conn.execute(sa.text("SELECT VERSION()")).scalar()).lower():
                conn.execute(sa.text("SET SESSION use_stat_tables = 'NEVER'"))
            conn.execute(sa.text("ANALYZE TABLE experiments, experiment_tags")).all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.seed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="SQLAlchemy URL of an empty or MLflow database")
    parser.add_argument("--experiments", type=int, default=100_000, help="how many experiments (default 100000)")
    parser.add_argument("--shape", choices=SHAPES, default=SHAPES[0], help="which data (default 3.10.0)")
    args = parser.parse_args(argv)
    seconds = seed(args.database_url, args.experiments, args.shape)
    print(f"seeded {args.experiments} experiments in {seconds:.1f}s: {expected(args.experiments, args.shape)}")


if __name__ == "__main__":
    main()
