"""Read replicas, on real replication: a primary and a streaming replica on one Docker network (PostgreSQL hot
standby; Oracle MySQL and MariaDB GTID replication), images built here.

The run holds while the replica does not replay and finishes exactly once it does; a replica that is down
stops the run resumably; `verify --replica-url` answers for the replica; and a real `mlflow server` reading
from the replica lists no gateway experiment once `run` returns.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from backfill.errors import ExitCode
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import REPO, Db, Server, alembic, run_cli, snapshot
from tests.privileges import documented_user

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
    """Down before the run: refused at once (exit 3), nothing written. Down once the run is under way: it
    holds the run like a lagging one, and past --replica-timeout the run stops (exit 7) and a later run
    resumes exactly."""
    from tests import backends

    db, replica_url = replicated
    args = ("--replica-url", replica_url, "--replica-timeout", "5", "--connect-timeout", "2")
    container = pair.replica.get_wrapped_container()
    container.stop(timeout=30)
    try:
        before = run_cli("run", "--database-url", db.url, *args, "-q")
    finally:
        container.start()
    assert before.returncode == ExitCode.CONNECT, before.stderr
    assert "nothing was written" in before.stderr and LEDGER_TABLE not in db.table_names()
    _wait_until_up(replica_url)
    backends.wait_for_replica(pair.primary, pair.replica, timeout=120)

    proc = _start_run(db.url, *args, "--batch-size", "10", "--fixed", "--sleep", "0.3", "-q")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (LEDGER_TABLE not in db.table_names() or not db.table(LEDGER_TABLE)):
            time.sleep(0.1)
        container.stop(timeout=30)  # under way: the next batches' positions never reach it
        _, err = proc.communicate(timeout=180)
    finally:
        container.start()
    assert proc.returncode == ExitCode.STOPPED, err
    assert err.count("\n") == 1 and "did not catch up" in err and "unreachable" in err, err
    assert "`run` again" in err
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
    """docs/privileges.md's grants for `run`, nothing for replication: lag is still measured (and held on)."""
    from tests import backends

    db, replica_url = replicated
    user_url = documented_user(db, "writer", admin_creates_tables=True)
    backends.wait_for_replica(pair.primary, pair.replica)

    def as_user(url: str) -> str:
        user = sa.make_url(user_url)
        return (
            sa.make_url(url).set(username=user.username, password=user.password).render_as_string(hide_password=False)
        )

    backends.pause_replication(pair.replica)
    try:
        proc = _start_held_run(as_user(db.url), as_user(replica_url))
        _read_until(proc.stderr, "waiting for replica")  # measured, and held on: not a silent lag of 0
    finally:
        backends.resume_replication(pair.replica)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert replica_tagged(replica_url) == set(range(1000, 1060))


def _runs(db: Db) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT * FROM gateway_backfill_runs ORDER BY id")).mappings()]


@pytest.mark.parametrize("command", ["run", "revert"])
def test_a_stop_during_the_final_wait_is_not_done(pair: Pair, replicated: tuple[Db, str], command: str) -> None:
    """Issue 17, item 1: a run (or revert) is done only once every replica has what it wrote. SIGTERM while it
    waits after the last batch is exit 7, never `done`; a resumed run, even one with nothing left to write,
    waits for the replica too, and times out (exit 7) while it still lags."""
    from tests import backends

    db, replica_url = replicated
    if command == "revert":
        assert run_cli("run", "--database-url", db.url, "--replica-url", replica_url, "-q").returncode == 0
    backends.pause_replication(pair.replica)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backfill", command, "--database-url", db.url, "--replica-url", replica_url]
            + ["--max-replica-lag", "600", "--json"]
            + (["--yes"] if command == "revert" else []),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        wanted = 0 if command == "revert" else 60

        def done() -> bool:
            try:
                return len(db.table(LEDGER_TABLE)) == wanted
            except sa.exc.ProgrammingError:  # the run has not created the ledger yet
                return False

        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # every batch committed: this is the final wait
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == ExitCode.STOPPED, err
        assert "SIGTERM" in err and "replica" in err
        if command == "run":
            assert "again waits for them" in err
            assert _runs(db)[-1]["state"] == "stopped"
            again = run_cli(
                "run", "--database-url", db.url, "--replica-url", replica_url, "--replica-timeout", "3", "-q"
            )
            assert again.returncode == ExitCode.STOPPED, again.stderr  # not "nothing to do", exit 0
            assert "did not catch up" in again.stderr
    finally:
        backends.resume_replication(pair.replica)
    final = run_cli(
        command, "--database-url", db.url, "--replica-url", replica_url, *(["--yes"] if command == "revert" else ["-q"])
    )
    assert final.returncode == 0, final.stderr
    assert replica_tagged(replica_url) == (set() if command == "revert" else set(range(1000, 1060)))


def test_a_stop_while_held_between_batches_lets_no_batch_through(pair: Pair, replicated: tuple[Db, str]) -> None:
    """Issue 17, item 1: SIGINT while the run is held on a lagging replica ends it there (exit 7), with no
    further batch written."""
    from tests import backends

    db, replica_url = replicated
    backends.pause_replication(pair.replica)
    try:
        proc = _start_held_run(db.url, replica_url)
        _read_until(proc.stderr, "waiting for replica")
        written = len(db.table(LEDGER_TABLE))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        backends.resume_replication(pair.replica)
    assert proc.returncode == ExitCode.STOPPED, err
    assert len(db.table(LEDGER_TABLE)) == written == 10


@pytest.mark.backends("postgresql")
def test_status_sees_a_caught_up_replica_on_a_quiet_primary_after_a_wal_switch(
    pair: Pair, replicated: tuple[Db, str]
) -> None:
    """Issue 17, item 3: after a WAL segment switch on a quiet primary, pg_current_wal_insert_lsn() sits past
    the new segment's header, where replay never gets: the standby is caught up all the same."""
    from tests import backends

    db, replica_url = replicated
    admin = sa.create_engine(pair.url(pair.primary, "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_switch_wal()"))
        lsn = conn.execute(sa.text("SELECT CAST(pg_current_wal_insert_lsn() AS TEXT)")).scalar()
    admin.dispose()
    backends.wait_for_replica(pair.primary, pair.replica)
    status = run_cli("status", "--database-url", db.url, "--replica-url", replica_url, "--json")
    assert status.returncode == 0, status.stderr
    replica = json.loads(status.stdout)["replicas"][0]
    assert replica["caught_up"] is True, (lsn, replica)


@pytest.mark.parametrize("command", [["run"], ["revert", "--yes"]])
def test_a_replica_url_that_is_not_a_replica_is_refused_before_anything_is_written(
    pair: Pair, replicated: tuple[Db, str], command: list[str]
) -> None:
    """Issue 17, item 5: the primary's own URL given as a replica (PostgreSQL: not in recovery; the MySQL
    family: the same server), or a server of the other family, is refused before anything is written, by
    `run`, `revert` and Alembic, instead of holding for --replica-timeout or failing after the writes."""
    db, replica_url = replicated
    if command[0] == "revert":
        assert run_cli("run", "--database-url", db.url, "-q").returncode == 0
    before = snapshot(db.url)
    other = sa.make_url(replica_url).set(drivername="mysql+pymysql" if pair.dialect == "postgresql" else "postgresql")
    for bad in (db.url, other.render_as_string(hide_password=False)):
        # A server of the other family may never answer the driver's greeting: short limits, no retries.
        limits = ("--connect-timeout", "2", "--statement-timeout", "2", "--retries", "0")
        result = run_cli(*command, "--database-url", db.url, "--replica-url", bad, *limits)
        assert result.returncode in (ExitCode.USAGE, ExitCode.CONNECT), result.stderr
        assert "nothing was written" in result.stderr and result.stderr.count("\n") == 1, result.stderr
        up = alembic(
            db.url, "-x", f"replica-url={bad}", *("-x", "connect-timeout=2", "-x", "retries=0"), "upgrade", "head"
        )
        assert up.returncode in (ExitCode.USAGE, ExitCode.CONNECT), up.stderr
        assert snapshot(db.url) == before


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
