"""Safe beside a live MLflow: timeouts and retries, resume after SIGKILL, racing writers, faults, privileges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from backfill import walk as walk_module
from backfill.connect import create_engine
from backfill.errors import BackfillError, ExitCode
from backfill.job import Backfill
from backfill.retry import Timeouts
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, LOCK_TABLE, RUNS_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from backfill.urls import parse_url
from backfill.walk import Settings
from tests.conftest import Db, alembic, run_cli, start_cli
from tests.mlflow_data import create_gateway_experiments, mlflow_store
from tests.privileges import documented_user

GATEWAY_IDS = range(100_000, 100_040)


def gateway(db: Db, ids: range = GATEWAY_IDS) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in ids])


def ours(db: Db) -> set[int]:
    return {row[0] for row in db.table(LEDGER_TABLE)}


def tagged(db: Db) -> set[int]:
    return {e for e, k, v in db.tags() if k == ISGW and v == "true"}


def assert_whole_batches(db: Db) -> None:
    """No partial batch: the ledger, the tags and the run record agree exactly."""
    ledger = ours(db)
    assert ledger <= tagged(db)
    runs = db.table(RUNS_TABLE)
    columns = [c.name for c in sa.Table(RUNS_TABLE, sa.MetaData(), autoload_with=db.engine).columns]
    assert sum(r[columns.index("inserted")] for r in runs) == len(ledger)


def backfill(db: Db, **settings: object) -> Backfill:
    timeouts = settings.pop("timeouts", Timeouts())
    return Backfill(create_engine(parse_url(db.url), timeouts), Settings(timeouts=timeouts, **settings))  # type: ignore[arg-type]


class Blocker:
    """Another session holding exactly the lock a batch on experiment 100005 needs, until released."""

    def __init__(self, db: Db) -> None:
        self.engine = sa.create_engine(db.url, connect_args={"timeout": 30} if db.dialect == "sqlite" else {})
        self.conn = self.engine.connect()
        if db.dialect == "sqlite":
            self.conn.connection.dbapi_connection.isolation_level = None
            self.conn.exec_driver_sql("BEGIN IMMEDIATE")  # the database's write lock
        elif db.dialect == "postgresql":  # an uncommitted isGateway row: our insert waits on it
            self.conn.execute(
                sa.text("INSERT INTO experiment_tags (key, value, experiment_id) VALUES (:k, 'x', 100005)"), {"k": ISGW}
            )
        else:  # the experiment row: a MySQL tag insert takes a shared lock on it through the foreign key
            self.conn.execute(sa.text("SELECT * FROM experiments WHERE experiment_id = 100005 FOR UPDATE"))

    def release(self) -> None:
        if self.conn.connection.dbapi_connection.__class__.__module__.startswith("sqlite3"):
            self.conn.exec_driver_sql("ROLLBACK")
        else:
            self.conn.rollback()
        self.conn.close()
        self.engine.dispose()


def test_lock_timeout_retries_smaller_then_stops_resumable(db: Db) -> None:
    gateway(db)
    blockers: list[Blocker] = []

    def block_once_started() -> bool:  # called before every batch: the lock is taken once the run has begun
        if not blockers:
            blockers.append(Blocker(db))
        return False

    job = backfill(db, batch_size=4, min_batch_size=1, timeouts=Timeouts(lock=0.2, statement=5, retries=2))
    try:
        with pytest.raises(BackfillError) as err:
            job.run(should_stop=block_once_started)
        assert err.value.code == ExitCode.STOPPED
        assert "gave up after 2 retries" in str(err.value) and "resume" in str(err.value)
        # SQLite cannot record the stop while another writer holds the database: the row still says
        # `running`, and the next run takes it over all the same (its process is this one, not a live other).
        assert db.table(RUNS_TABLE)[0][1] == ("running" if db.dialect == "sqlite" else "stopped")
    finally:
        blockers[0].release()
    assert_whole_batches(db)
    report = backfill(db).run()
    assert report.resumed
    assert tagged(db) >= set(GATEWAY_IDS) and ours(db) == set(GATEWAY_IDS)


def test_a_lock_released_during_the_retries_lets_the_run_finish(db: Db) -> None:
    gateway(db)
    blocker = Blocker(db)
    threading.Timer(1.5, blocker.release).start()
    report = backfill(db, batch_size=4, min_batch_size=1, timeouts=Timeouts(lock=0.3, statement=5, retries=6)).run()
    assert report.state == "done"
    assert tagged(db) >= set(GATEWAY_IDS)


def test_sigkill_leaves_whole_batches_and_the_next_run_resumes(db: Db) -> None:
    gateway(db, range(100_000, 100_300))
    proc = start_cli("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "0.01", "-q")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sa.inspect(db.engine).has_table(LEDGER_TABLE) and len(ours(db)) >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert_whole_batches(db)
    assert 20 <= len(ours(db)) < 300
    # a gateway experiment appears below the cursor while nobody runs
    gateway(db, range(99_990, 99_991))
    result = run_cli("run", "--database-url", db.url, "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["resumed"] is True
    assert ours(db) == {99_990, *range(100_000, 100_300)}
    assert_whole_batches(db)


def test_racing_mlflow_writer(db: Db) -> None:
    """MLflow creates gateway endpoints (3.10.1 tags them itself), creates, tags and deletes experiments
    while the backfill runs: neither side sees an error and the end state is exact."""
    gateway(db, range(100_000, 100_200))
    store = mlflow_store(db.url)
    errors: list[BaseException] = []
    mlflow_gateway: list[int] = []

    def writer() -> None:
        try:
            for i in range(8):
                mlflow_gateway.extend(create_gateway_experiments(store, 1, prefix=f"live{i}"))
                eid = store.create_experiment(f"live-ordinary-{i}")
                store.set_experiment_tag(eid, _tag("team", f"t{i}"))
                if i % 2:
                    store.delete_experiment(eid)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    report = backfill(db, batch_size=5, min_batch_size=5, adaptive=False, sleep=0.01).run()
    thread.join(timeout=120)
    store.engine.dispose()
    assert not errors, errors
    assert report.state == "done"
    assert len(mlflow_gateway) == 8
    assert tagged(db) >= set(range(100_000, 100_200)) | set(mlflow_gateway)
    assert ours(db) == set(range(100_000, 100_200))  # MLflow's own isGateway rows are not in the ledger
    backfill(db).revert()
    assert tagged(db) == set(mlflow_gateway)


def _tag(key: str, value: str):  # type: ignore[no-untyped-def]
    from mlflow.entities import ExperimentTag

    return ExperimentTag(key, value)


# ---------------------------------------------------------------- faults on the real servers


def _container(db: Db):  # type: ignore[no-untyped-def]
    if db.server.container is None:
        pytest.fail("fault tests need the test container (unset MGB_TEST_*_URL for this backend)", pytrace=False)
    return db.server.container.get_wrapped_container()


def _start_cli_run(db: Db, *extra: str) -> subprocess.Popen[str]:
    return start_cli("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "0.02", "-q", *extra)


def _rerun_finishes_exactly(db: Db) -> None:
    db.engine.dispose()
    rerun = run_cli("run", "--database-url", db.url, "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert ours(db) == set(range(100_000, 100_300))
    assert_whole_batches(db)


def _wait_for_progress(db: Db, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sa.inspect(db.engine).has_table(LEDGER_TABLE) and len(ours(db)) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError("the run made no progress")


@pytest.mark.backends("postgresql", "mysql")
def test_paused_server_ends_in_a_timeout_and_a_resumable_exit(db: Db) -> None:
    gateway(db, range(100_000, 100_300))
    container = _container(db)
    proc = _start_cli_run(
        db, "--statement-timeout", "2", "--lock-timeout", "0.5", "--connect-timeout", "2", "--retries", "1"
    )
    _wait_for_progress(db, 5)
    with db.server.undisturbed_copies():
        container.pause()
        try:
            _, err = proc.communicate(timeout=90)  # would hang forever without client-side limits
        finally:
            container.unpause()
    assert proc.returncode == ExitCode.STOPPED, err
    assert "run` again to resume" in err and "Traceback" not in err
    _rerun_finishes_exactly(db)


@pytest.mark.backends("postgresql", "mysql")
def test_restarted_server_is_retried_or_resumed_exactly(db: Db) -> None:
    gateway(db, range(100_000, 100_300))
    container = _container(db)
    proc = _start_cli_run(db, "--retries", "8", "--connect-timeout", "3")
    _wait_for_progress(db, 5)
    with db.server.undisturbed_copies():
        container.restart(timeout=10)
        _, err = proc.communicate(timeout=180)
    assert proc.returncode in (ExitCode.OK, ExitCode.STOPPED), err
    assert "Traceback" not in err
    if proc.returncode == ExitCode.STOPPED:
        _rerun_finishes_exactly(db)
    else:
        db.engine.dispose()  # the test's own pooled connections died with the server
        assert ours(db) == set(range(100_000, 100_300))
        assert_whole_batches(db)


@pytest.mark.backends("postgresql", "mysql")
def test_connection_dropped_mid_batch_leaves_no_partial_batch(db: Db) -> None:
    gateway(db)
    job = backfill(db, batch_size=8, adaptive=False, timeouts=Timeouts(retries=3))
    admin = sa.create_engine(db.url)
    fired: list[bool] = []
    first = "WITH ins" if db.dialect == "postgresql" else f"INSERT INTO {LEDGER_TABLE}"

    @event.listens_for(job.engine, "after_cursor_execute")
    def kill_own_session(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if fired or not statement.startswith(first):
            return
        fired.append(True)
        raw = conn.connection.dbapi_connection
        with admin.connect() as other:
            if db.dialect == "postgresql":  # the server's pid (a pooler gives its clients a made-up one)
                pid = raw.execute("SELECT pg_backend_pid()").fetchone()[0]
                assert other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
            else:
                other.execute(sa.text(f"KILL {raw.thread_id()}"))

    report = job.run()
    admin.dispose()
    assert fired and report.state == "done"
    assert ours(db) == set(GATEWAY_IDS)
    assert_whole_batches(db)


# ---------------------------------------------------------------- least privilege


def _make_user(db: Db, grants: str) -> str:
    """A database user with ``grants`` ('readonly' or 'noinsert'); returns its URL."""
    name, password = f"u_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex[:8]
    database = sa.make_url(db.url).database
    admin = sa.create_engine(db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if db.dialect == "postgresql":
            conn.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
            conn.execute(sa.text(f'GRANT CONNECT ON DATABASE "{database}" TO {name}'))
            conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {name}"))
            conn.execute(sa.text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {name}"))
            if grants == "noinsert":
                conn.execute(sa.text(f"GRANT CREATE ON SCHEMA public TO {name}"))
        else:
            conn.execute(sa.text(f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"))
            conn.execute(sa.text(f"GRANT SELECT ON `{database}`.* TO '{name}'@'%'"))
            if grants == "noinsert":
                conn.execute(sa.text(f"GRANT CREATE, UPDATE ON `{database}`.* TO '{name}'@'%'"))
    admin.dispose()
    return sa.make_url(db.url).set(username=name, password=password).render_as_string(hide_password=False)


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--database-url", url)


@pytest.mark.backends("postgresql", "mysql")
def test_read_only_user_can_look_but_not_write(db: Db) -> None:
    gateway(db)
    url = _make_user(db, "readonly")
    tags, tables = db.tags(), db.table_names()
    assert _cli(url, "status").returncode == 0
    assert _cli(url, "verify").returncode == ExitCode.MISSING
    dry = _cli(url, "run", "--dry-run")
    assert dry.returncode == 0 and "would insert 40" in dry.stdout
    denied = _cli(url, "run")
    assert denied.returncode == ExitCode.PERMISSION, denied.stderr
    assert denied.stderr.startswith("Error: permission denied") and denied.stderr.count("\n") == 1
    assert db.tags() == tags and db.table_names() == tables


@pytest.mark.backends("postgresql", "mysql")
def test_user_without_insert_gets_a_clear_error_and_nothing_is_written(db: Db) -> None:
    gateway(db)
    url = _make_user(db, "noinsert")
    tags, tables = db.tags(), db.table_names()
    denied = _cli(url, "run")
    assert denied.returncode == ExitCode.PERMISSION, denied.stderr
    assert "permission denied" in denied.stderr and "Traceback" not in denied.stderr
    assert db.tags() == tags and db.table_names() == tables  # not even the project's tables


# ---------------------------------------------------------------- pacing


def test_batches_adapt_to_the_time_target(db: Db) -> None:
    gateway(db, range(100_000, 100_100))
    grows = backfill(db, batch_size=1, min_batch_size=1, max_batch_size=1000, target_batch_seconds=60).run()
    assert grows.batches < 20  # 1, 2, 3, 5, 8, ... instead of 100 batches of one
    backfill(db).revert()
    shrinks = backfill(db, batch_size=50, min_batch_size=1, target_batch_seconds=1e-9).run()
    assert shrinks.batches > 50  # cut to the minimum after the first batch


def test_sleep_and_rows_per_second_ceiling(db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway(db)
    pauses: list[float] = []
    monkeypatch.setattr(walk_module.time, "sleep", pauses.append)
    backfill(db, batch_size=10, adaptive=False, sleep=0.5).run()
    assert pauses == [0.5] * 4
    backfill(db).revert()
    pauses.clear()
    backfill(db, batch_size=10, adaptive=False, max_rows_per_second=20).run()
    assert len(pauses) == 4 and all(0 < p <= 0.5 for p in pauses)  # 10 rows at 20/s: half a second a batch


def test_env_password_never_in_output(db: Db) -> None:
    if not sa.make_url(db.url).password:
        return
    result = run_cli("status", env={**os.environ, "DATABASE_URL": db.url.replace("@", "@nohost-", 1)})
    assert result.returncode == ExitCode.CONNECT
    assert sa.make_url(db.url).password not in result.stdout + result.stderr


@pytest.mark.backends("postgresql", "mysql")
def test_the_documented_privileges_are_enough(db: Db) -> None:
    """docs/privileges.md's grants, and no more, on tables an admin created: a writer runs and reverts, a
    reader reads."""
    gateway(db)
    writer = documented_user(db, "writer", admin_creates_tables=True)
    for command in (["run"], ["revert", "--yes"], ["run"]):
        result = _cli(writer, *command)
        assert result.returncode == 0, (command, result.stderr)
    assert ours(db) == set(GATEWAY_IDS) == tagged(db)
    reader = documented_user(db, "reader", admin_creates_tables=False)
    for command in (["verify"], ["status"], ["run", "--dry-run"]):
        result = _cli(reader, *command)
        assert result.returncode == 0, (command, result.stderr)


@pytest.mark.backends("postgresql")
def test_the_documented_first_use_grants_are_enough(db: Db) -> None:
    """PostgreSQL: a writer that may create tables in the schema makes the project's own on first use, and
    Alembic's upgrade and downgrade work for it (it owns what it creates)."""
    gateway(db)
    writer = documented_user(db, "first-use", admin_creates_tables=False)
    for args in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"]):
        result = alembic(writer, *args)
        assert result.returncode == 0, (args, result.stderr)
    assert ours(db) == set(GATEWAY_IDS) == tagged(db)
    for command in (["revert", "--yes"], ["run"], ["status"]):
        result = _cli(writer, *command)
        assert result.returncode == 0, (command, result.stderr)
    assert ours(db) == set(GATEWAY_IDS) == tagged(db)


@pytest.mark.backends("postgresql")
def test_no_usage_on_the_schema_is_a_missing_privilege_not_a_missing_database(db: Db) -> None:
    """Issue 17, item 6: the search_path skips a schema the user may not use, so MLflow's tables seem absent;
    every command says it is a privilege (exit 5), and names the schema."""
    gateway(db)
    name, password = f"n_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex[:8]
    database = sa.make_url(db.url).database
    admin = sa.create_engine(db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
        conn.execute(sa.text(f'GRANT CONNECT ON DATABASE "{database}" TO {name}'))
        conn.execute(sa.text(f"REVOKE ALL ON SCHEMA public FROM PUBLIC, {name}"))
    admin.dispose()
    url = sa.make_url(db.url).set(username=name, password=password).render_as_string(hide_password=False)
    for command in (["status"], ["verify"], ["run"], ["run", "--dry-run"], ["revert", "--yes"]):
        result = _cli(url, *command)
        assert result.returncode == ExitCode.PERMISSION, (command, result.stderr)
        assert "USAGE on schema 'public'" in result.stderr, result.stderr
    explicit = _cli(url, "status", "--schema", "public")
    assert explicit.returncode == ExitCode.PERMISSION, explicit.stderr
    assert alembic(url, "upgrade", "head").returncode == ExitCode.PERMISSION


@pytest.mark.backends("postgresql", "mysql")
def test_a_refused_run_writes_no_run_record(db: Db) -> None:
    """Issue 17, item 12: a writer that lacks INSERT on the ledger is refused before anything is written
    (exit 5): no run record, no lease taken, no tag."""
    gateway(db)
    url = documented_user(db, "writer", admin_creates_tables=True)
    user = sa.make_url(url).username
    revoke = (
        f"REVOKE INSERT ON {LEDGER_TABLE} FROM {user}"
        if db.dialect == "postgresql"
        else f"REVOKE INSERT ON `{sa.make_url(db.url).database}`.{LEDGER_TABLE} FROM '{user}'@'%'"
    )
    admin = sa.create_engine(db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(revoke))
    admin.dispose()
    tags = db.tags()
    result = _cli(url, "run")
    assert result.returncode == ExitCode.PERMISSION, result.stderr
    assert LEDGER_TABLE in result.stderr
    assert db.table(RUNS_TABLE) == [] and db.table(LEDGER_TABLE) == [] and db.tags() == tags
    assert db.table(LOCK_TABLE) == []  # not even the lease's row
