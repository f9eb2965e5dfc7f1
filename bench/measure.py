"""The individual measurements. Each takes a database URL that the caller made fresh for it.

All timings are wall-clock (``time.perf_counter``); ratios between measurements taken in the same run are
what the benchmark reports, never the absolute seconds alone.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backfill import sql
from backfill.connect import create_engine
from backfill.job import Backfill
from backfill.retry import Timeouts
from backfill.schema import metadata
from backfill.urls import parse_url
from backfill.walk import Settings
from bench.child import RSS_PREFIX

REPO = Path(__file__).resolve().parent.parent
# The floor and the anti-join count run far longer than one batch: no statement limit for them.
GENEROUS = Timeouts(lock=30.0, statement=3600.0)


def engine_for(url: str, timeouts: Timeouts = GENEROUS) -> sa.Engine:
    """An engine with the tool's own session settings (READ COMMITTED on MySQL, timeouts)."""
    return create_engine(parse_url(url), timeouts)


def _binds(**extra: Any) -> dict[str, Any]:
    return {**sql.CONSTANTS, **extra}


def _k(dialect: str) -> str:
    return "`key`" if dialect == "mysql" else "key"


def _missing_where(dialect: str) -> str:
    """Gateway experiments without an isGateway row: the same predicate as the tool's, written out."""
    k = _k(dialect)
    value = "BINARY s.value = :gw" if dialect == "mysql" else "s.value = :gw"
    return (
        f"FROM experiment_tags s WHERE s.{k} = :src AND {value} AND NOT EXISTS"
        f" (SELECT 1 FROM experiment_tags g WHERE g.{k} = :isgw AND g.experiment_id = s.experiment_id)"
    )


def anti_join_count_sql(dialect: str) -> str:
    return f"SELECT COUNT(*) {_missing_where(dialect)}"


def single_statement_sql(dialect: str) -> str:
    """The floor: one INSERT ... SELECT with the dialect's conflict handling, no ledger."""
    k = _k(dialect)
    columns = "CAST(:isgw AS VARCHAR), CAST(:tv AS VARCHAR)" if dialect == "postgresql" else ":isgw, :tv"
    insert = f"INSERT INTO experiment_tags ({k}, value, experiment_id) SELECT {columns}, s.experiment_id"
    if dialect == "mysql":
        return f"{insert} {_missing_where(dialect)} ON DUPLICATE KEY UPDATE experiment_tags.{k} = experiment_tags.{k}"
    return f"{insert} {_missing_where(dialect)} ON CONFLICT ({k}, experiment_id) DO NOTHING"


def warm(url: str) -> None:
    """Read what a backfill reads, so the measurement after it starts from comparably warm caches."""
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            # Columns that no index holds, so the tables themselves are read (InnoDB: the clustered index).
            conn.execute(sa.text("SELECT COUNT(*), SUM(LENGTH(artifact_location)) FROM experiments")).all()
            conn.execute(sa.text("SELECT COUNT(*), SUM(LENGTH(value)) FROM experiment_tags")).all()
            conn.execute(sa.text(anti_join_count_sql(engine.dialect.name)), _binds()).all()
    finally:
        engine.dispose()


@dataclass
class Timed:
    rows: int
    seconds: float


def single_statement(url: str, offline_script: bool = False) -> Timed:
    """The floor, in one transaction: the plain statement, or (offline_script) ``sql.offline_backfill``."""
    engine = engine_for(url)
    dialect = engine.dialect.name
    statements = sql.offline_backfill(dialect) if offline_script else (single_statement_sql(dialect),)
    # The script's own transaction control is replaced by the one transaction below.
    statements = tuple(s for s in statements if not re.match(r"(START TRANSACTION|BEGIN|COMMIT)\b", s, re.I))
    binds = _binds(run=None, now=time.time_ns())
    try:
        with engine.connect() as conn:
            if offline_script:  # the ledger table exists before the script's INSERTs (its migration makes it)
                with conn.begin():
                    metadata.create_all(conn, checkfirst=True)
            t0 = time.perf_counter()
            with conn.begin():
                rows = 0
                for statement in statements:
                    result = conn.execute(sa.text(statement), binds)
                    if "INSERT INTO EXPERIMENT_TAGS" in statement.upper():
                        rows = result.rowcount
            return Timed(rows, time.perf_counter() - t0)
    finally:
        engine.dispose()


def anti_join_count(url: str, repeat: int = 3) -> Timed:
    """One ``SELECT COUNT(*)`` of gateway experiments lacking isGateway: the median of ``repeat`` runs."""
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            times, count = [], 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                count = int(conn.execute(sa.text(anti_join_count_sql(engine.dialect.name)), _binds()).scalar_one())
                times.append(time.perf_counter() - t0)
                conn.rollback()
            return Timed(count, statistics.median(times))
    finally:
        engine.dispose()


def backfill_subprocess(url: str, *options: str, variant: str | None = None) -> dict[str, Any]:
    """``mlflow-gateway-backfill run --json -q`` in a child process: its report plus the child's peak RSS.

    The child is the real CLI (through bench.child, which may first apply a prototype ``variant``) and
    reports its own peak RSS (see bench.child for why the parent cannot read it with wait4).
    """
    command = [sys.executable, "-m", "bench.child", *(["--variant", variant] if variant else [])]
    command += ["run", "--database-url", url, "--json", "-q", *options]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise RuntimeError(f"backfill run failed ({child.returncode}): {child.stderr[-2000:]}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    rss_kb = next(int(line.split()[1]) for line in child.stderr.splitlines() if line.startswith(RSS_PREFIX))
    trace = [line[len("trace: ") :] for line in child.stderr.splitlines() if line.startswith("trace: ")]
    return {
        **report,
        "peak_rss_mb": round(rss_kb / 1024, 1),
        "process_seconds": round(wall, 3),
        **({"trace": trace} if trace else {}),  # --variant trace: seconds per statement shape
    }


def rerun(url: str, repeat: int = 3) -> float:
    """The median time of a no-op ``run`` (everything already tagged) at default settings, in-process."""
    engine = create_engine(parse_url(url))
    try:
        engine.connect().close()  # connection set up once, as the anti-join count's is
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            report = Backfill(engine, Settings()).run()
            times.append(time.perf_counter() - t0)
            if report.inserted:
                raise RuntimeError(f"rerun inserted {report.inserted} rows: the first run was incomplete")
        return statistics.median(times)
    finally:
        engine.dispose()


def verify(url: str, repeat: int = 3) -> tuple[float, int]:
    """The median time of ``Backfill.status()`` (what `verify` runs) and the missing count it reports."""
    engine = create_engine(parse_url(url))
    try:
        engine.connect().close()
        times, missing = [], -1
        for _ in range(repeat):
            t0 = time.perf_counter()
            missing = Backfill(engine).status().missing
            times.append(time.perf_counter() - t0)
        return statistics.median(times), missing
    finally:
        engine.dispose()


def mlflow_client_loop(url: str, sample: int, page: int = 100) -> dict[str, Any]:
    """What a user would otherwise write: search gateway experiments, tag each, through MlflowClient.

    Runs on the first ``sample`` active gateway experiments only (a full run would take hours at 1M); the
    caller extrapolates per experiment. The search pages by OFFSET, so deeper pages of a full run would
    cost more than these first ones: the extrapolation flatters the client loop.
    """
    import warnings

    os.environ.setdefault("MLFLOW_CRYPTO_KEK_PASSPHRASE", "bench-only-passphrase")
    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = MlflowClient(tracking_uri=url)
        client.get_experiment("0")  # store set-up (schema check, engine) is not part of the loop
        query = f"tags.`{sql.SOURCE_TYPE_KEY}` = '{sql.GATEWAY}'"
        t0 = time.perf_counter()
        seen = tagged = 0
        token = None
        while seen < sample:
            experiments = client.search_experiments(filter_string=query, max_results=page, page_token=token)
            for experiment in experiments:
                seen += 1
                if sql.IS_GATEWAY_KEY not in experiment.tags:
                    client.set_experiment_tag(experiment.experiment_id, sql.IS_GATEWAY_KEY, sql.TRUE)
                    tagged += 1
            token = experiments.token
            if not token:
                break
        seconds = time.perf_counter() - t0
    store = client._tracking_client.store
    getattr(store, "engine", None) and store.engine.dispose()
    return {"sample_experiments": seen, "sample_tagged": tagged, "sample_seconds": round(seconds, 3)}
