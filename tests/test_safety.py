"""Data safety against what a hostile operator would try: other schemas, dropped tables, orphan rows,
look-alike keys, extreme ids, racing runners, odd SQLite URLs, read-only files, dead runners."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from backfill.connect import create_engine
from backfill.errors import ExitCode
from backfill.job import Backfill
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, LOCK_TABLE, RUNS_TABLE, VERSION_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from backfill.urls import parse_url
from backfill.walk import Settings
from tests.conftest import REPO, Db, alembic, run_cli, snapshot, start_cli, wait_for


def job(url: str, **settings: object) -> Backfill:
    return Backfill(create_engine(parse_url(url)), Settings(**settings))  # type: ignore[arg-type]


def tagged(db: Db) -> set[int]:
    return {e for e, k, v in db.tags() if k == ISGW and v == "true"}


def gateway(db: Db, ids: range | list[int]) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in ids])


# ---------------------------------------------------------------- 1. two MLflow schemas on one search_path


def _second_schema(db: Db, schema: str) -> str:
    """MLflow's two tables again in ``schema`` (same DDL); returns a URL whose search_path puts it first."""
    with db.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        for table in ("experiments", "experiment_tags"):
            conn.execute(sa.text(f"CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"))
        conn.execute(
            sa.text(
                f"ALTER TABLE {schema}.experiment_tags ADD FOREIGN KEY (experiment_id)"
                f" REFERENCES {schema}.experiments (experiment_id)"
            )
        )
    return sa.make_url(db.url).update_query_dict({"options": f"-csearch_path={schema},public"}).render_as_string(False)


@pytest.mark.backends("postgresql")
def test_a_search_path_over_two_mlflow_schemas_keeps_each_schema_to_itself(db: Db) -> None:
    gateway(db, [1, 2, 3])
    job(db.url).run()  # public is backfilled first
    public_ledger = db.table(LEDGER_TABLE)
    mlf_url = _second_schema(db, "mlf")
    mlf = Db(db.backend, mlf_url, db.server, sa.create_engine(mlf_url))
    gateway(mlf, [1, 2, 3, 4, 5])  # the same ids as public's, and more

    report = job(mlf_url).run()
    assert report.inserted == 5
    with db.engine.connect() as conn:
        tables = {
            (s, t)
            for s, t in conn.execute(
                sa.text(
                    "SELECT table_schema, table_name FROM information_schema.tables WHERE table_name LIKE 'gateway%'"
                )
            )
        }
        mlf_ledger = sorted(r[0] for r in conn.execute(sa.text(f"SELECT experiment_id FROM mlf.{LEDGER_TABLE}")))
    assert tables == {(s, t) for s in ("public", "mlf") for t in (LEDGER_TABLE, RUNS_TABLE, LOCK_TABLE)}
    assert mlf_ledger == [1, 2, 3, 4, 5]
    assert db.table(LEDGER_TABLE) == public_ledger  # public's ledger untouched

    # the two schemas' locks are two locks: a runner on public does not block one on mlf
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.hold_lock", db.url], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert job(mlf_url).run().state == "done"
    finally:
        holder.kill()
        holder.wait()

    assert job(db.url).revert().removed == 3  # public's own rows, all of them
    assert tagged(db) == set() and tagged(mlf) == {1, 2, 3, 4, 5}
    up = alembic(mlf_url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    with db.engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM mlf.{VERSION_TABLE}")).scalar() == "gateway_backfill_0001"
        assert not sa.inspect(conn).has_table(VERSION_TABLE, schema="public")
    mlf.engine.dispose()


# ---------------------------------------------------------------- 2. a ledger is never dropped while it lists rows


def test_downgrade_without_the_runs_table_still_reverts_exactly(db: Db) -> None:
    gateway(db, [10, 11, 12])
    before = snapshot(db.url)
    assert alembic(db.url, "upgrade", "head").returncode == 0
    with db.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {RUNS_TABLE}"))
    down = alembic(db.url, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert snapshot(db.url, skip=(VERSION_TABLE,)) == before


def test_a_ledger_that_still_lists_rows_is_never_dropped(db: Db) -> None:
    gateway(db, [20, 21, 22])
    assert alembic(db.url, "upgrade", "head").returncode == 0
    blocker = Writer(db)  # holds what the revert must take, for longer than its retries last
    try:
        down = alembic(db.url, "downgrade", "base")
    finally:
        blocker.release()
    assert down.returncode == ExitCode.STOPPED, down.stderr
    assert "Traceback" not in down.stderr and "`alembic downgrade` again" in down.stderr
    assert sorted(r[0] for r in db.table(LEDGER_TABLE)) == [20, 21, 22]  # kept, rows and all
    assert alembic(db.url, "downgrade", "base").returncode == 0  # and the downgrade goes on later
    assert tagged(db) == set()


class Writer:
    """Another session holding a write lock on the rows a revert deletes (SQLite: the whole database)."""

    def __init__(self, db: Db) -> None:
        self.engine = sa.create_engine(db.url, connect_args={"timeout": 30} if db.dialect == "sqlite" else {})
        self.conn = self.engine.connect()
        if db.dialect == "sqlite":
            self.conn.connection.dbapi_connection.isolation_level = None
            self.conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            key = "`key`" if db.dialect == "mysql" else "key"
            self.conn.execute(sa.text(f"SELECT * FROM experiment_tags WHERE {key} = :k FOR UPDATE"), {"k": ISGW})

    def release(self) -> None:
        if self.engine.dialect.name == "sqlite":
            self.conn.exec_driver_sql("ROLLBACK")
        else:
            self.conn.rollback()
        self.conn.close()
        self.engine.dispose()


# ---------------------------------------------------------------- 3. orphan gateway tags are never "missing"


def _orphan(db: Db, experiment_id: int) -> None:
    """A gateway tag row whose experiment row is gone (possible on SQLite, which does not enforce MLflow's
    foreign keys; made here on the servers by switching their checks off for one session)."""
    key = "`key`" if db.dialect == "mysql" else "key"
    with db.engine.begin() as conn:
        if db.dialect == "postgresql":
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        elif db.dialect == "mysql":
            conn.execute(sa.text("SET foreign_key_checks = 0"))
        conn.execute(
            sa.text(f"INSERT INTO experiment_tags ({key}, value, experiment_id) VALUES (:k, 'GATEWAY', :e)"),
            {"k": SRC, "e": experiment_id},
        )


def test_orphan_gateway_tags_are_not_missing_anywhere(db: Db) -> None:
    gateway(db, [30, 31])
    _orphan(db, 29)
    _orphan(db, 35)
    st = job(db.url).status()
    assert (st.gateway, st.missing, st.orphans) == (2, 2, 2)
    assert job(db.url).missing() == 2
    assert job(db.url).run().state == "done"
    assert job(db.url).missing() == 0 and job(db.url).status().missing == 0
    assert run_cli("verify", "--database-url", db.url).returncode == 0
    assert tagged(db) == {30, 31}
    gateway(db, [32])
    up = alembic(db.url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert tagged(db) == {30, 31, 32}
    script = alembic(db.url, "upgrade", "head", "--sql")  # the offline script has the same rule
    assert script.returncode == 0 and "JOIN experiments e" in script.stdout


# ---------------------------------------------------------------- 4. look-alike keys on the MySQL family


@pytest.mark.backends("mysql")
def test_a_key_that_only_collates_equal_is_not_a_gateway_tag(db: Db) -> None:
    lookalikes = [
        "MLFLOW.EXPERIMENT.SOURCETYPE",
        SRC + " ",
        "mlflow.experiment.sourcétype",
        "Mlflow.Experiment.SourceType",
    ]
    with db.engine.connect() as conn:  # the premise: the database's default collation ignores case
        assert conn.execute(sa.text("SELECT :a = :b"), {"a": lookalikes[0], "b": SRC}).scalar() == 1
    db.add_experiments([(40 + i, "active", [(key, "GATEWAY")]) for i, key in enumerate(lookalikes)])
    gateway(db, [50])
    st = job(db.url).status()
    assert (st.gateway, st.missing) == (1, 1)
    job(db.url).run()
    assert tagged(db) == {50}


# ---------------------------------------------------------------- 5. negative and extreme ids


def test_negative_ids_are_backfilled_and_reverted(db: Db) -> None:
    ids = [-2_000_000_000, -5, -1, 7]  # (0 is MLflow's Default experiment)
    gateway(db, ids)
    assert job(db.url, batch_size=2, adaptive=False).run().inserted == 4
    assert tagged(db) == set(ids)
    assert job(db.url, batch_size=2).revert().removed == 4
    assert tagged(db) == set() and db.table(LEDGER_TABLE) == []


@pytest.mark.backends("sqlite")
def test_the_whole_64_bit_range_on_sqlite(db: Db) -> None:
    ids = [-(2**63), -(2**63) + 1, -1, 2**63 - 2, 2**63 - 1]
    gateway(db, ids)
    result = run_cli("run", "--database-url", db.url, "--batch-size", "2", "--fixed", "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert tagged(db) == set(ids)
    assert run_cli("verify", "--database-url", db.url).returncode == 0
    result = run_cli("revert", "--database-url", db.url, "--yes")
    assert result.returncode == 0 and "removed 5" in result.stdout, result.stderr
    assert tagged(db) == set()


# ---------------------------------------------------------------- 6. the lock comes before anything is written


def test_racing_first_runs_and_alembic_never_fail_on_the_tables(db: Db) -> None:
    """Two first runs, and `alembic upgrade head` beside a `run`, on a database without the project's
    tables: each exits 0 (one after the other) or 6 (lock held), never 7, and the end state is exact."""
    gateway(db, range(60, 160))
    template = db.url
    db.engine.dispose()  # nobody may be connected to a database that is cloned
    for attempt in range(3):
        url = db.server.clone(template)
        procs = [start_cli("run", "--database-url", url, "-q"), start_cli("run", "--database-url", url, "-q")]
        outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
        assert all(code in (0, 6) for code, _ in outcomes), outcomes
        assert any(code == 0 for code, _ in outcomes)
        url = db.server.clone(template)
        proc = start_cli("run", "--database-url", url, "-q")
        up = alembic(url, "upgrade", "head")
        code = proc.wait(timeout=120)
        assert up.returncode in (0, 6) and code in (0, 6), (
            attempt,
            up.stderr,
            proc.stderr.read() if proc.stderr else "",
        )
        assert "already exists" not in up.stderr


def test_a_held_lock_stops_alembic_before_it_writes_anything(db: Db) -> None:
    gateway(db, [70])
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.hold_lock", db.url], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(db.url, skip=(LOCK_TABLE,))  # the holder renews its lease meanwhile
        up = alembic(db.url, "upgrade", "head")
        after = snapshot(db.url, skip=(LOCK_TABLE,))
    finally:
        holder.kill()
        holder.wait()
    assert up.returncode == ExitCode.LOCKED, up.stderr
    assert after == before  # no version table, no project tables, no tags


# ---------------------------------------------------------------- 7. SQLite URLs never create a file


@pytest.mark.parametrize("query", ["", "?uri=true", "?uri=true&mode=rwc"])
def test_sqlite_file_uris_never_create_a_file(tmp_path: Path, query: str) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for command in (["status"], ["run"], ["run", "--dry-run"], ["verify"], ["revert", "--yes"]):
            result = run_cli(*command, "--database-url", f"sqlite:///file:x.db{query}")
            assert result.returncode == ExitCode.NOT_MLFLOW, result.stderr
            assert list(tmp_path.iterdir()) == [], (command, list(tmp_path.iterdir()))
        up = alembic(f"sqlite:///file:x.db{query}", "upgrade", "head")
        assert up.returncode == ExitCode.NOT_MLFLOW, up.stderr
        assert list(tmp_path.iterdir()) == []
    finally:
        os.chdir(cwd)


@pytest.mark.backends("sqlite")
def test_a_sqlite_file_uri_reaches_the_database(db: Db) -> None:
    gateway(db, [80])
    path = sa.make_url(db.url).database
    result = run_cli("run", "--database-url", f"sqlite:///file:{path}?uri=true", "-q")
    assert result.returncode == 0, result.stderr
    assert tagged(db) == {80}


# ---------------------------------------------------------------- 8. read-only commands open SQLite read-only


def _without_write_power(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI without the power to override file permissions: root with every capability dropped (so the
    file's mode bits hold), yet still the owner of the checkout, which may be private (``mktemp -d``)."""
    return subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "backfill", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": "/tmp"},
    )


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_read_only_commands_need_only_read_access(db: Db, journal: str) -> None:
    gateway(db, [90, 91])
    directory = Path(tempfile.mkdtemp(prefix="mgb-ro-"))
    try:
        path = directory / "mlflow.db"
        shutil.copyfile(sa.make_url(db.url).database or "", path)
        with sqlite3.connect(path) as conn:
            assert conn.execute(f"PRAGMA journal_mode = {journal}").fetchone()[0] == journal
        path.chmod(0o444)
        directory.chmod(0o555)  # nobody may create a journal, a WAL index or a lock file here
        url = f"sqlite:///{path}"
        status = _without_write_power("status", "--database-url", url)
        assert status.returncode == 0 and "missing isGateway:       2" in status.stdout, status.stderr
        assert _without_write_power("verify", "--database-url", url).returncode == ExitCode.MISSING
        dry = _without_write_power("run", "--dry-run", "--database-url", url)
        assert dry.returncode == 0 and "would insert 2" in dry.stdout, dry.stderr
        denied = _without_write_power("run", "--database-url", url)
        assert denied.returncode == ExitCode.PERMISSION, denied.stderr
        assert denied.stderr.count("\n") == 1 and "Traceback" not in denied.stderr
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


# ---------------------------------------------------------------- 9. a dead runner never blocks, a live one always does


@pytest.mark.backends("sqlite")
def test_a_runner_killed_in_another_container_stops_blocking_at_once(db: Db) -> None:
    """A `run` in a container (its own host name, its own pid namespace) is killed; the next one goes on
    at once. While it lives, however long it sleeps between batches, nobody takes over."""
    gateway(db, range(100, 130))
    other_host = [
        "unshare",
        "--uts",
        "--pid",
        "--fork",
        "sh",
        "-c",
        'hostname "$0" && exec "$@"',
        "container-a1b2c3",
        sys.executable,
        "-m",
        "backfill",
    ]
    proc = subprocess.Popen(
        [*other_host, "run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "5", "-q"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(tagged(db)) >= 1)
        blocked = run_cli("run", "--database-url", db.url, "-q")  # mid-sleep: the runner is alive
        assert blocked.returncode == ExitCode.LOCKED, blocked.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = run_cli("run", "--database-url", db.url, "-q", "--json")
    assert result.returncode == 0, result.stderr
    assert tagged(db) == set(range(100, 130))


# ---------------------------------------------------------------- the schema the tool relies on (issue 11)


def _foreign_shape(server, extra_pk: bool, creation_time: bool = True) -> str:  # type: ignore[no-untyped-def]
    """A database whose MLflow-named tables differ from the shape the tool relies on."""
    url = server.new_database()
    key = "`key`" if server.dialect == "mysql" else "key"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name VARCHAR(256),"
                f" lifecycle_stage VARCHAR(32){', creation_time BIGINT' if creation_time else ''})"
            )
        )
        pk = f"{key}, experiment_id, workspace" if extra_pk else f"{key}, experiment_id"
        conn.execute(
            sa.text(
                f"CREATE TABLE experiment_tags ({key} VARCHAR(250) NOT NULL, value VARCHAR(500),"
                f" experiment_id INTEGER NOT NULL, workspace VARCHAR(63) NOT NULL DEFAULT 'default',"
                f" PRIMARY KEY ({pk}))"
            )
        )
        conn.execute(
            sa.text("INSERT INTO experiments VALUES (1, 'gateway/x', 'active'" + (", 0)" if creation_time else ")"))
        )
        conn.execute(
            sa.text(f"INSERT INTO experiment_tags ({key}, value, experiment_id) VALUES (:k, 'GATEWAY', 1)"), {"k": SRC}
        )
    engine.dispose()
    return url


@pytest.mark.parametrize(
    ("extra_pk", "creation_time", "names"), [(True, True, "primary key"), (False, False, "creation_time")]
)
def test_a_schema_the_tool_does_not_know_is_refused_untouched(
    server, extra_pk: bool, creation_time: bool, names: str
) -> None:  # type: ignore[no-untyped-def]
    url = _foreign_shape(server, extra_pk, creation_time)
    before = snapshot(url)
    for command in (["run"], ["status"], ["verify"], ["run", "--dry-run"], ["revert", "--yes"]):
        result = run_cli(*command, "--database-url", url)
        assert result.returncode == ExitCode.NOT_MLFLOW, (command, result.stderr)
        assert result.stderr.count("\n") == 1 and names in result.stderr and "mlflow db upgrade" in result.stderr
    up = alembic(url, "upgrade", "head")
    assert up.returncode == ExitCode.NOT_MLFLOW, up.stderr
    assert snapshot(url) == before


# ---------------------------------------------------------------- a long reader beside the set-up steps (issue 11)


class Reader:
    """Another session in a read transaction (an MLflow server serving a long page) for ``seconds``."""

    def __init__(self, db: Db, seconds: float) -> None:
        import threading

        self.engine = sa.create_engine(db.url)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(db.dialect, seconds))
        self.thread.start()
        assert self.ready.wait(30)

    def _read(self, backend: str, seconds: float) -> None:
        import time

        with self.engine.connect() as conn:
            if backend == "sqlite":  # rollback-journal mode (MLflow's default): a reader blocks COMMITs
                conn.connection.dbapi_connection.isolation_level = None
                conn.exec_driver_sql("BEGIN")
            elif backend == "postgresql":
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute(sa.text("SELECT COUNT(*) FROM experiment_tags")).all()
            self.ready.set()
            time.sleep(seconds)
            conn.exec_driver_sql("COMMIT")

    def join(self) -> None:
        self.thread.join()
        self.engine.dispose()


@pytest.mark.parametrize("how", ["alembic", "run"])
def test_the_set_up_steps_wait_for_a_long_reader(db: Db, how: str) -> None:
    gateway(db, range(200, 230))
    reader = Reader(db, 3)
    try:
        if how == "alembic":
            result = alembic(db.url, "upgrade", "head")
        else:
            result = run_cli("run", "--database-url", db.url, "-q")
    finally:
        reader.join()
    assert result.returncode == 0, result.stderr
    assert tagged(db) == set(range(200, 230))
