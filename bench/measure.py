"""The individual measurements. Each takes a database URL that the caller made fresh for it.

All timings are wall-clock (``time.perf_counter``); ratios between measurements taken side by side in the
same run are what the benchmark reports, never the absolute seconds alone.

The bench's own statements (the single-statement floor, the reference counts) run on plain SQLAlchemy
engines in SQLAlchemy's own transactions; the tool's engines (``backfill.connect.create_engine``) are
autocommit and send their own BEGIN, so they serve only the tool's commands here.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from backfill import sql
from backfill.connect import create_engine
from backfill.errors import BackfillError, ExitCode
from backfill.job import Backfill
from backfill.schema import metadata
from backfill.urls import parse_url
from backfill.walk import Settings
from bench import seed
from bench.child import BATCH_PREFIX, RSS_PREFIX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_engine(url: str) -> sa.Engine:
    """An engine of the bench's own: real transactions; READ COMMITTED on the MySQL family, as the tool's
    sessions (so that the floor's INSERT ... SELECT takes no more locks than the tool's batches)."""
    if url.startswith("mysql"):
        return sa.create_engine(url, poolclass=sa.NullPool, isolation_level="READ COMMITTED")
    return sa.create_engine(url, poolclass=sa.NullPool)


def _binds(**extra: Any) -> dict[str, Any]:
    return {**sql.CONSTANTS, **extra}


def _k(dialect: str) -> str:
    return "`key`" if dialect == "mysql" else "key"


def _exact(dialect: str, column: str, param: str) -> str:
    """Exact equality that keeps the index (MySQL family: the collation's ``=`` and a binary one)."""
    if dialect == "mysql":
        return f"{column} = :{param} AND CAST({column} AS BINARY) = :{param}"
    return f"{column} = :{param}"


def _missing(dialect: str, with_experiments: bool) -> str:
    """FROM ... WHERE of the gateway experiments without an isGateway row, as one anti-join that the planner
    is free to execute as it likes. ``with_experiments``: the current definition (the experiment row must
    exist); without it, the definition the benchmark used before, which never reads ``experiments``."""
    k = _k(dialect)
    join = " JOIN experiments e ON e.experiment_id = s.experiment_id" if with_experiments else ""
    return (
        f"FROM experiment_tags s{join} WHERE {_exact(dialect, f's.{k}', 'src')} AND {_exact(dialect, 's.value', 'gw')}"
        f" AND NOT EXISTS (SELECT 1 FROM experiment_tags g WHERE g.{k} = :isgw AND g.experiment_id = s.experiment_id)"
    )


def count_sql(dialect: str, with_experiments: bool = True) -> str:
    """R1 (``with_experiments``): one anti-join COUNT(*) under the current definition; R0: the old one."""
    return f"SELECT COUNT(*) {_missing(dialect, with_experiments)}"


def single_statement_sql(dialect: str) -> str:
    """The floor: one INSERT ... SELECT of every missing row with the dialect's conflict handling, no ledger."""
    k = _k(dialect)
    columns = "CAST(:isgw AS VARCHAR), CAST(:tv AS VARCHAR)" if dialect == "postgresql" else ":isgw, :tv"
    insert = f"INSERT INTO experiment_tags ({k}, value, experiment_id) SELECT {columns}, s.experiment_id"
    if dialect == "mysql":
        return f"{insert} {_missing(dialect, True)} ON DUPLICATE KEY UPDATE experiment_tags.{k} = experiment_tags.{k}"
    return f"{insert} {_missing(dialect, True)} ON CONFLICT ({k}, experiment_id) DO NOTHING"


def warm(url: str) -> None:
    """Read what a backfill reads, so the measurement after it starts from comparably warm caches."""
    engine = plain_engine(url)
    try:
        with engine.connect() as conn:
            # Columns that no index holds, so the tables themselves are read (InnoDB: the clustered index).
            conn.execute(sa.text("SELECT COUNT(*), SUM(LENGTH(artifact_location)) FROM experiments")).all()
            conn.execute(sa.text("SELECT COUNT(*), SUM(LENGTH(value)) FROM experiment_tags")).all()
            conn.execute(sa.text(count_sql(engine.dialect.name)), _binds()).all()
    finally:
        engine.dispose()


class RunFailed(RuntimeError):
    """The child `run` exited with an error (or was ended at the bench's time limit: ``code`` None): its exit
    code, its last line on stderr (the tool's message) and its wall-clock seconds."""

    def __init__(self, code: int | None, stderr: str, seconds: float) -> None:
        self.code = code
        self.seconds = seconds
        self.message = next(
            (line for line in reversed(stderr.splitlines()) if line.startswith("Error:")), stderr[-500:].strip()
        )
        super().__init__(f"backfill run failed ({code}): {stderr[-2000:]}")


def journal_mode(url: str, mode: str) -> str:
    """SQLite: set the database's journal mode (WAL persists in the file); returns the mode now in force."""
    engine = plain_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql(f"PRAGMA journal_mode = {mode}").scalar())
    finally:
        engine.dispose()


def missing_rows(url: str) -> int:
    """Gateway experiments still without isGateway (R1's count): after a run that gave up, what it left."""
    engine = plain_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(count_sql(engine.dialect.name)), _binds()).scalar_one())
    finally:
        engine.dispose()


@dataclass
class Timed:
    rows: int
    seconds: float


def single_statement(url: str, offline_script: bool = False) -> Timed:
    """The floor in one transaction, commit included: the plain statement, or (``offline_script``) the
    statements of Alembic's ``--sql`` script (the same plus the ledger), its own BEGIN/COMMIT replaced by
    that one transaction."""
    engine = plain_engine(url)
    dialect = engine.dialect.name
    statements = sql.offline_backfill(dialect) if offline_script else (single_statement_sql(dialect),)
    statements = tuple(s for s in statements if not re.match(r"(START TRANSACTION|BEGIN|COMMIT)\b", s, re.I))
    binds = _binds(run=None, now=time.time_ns())
    try:
        with engine.connect() as conn:
            if offline_script:  # the ledger exists before the script's INSERTs (its migration makes it)
                with conn.begin():
                    metadata.create_all(conn, checkfirst=True)
            t0 = time.perf_counter()
            rows = 0
            with conn.begin():
                for statement in statements:
                    result = conn.execute(sa.text(statement), binds)
                    if "INSERT INTO EXPERIMENT_TAGS" in statement.upper():  # PostgreSQL: inside a CTE
                        rows = result.rowcount
            return Timed(rows, time.perf_counter() - t0)
    finally:
        engine.dispose()


def backfill_subprocess(
    url: str, *options: str, variant: str | None = None, limit: float | None = None
) -> dict[str, Any]:
    """``mlflow-gateway-backfill run --json -q`` in a child process: its report, its peak RSS, every batch.

    The child is the real CLI (through bench.child, which may first apply a prototype ``variant``).
    ``batches``: one ``[hi, scanned, inserted, seconds, size, rss_kb]`` per committed batch, in order.
    ``limit``: seconds after which the child is sent SIGTERM (it stops after its batch in flight, exit 7).
    Raises RunFailed when the run does not exit 0.
    """
    command = [sys.executable, "-m", "bench.child", *(["--variant", variant] if variant else [])]
    command += ["run", "--database-url", url, "--json", "-q", *options]
    env = {**os.environ, "PYTHONPATH": REPO}
    t0 = time.perf_counter()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            process.terminate()
            stdout, stderr = process.communicate()
            stderr += f"\nError: ended by the bench after {limit:g} s"
    wall = time.perf_counter() - t0
    child = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if child.returncode != 0:
        raise RunFailed(child.returncode, child.stderr, wall)
    report = json.loads(child.stdout.strip().splitlines()[-1])
    lines = child.stderr.splitlines()
    rss_kb = next(int(line.split()[1]) for line in lines if line.startswith(RSS_PREFIX))
    batches = [json.loads(line[len(BATCH_PREFIX) :]) for line in lines if line.startswith(BATCH_PREFIX)]
    trace = [line[len("trace: ") :] for line in lines if line.startswith("trace: ")]
    rss_after = [b[5] for b in batches]
    return {
        **report,
        "peak_rss_mb": round(rss_kb / 1024, 1),
        # Flat: the RSS after the last batch against the RSS after the first one.
        "rss_mb_after_first_batch": round(rss_after[0] / 1024, 1) if rss_after else None,
        "rss_mb_after_last_batch": round(rss_after[-1] / 1024, 1) if rss_after else None,
        "process_seconds": round(wall, 3),
        "batch_trace": batches,
        **({"trace": trace} if trace else {}),  # --variant trace: seconds per statement shape
    }


@dataclass
class Rounds:
    """Named operations timed in interleaved rounds, each round mirroring the one before (A B C, C B A, ...:
    every operation runs as often before as after each other one); every time per name."""

    ops: dict[str, Callable[[], object]]
    times: dict[str, list[float]] = field(default_factory=dict)

    def run(self, rounds: int, first: int = 0) -> dict[str, list[float]]:
        """``rounds`` rounds; ``first``: the index of the first one (its order), so that rounds spread over
        several databases go on alternating."""
        names = list(self.ops)
        for name in names:  # a first, uncounted round: every statement prepared and its pages cached
            self.ops[name]()
        for r in range(first, first + rounds):
            for name in names if r % 2 == 0 else reversed(names):
                t0 = time.perf_counter()
                self.ops[name]()
                self.times.setdefault(name, []).append(time.perf_counter() - t0)
        return self.times


def finished_database(url: str, rounds: int, analyze_first: bool, first: int = 0) -> dict[str, list[float]]:
    """On a database the backfill has finished: the times of the no-op rerun (``run``), ``verify``
    (``Backfill.missing``) and ``status``, interleaved (Rounds, from round ``first``); with ``analyze_first``,
    on freshly analyzed statistics and interleaved with the reference counts R0 and R1 (the yardstick is
    measured on those).
    """
    plain = plain_engine(url)
    tool = create_engine(parse_url(url))
    dialect = plain.dialect.name
    try:
        if analyze_first:
            seed.analyze(plain)
        with plain.connect() as conn:

            def count(with_experiments: bool) -> Callable[[], object]:
                def op() -> object:
                    found = conn.execute(sa.text(count_sql(dialect, with_experiments)), _binds()).scalar_one()
                    conn.rollback()
                    if found:
                        raise RuntimeError(f"{found} gateway experiments still lack isGateway")
                    return found

                return op

            def rerun() -> object:
                report = Backfill(tool, Settings()).run()
                if report.inserted:
                    raise RuntimeError(f"the rerun inserted {report.inserted} rows: the first run was incomplete")
                return report

            def verify() -> object:
                missing = Backfill(tool).missing()
                if missing:
                    raise RuntimeError(f"verify found {missing} gateway experiments without isGateway")
                return missing

            references = {"R0": count(False), "R1": count(True)} if analyze_first else {}
            ops = {
                **references,
                "rerun": rerun,
                "verify": verify,
                "status": lambda: Backfill(tool).status(),
            }
            return Rounds(ops).run(rounds, first)
    finally:
        tool.dispose()
        plain.dispose()


class _Marks:
    """A run's progress callback that notes when each batch ended (``Progress`` of backfill.walk)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def start(self, total: int) -> None: ...

    def advance(self, scanned: int, inserted: int) -> None:
        self.marks.append((time.perf_counter(), inserted))

    def waiting(self, lag: object) -> None: ...

    def close(self) -> None: ...


def sweep_point(url: str, batch_size: int, min_batches: int, min_seconds: float) -> dict[str, Any] | None:
    """``run --fixed --batch-size N`` over the next stretch of the walk, in this process: it stops once
    ``min_batches`` batches took at least ``min_seconds``, and the next point resumes where it stopped.

    The rate is the rows of the batches after the first over the time from the first batch's end to the
    last one's (the first batch of each point pays for its new statement shape). None: nothing was left.
    """
    engine = create_engine(parse_url(url))
    marks = _Marks()

    def enough() -> bool:
        m = marks.marks
        return len(m) > min_batches and m[-1][0] - m[0][0] >= min_seconds

    try:
        Backfill(engine, Settings(batch_size=batch_size, adaptive=False)).run(progress=marks, should_stop=enough)
    except BackfillError as exc:
        if exc.code != ExitCode.STOPPED:
            raise
    finally:
        engine.dispose()
    m = marks.marks
    if len(m) < 2:
        return None
    seconds = m[-1][0] - m[0][0]
    rows = sum(inserted for _, inserted in m[1:])
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(m)]
    return {
        "batch_size": batch_size,
        "batches": len(m) - 1,
        "rows": rows,
        "seconds": round(seconds, 4),
        "rows_per_second": round(rows / seconds) if seconds else None,
        "batch_seconds_p50": round(statistics.median(gaps), 4),
    }


def mlflow_client_loop(url: str, sample: int, page: int = 100) -> dict[str, Any]:
    """What a user would otherwise write: search gateway experiments, tag each, through MlflowClient.

    Runs on the first ``sample`` active gateway experiments only (a full run would take hours at 1M); the
    caller extrapolates per experiment. The search pages by OFFSET, so deeper pages of a full run would
    cost more than these first ones: the extrapolation flatters the client loop.
    """
    import warnings

    os.environ.setdefault("MLFLOW_CRYPTO_KEK_PASSPHRASE", "bench-only-passphrase")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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
