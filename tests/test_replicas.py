"""Read replicas, on real replication: a primary and a streaming replica on one Docker network (PostgreSQL hot
standby; Oracle MySQL and MariaDB GTID replication), images built here.

The run holds while the replica does not replay and finishes exactly once it does; a replica that is down
stops the run resumably; `verify --replica-url` answers for the replica; and a real `mlflow server` reading
from the replica lists no gateway experiment once `run` returns.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from backfill.errors import ExitCode
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import REPO, Db, Server, run_cli

pytestmark = pytest.mark.backends("postgresql", "mysql")


@dataclass
class Pair:
    backend: str
    dialect: str
    primary: Any
    replica: Any
    network: Any

    def url(self, container: Any, database: str) -> str:
        url = sa.make_url(container.get_connection_url()).set(database=database)
        if self.dialect == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def pair(backend: str) -> Iterator[Pair]:
    from tests import backends
    from tests.conftest import DIALECTS

    primary, replica, network = backends.start_primary_and_replica(backend)
    try:
        yield Pair(backend, DIALECTS[backend], primary, replica, network)
    finally:
        backends.stop_replication_pair(primary, replica, network)


@pytest.fixture
def replicated(pair: Pair, server: Server) -> Iterator[tuple[Db, str]]:
    """A fresh MLflow database on the primary with 60 gateway experiments, replicated; (primary Db, replica URL)."""
    from tests import backends
    from tests.mlflow_data import mlflow_store

    name = f"r_{time.time_ns() % 10**10}"
    admin = sa.create_engine(pair.url(pair.primary, "postgres" if pair.dialect == "postgresql" else "mgb"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            sa.text(f'CREATE DATABASE "{name}"' if pair.dialect == "postgresql" else f"CREATE DATABASE `{name}`")
        )
    admin.dispose()
    url = pair.url(pair.primary, name)
    mlflow_store(url).engine.dispose()
    db = Db(pair.backend, url, server, sa.create_engine(url))
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1000, 1060)])
    backends.wait_for_replica(pair.primary, pair.replica)
    yield db, pair.url(pair.replica, name)
    db.engine.dispose()


def replica_tagged(replica_url: str) -> set[int]:
    engine = sa.create_engine(replica_url)
    key = "`key`" if engine.dialect.name == "mysql" else "key"
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT experiment_id FROM experiment_tags WHERE {key} = :k"), {"k": ISGW})
            return {int(r[0]) for r in rows}
    finally:
        engine.dispose()


def _wait_until_up(url: str, seconds: float = 120) -> None:
    """A restarted server: wait until it accepts a connection and answers."""
    engine = sa.create_engine(url)
    deadline = time.monotonic() + seconds
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                    return
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        engine.dispose()


def _start_run(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "backfill", "run", "--database-url", url, "--json", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _start_held_run(url: str, replica_url: str, *args: str) -> subprocess.Popen[str]:
    """A slow run (10 experiments a batch, 0.2 s apart) that holds as soon as the replica lags 0.1 s."""
    return _start_run(
        url,
        *("--replica-url", replica_url, "--max-replica-lag", "0.1", "--batch-size", "10", "--fixed", "--sleep", "0.2"),
        *args,
    )


def _read_until(stream: Any, needle: str, seconds: float = 120) -> str:
    seen = ""
    deadline = time.monotonic() + seconds
    while needle not in seen and time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen += line
    assert needle in seen, seen
    return seen


def test_the_run_holds_while_the_replica_does_not_replay(pair: Pair, replicated: tuple[Db, str]) -> None:
    from tests import backends

    db, replica_url = replicated
    backends.pause_replication(pair.replica)
    try:
        proc = _start_held_run(db.url, replica_url)
        waited = _read_until(proc.stderr, "waiting for replica")
        event = json.loads(next(line for line in waited.splitlines() if "waiting for replica" in line))
        assert event["event"] == "waiting for replica" and event["lag_seconds"] >= 0.1
        time.sleep(2)
        assert proc.poll() is None and len(db.table(LEDGER_TABLE)) == 10  # one batch, then it holds
    finally:
        backends.resume_replication(pair.replica)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["inserted"] == 60 and report["replica_wait_seconds"] > 0
    assert replica_tagged(replica_url) == set(range(1000, 1060))  # the end waits for the replica too


def test_a_replica_that_is_down_stops_the_run_resumably(pair: Pair, replicated: tuple[Db, str]) -> None:
    from tests import backends

    db, replica_url = replicated
    pair.replica.get_wrapped_container().stop(timeout=30)
    try:
        result = run_cli(
            "run",
            "--database-url",
            db.url,
            "--replica-url",
            replica_url,
            "--replica-timeout",
            "5",
            "--batch-size",
            "10",
            "-q",
        )
    finally:
        pair.replica.get_wrapped_container().start()
    assert result.returncode == ExitCode.STOPPED, result.stderr
    assert result.stderr.count("\n") == 1 and "did not catch up" in result.stderr and "unreachable" in result.stderr
    assert "`run` again to resume" in result.stderr
    _wait_until_up(replica_url)
    backends.wait_for_replica(pair.primary, pair.replica, timeout=120)
    again = run_cli("run", "--database-url", db.url, "--replica-url", replica_url, "--json", "-q")
    assert again.returncode == 0, again.stderr
    assert {row[0] for row in db.table(LEDGER_TABLE)} == set(range(1000, 1060))
    assert replica_tagged(replica_url) == set(range(1000, 1060))


def test_verify_on_the_replica_says_what_the_ui_will_show(pair: Pair, replicated: tuple[Db, str]) -> None:
    from tests import backends

    db, replica_url = replicated
    backends.pause_replication(pair.replica)
    try:
        assert run_cli("run", "--database-url", db.url, "-q").returncode == 0  # no --replica-url: nothing waits
        assert run_cli("verify", "--database-url", db.url).returncode == 0  # the primary has everything
        lagging = run_cli("verify", "--replica-url", replica_url)
        assert lagging.returncode == ExitCode.MISSING and "missing: 60" in lagging.stdout, lagging.stderr
        status = run_cli("status", "--database-url", db.url, "--replica-url", replica_url, "--json")
        replica = json.loads(status.stdout)["replicas"][0]
        assert replica["missing"] == 60 and replica["caught_up"] is False
    finally:
        backends.resume_replication(pair.replica)
    backends.wait_for_replica(pair.primary, pair.replica)
    assert run_cli("verify", "--replica-url", replica_url).returncode == 0


def test_the_ui_reading_from_the_replica_lists_no_gateway_experiment(pair: Pair, replicated: tuple[Db, str]) -> None:
    import tempfile
    from pathlib import Path

    from tests import backends
    from tests.mlflow_server import MlflowServer
    from tests.mlflow_versions import NEWEST, ensure_venv, python_of

    db, replica_url = replicated
    names = {e: f"exp-{e}" for e in range(1000, 1060)}
    python = python_of(ensure_venv(NEWEST))
    workdir = Path(tempfile.mkdtemp(prefix="mgb-ui-"))
    ui = MlflowServer(python, db.url, workdir, read_replica=replica_url)
    # As operators deploy it: `mlflow db upgrade` on the primary, then the server, which refuses to start
    # until the replica it reads from has replayed the new schema version.
    ui.upgrade()
    backends.wait_for_replica(pair.primary, pair.replica)
    with ui:

        def listed_names() -> set[str]:
            return {e["name"] for e in ui.ui_experiments()}

        assert set(names.values()) <= listed_names()  # before: the gateway experiments are listed
        backends.pause_replication(pair.replica)
        proc = _start_run(db.url, "--replica-url", replica_url, "--max-replica-lag", "0.5")
        time.sleep(1)
        backends.resume_replication(pair.replica)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        listed = listed_names()  # at once: the run returned only once the replica had it all
    assert not set(names.values()) & listed


def test_lag_is_measured_with_the_privileges_run_needs_and_no_more(pair: Pair, replicated: tuple[Db, str]) -> None:
    """The README's grants for `run`, nothing for replication: lag is still measured (and held on)."""
    from tests import backends

    db, replica_url = replicated
    name, password = "lag_" + uuid.uuid4().hex[:6], "pw-" + uuid.uuid4().hex[:8]
    database = sa.make_url(db.url).database
    schema_objects = (
        [
            f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
            f'GRANT CONNECT ON DATABASE "{database}" TO {name}',
            f"GRANT USAGE, CREATE ON SCHEMA public TO {name}",
            f"GRANT SELECT ON experiments, experiment_tags TO {name}",
            f"GRANT INSERT ON experiment_tags TO {name}",
        ]
        if pair.dialect == "postgresql"
        else [
            f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'",
            f"GRANT SELECT ON `{database}`.experiments TO '{name}'@'%'",
            f"GRANT SELECT, INSERT ON `{database}`.experiment_tags TO '{name}'@'%'",
            f"GRANT CREATE ON `{database}`.* TO '{name}'@'%'",
        ]
    )
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in schema_objects:
            conn.execute(sa.text(statement))
        if pair.dialect == "mysql":  # table grants need the tables: the admin makes them first
            from backfill.schema import metadata

            metadata.create_all(conn)
            for table in ("gateway_backfill_runs", "gateway_backfill_rows"):
                conn.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE ON `{database}`.{table} TO '{name}'@'%'"))
    backends.wait_for_replica(pair.primary, pair.replica)

    def as_user(url: str) -> str:
        return sa.make_url(url).set(username=name, password=password).render_as_string(hide_password=False)

    backends.pause_replication(pair.replica)
    try:
        proc = _start_held_run(as_user(db.url), as_user(replica_url))
        _read_until(proc.stderr, "waiting for replica")  # measured, and held on: not a silent lag of 0
    finally:
        backends.resume_replication(pair.replica)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert replica_tagged(replica_url) == set(range(1000, 1060))


# ---------------------------------------------------------------- issue 17: what each command says while it waits


def _alembic(url: str, replica_url: str, *args: str) -> subprocess.Popen[str]:
    """`alembic` of this project, slowed down and holding as soon as the replica lags 0.1 s."""
    command = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "-x", f"database-url={url}"]
    tunables = [f"replica-url={replica_url}", "max-replica-lag=0.1", "batch-size=10", "sleep=0.2"]
    command += [arg for tunable in tunables for arg in ("-x", tunable)]
    return subprocess.Popen([*command, *args], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _held(pair: Pair, proc: subprocess.Popen[str], json_lines: bool = False) -> str:
    """Pause replay, wait for the command's "waiting for replica" line, resume; the command's stderr so far."""
    from tests import backends

    try:
        waited = _read_until(proc.stderr, "waiting for replica")
        line = next(line for line in waited.splitlines() if "waiting for replica" in line)
        if json_lines:
            assert json.loads(line)["event"] == "waiting for replica"
        else:
            assert line.startswith("waiting for replica ") and "batches behind" in line, line
    finally:
        backends.resume_replication(pair.replica)
    return waited


def test_revert_and_alembic_say_they_wait_for_the_replica(pair: Pair, replicated: tuple[Db, str]) -> None:
    """`revert`, `alembic upgrade head` and `alembic downgrade` hold for a lagging replica as `run` does, and
    say so on stderr ("waiting for replica …"; JSON lines with `revert --json`, whose report counts the wait).
    (They once held in silence, and `revert --json` had no replica_wait_seconds.)"""
    from tests import backends

    db, replica_url = replicated
    backends.pause_replication(pair.replica)
    up = _alembic(db.url, replica_url, "upgrade", "head")
    _held(pair, up)
    _, err = up.communicate(timeout=180)
    assert up.returncode == 0, err
    assert replica_tagged(replica_url) == set(range(1000, 1060))

    backends.pause_replication(pair.replica)
    down = _alembic(db.url, replica_url, "downgrade", "base")
    _held(pair, down)
    _, err = down.communicate(timeout=180)
    assert down.returncode == 0, err
    assert replica_tagged(replica_url) == set()

    assert run_cli("run", "--database-url", db.url, "-q").returncode == 0
    backends.wait_for_replica(pair.primary, pair.replica)
    backends.pause_replication(pair.replica)
    revert = subprocess.Popen(
        [
            *(sys.executable, "-m", "backfill", "revert", "--yes", "--json", "--database-url", db.url),
            *("--replica-url", replica_url, "--max-replica-lag", "0.1", "--batch-size", "10", "--sleep", "0.2"),
        ],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _held(pair, revert, json_lines=True)
    out, err = revert.communicate(timeout=180)
    assert revert.returncode == 0, err
    report = json.loads(out)
    assert report["removed"] == 60 and report["replica_wait_seconds"] > 0
    assert replica_tagged(replica_url) == set()


def test_quiet_json_run_prints_no_waiting_lines(pair: Pair, replicated: tuple[Db, str]) -> None:
    """`run -q --json` holds for the lagging replica in silence: stdout has the report, stderr nothing.
    (The waiting lines once came through -q.)"""
    from tests import backends

    db, replica_url = replicated
    backends.pause_replication(pair.replica)
    try:
        proc = _start_held_run(db.url, replica_url, "-q")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (LEDGER_TABLE not in db.table_names() or not db.table(LEDGER_TABLE)):
            time.sleep(0.1)
        time.sleep(3)  # holding: a waiting line would have come by now (they come every 2 s)
        assert proc.poll() is None and len(db.table(LEDGER_TABLE)) < 60
    finally:
        backends.resume_replication(pair.replica)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and err == "", err
    assert json.loads(out)["replica_wait_seconds"] > 0


def test_revert_stopped_by_a_replica_says_what_is_left(pair: Pair, replicated: tuple[Db, str]) -> None:
    """A revert stopped by a replica that does not catch up says what is true: how many rows the ledger still
    lists, or, after the final wait, that every row is removed (it once said "the ledger lists the rest" of
    an empty ledger)."""
    from tests import backends

    db, replica_url = replicated
    assert run_cli("run", "--database-url", db.url, "-q").returncode == 0
    backends.wait_for_replica(pair.primary, pair.replica)
    backends.pause_replication(pair.replica)
    try:
        common = ("revert", "--yes", "--database-url", db.url, "--replica-url", replica_url, "--replica-timeout", "2")
        held = run_cli(*common, "--batch-size", "10", "--sleep", "0.2", "--max-replica-lag", "0.1")
        assert held.returncode == ExitCode.STOPPED, held.stderr
        said = re.search(r"(\d+) rows removed this time and the ledger lists (\d+) more", held.stderr)
        assert said and "before the next batch" in held.stderr, held.stderr
        removed, left = int(said[1]), int(said[2])
        assert removed + left == 60 and left == len(db.table(LEDGER_TABLE)) > 0
        final = run_cli(*common, "--max-replica-lag", "600")
        assert final.returncode == ExitCode.STOPPED, final.stderr
        message = final.stderr.strip().splitlines()[-1]
        assert "did not catch up" in message and "after the last batch" in message, message
        assert f"every row this tool inserted is removed ({left} this time)" in message, message
        assert "but a replica had not replayed the removal yet" in message and "ledger lists" not in message
    finally:
        backends.resume_replication(pair.replica)
    assert db.table(LEDGER_TABLE) == []
