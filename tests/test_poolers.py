"""Through a connection pooler (issue 16), each test naming the numbered defect of the issue it covers.

Every command through a stock PgBouncer 1.18 in transaction and session pooling (item 1), the limits through
it (2), the single-runner exclusion through pooling, after a kill -9, past a session the server ends and
between two builds, also on MySQL and MariaDB directly (3, 7), prepared statements (4), the schema (5),
statement pooling (6), and the messages of TLS and URL mistakes (8).

The pooler backends (tests/conftest.py) put a PgBouncer in front of a PostgreSQL 15 server of their own:
``db.url`` goes through it, ``db.direct_url`` reaches the same database on the server itself.
"""

from __future__ import annotations

import datetime
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from backfill.errors import ExitCode
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, RUNS_TABLE, VERSION_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.backends import PgBouncer, start_pgbouncer
from tests.conftest import REPO, Db, alembic, run_cli, start_cli

POOLED = ("postgresql-pgbouncer-transaction", "postgresql-pgbouncer-session")
TRANSACTION_POOLED = "postgresql-pgbouncer-transaction"


def gateway(db: Db, ids: range | list[int]) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in ids])


def tagged(url: str, schema: str | None = None) -> set[int]:
    """The experiments with isGateway=true in ``schema`` (default: the one the URL's search_path finds)."""
    table = f"{schema}.experiment_tags" if schema else "experiment_tags"
    key = "`key`" if url.startswith("mysql") else "key"
    return {
        int(e) for (e,) in rows(url, f"SELECT experiment_id FROM {table} WHERE {key} = :k AND value = 'true'", k=ISGW)
    }


def rows(url: str, statement: str, **params: object) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(statement), params)]
    finally:
        engine.dispose()


def execute(url: str, *statements: str, **params: object) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(sa.text(statement), params)
    finally:
        engine.dispose()


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--database-url", url)


def one_line(result: subprocess.CompletedProcess[str]) -> None:
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def assert_one_exact_run(url: str, ids: range | list[int]) -> None:
    """Everything tagged once, by one run: the ledger lists each experiment once, all of them that run's, and
    its record counts exactly those rows (two runners on one record, or a second record, would show)."""
    assert tagged(url) == set(ids)
    ledger = rows(url, f"SELECT experiment_id, run_id FROM {LEDGER_TABLE}")
    runs = rows(url, f"SELECT id, state, inserted FROM {RUNS_TABLE}")
    assert sorted(e for e, _ in ledger) == sorted(ids)
    assert len(runs) == 1 and runs[0][1] == "done" and runs[0][2] == len(ids), runs
    assert {run for _, run in ledger} == {runs[0][0]}


def wait_for(condition: Callable[[], bool], what: str, runner: subprocess.Popen[str], seconds: float = 120) -> None:
    """Wait until ``condition`` holds, while ``runner`` runs (its exit fails the test with what it said)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        if runner.poll() is not None:
            said = runner.stderr.read() if runner.stderr else ""
            raise AssertionError(f"{what}: the runner exited {runner.returncode}: {said}")
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def ledger_size(url: str) -> int:
    """Rows in the ledger (0 before the project's tables exist)."""
    try:
        return int(rows(url, f"SELECT COUNT(*) FROM {LEDGER_TABLE}")[0][0])
    except sa.exc.ProgrammingError:
        return 0


def start_alembic(url: str, *args: str) -> subprocess.Popen[str]:
    """The project's ``alembic`` command line in the background, as a user would start it."""
    command = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "-x", f"database-url={url}", *args]
    return subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    """Wait for a command started in the background; its exit code and what it wrote to stderr."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# ---------------------------------------------------------------- item 1: every command through a stock PgBouncer


@pytest.mark.backends(*POOLED)
def test_every_command_works_through_a_stock_pgbouncer(db: Db) -> None:
    """Item 1: status, verify, run --dry-run, run, revert --yes, `alembic upgrade head` and `alembic downgrade
    base` through PgBouncer with its stock ignore_startup_parameters, in transaction and session pooling
    (no `unsupported startup parameter`), each doing what it does directly."""
    ids = range(100, 140)
    gateway(db, ids)
    for command, code in (
        (["status"], ExitCode.OK),
        (["verify"], ExitCode.MISSING),
        (["run", "--dry-run"], ExitCode.OK),
        (["run"], ExitCode.OK),
        (["verify"], ExitCode.OK),
        (["status"], ExitCode.OK),
    ):
        result = cli(db.url, *command)
        assert result.returncode == code, (command, result.stderr)
        assert "startup parameter" not in result.stderr
    assert tagged(db.url) == set(ids)
    reverted = cli(db.url, "revert", "--yes")
    assert reverted.returncode == ExitCode.OK and "removed 40" in reverted.stdout, reverted.stderr
    assert tagged(db.url) == set()
    up = alembic(db.url, "upgrade", "head")
    assert up.returncode == ExitCode.OK, up.stderr
    assert tagged(db.url) == set(ids)
    down = alembic(db.url, "downgrade", "base")
    assert down.returncode == ExitCode.OK, down.stderr
    assert tagged(db.url) == set()


# ---------------------------------------------------------------- item 2: the limits through the pooler


def waiting_on_locks(db: Db) -> list[tuple]:
    """The sessions of ``db``'s database that wait for a lock, seen on the server itself."""
    return rows(
        db.direct_url,
        "SELECT a.pid, a.query FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE NOT l.granted AND a.datname = current_database()",
    )


@pytest.mark.backends("postgresql", *POOLED)
def test_a_lock_wait_ends_at_the_lock_timeout_and_leaves_no_waiter(db: Db) -> None:
    """Item 2: through the pooler as directly, a batch that waits for a lock MLflow holds ends after
    --lock-timeout (exit 7, the lock timeout named, not a "frozen" server), and once the tool has exited no
    session of it is left waiting for that lock on the server."""
    ids = range(100, 140)
    gateway(db, ids)
    blocker = sa.create_engine(db.direct_url)
    with blocker.connect() as holding:  # an uncommitted isGateway row: the batch's insert waits for it
        holding.execute(
            sa.text("INSERT INTO experiment_tags (key, value, experiment_id) VALUES (:k, 'x', 105)"), {"k": ISGW}
        )
        result = cli(db.url, "run", "--lock-timeout", "0.5", "--retries", "1", "--statement-timeout", "5")
        left_waiting = waiting_on_locks(db)
        holding.rollback()
    blocker.dispose()
    assert result.returncode == ExitCode.STOPPED, result.stderr
    one_line(result)
    assert "lock timeout" in result.stderr and "frozen" not in result.stderr, result.stderr
    assert left_waiting == []


@pytest.mark.backends("postgresql", *POOLED)
@pytest.mark.parametrize("command", ["status", "verify", "alembic"])
def test_reads_and_alembic_end_at_the_lock_timeout_too(db: Db, command: str) -> None:
    """Item 2 beyond `run`'s writes: the read-only transactions of `status` and `verify`, and Alembic's, carry
    the limits too. With MLflow's tags table locked by another session, each ends after its lock timeout
    (exit 7, the lock timeout named) and leaves no session of it waiting on the server."""
    gateway(db, range(100, 110))
    limits = {"lock-timeout": "0.5", "statement-timeout": "5"}
    blocker = sa.create_engine(db.direct_url)
    with blocker.connect() as holding:
        holding.execute(sa.text("LOCK TABLE experiment_tags IN ACCESS EXCLUSIVE MODE"))
        if command == "alembic":
            result = alembic(db.url, *(f"-x{k}={v}" for k, v in limits.items()), "upgrade", "head")
        else:
            result = cli(db.url, command, *(arg for k, v in limits.items() for arg in (f"--{k}", v)))
        left_waiting = waiting_on_locks(db)
        holding.rollback()
    blocker.dispose()
    assert result.returncode == ExitCode.STOPPED, result.stderr
    assert "lock timeout" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert left_waiting == []


# ---------------------------------------------------------------- items 3 and 7: the single-runner exclusion

# Two runners at once, many times: each takes about 5 s (25 batches of 50 with 0.2 s between them; Alembic at
# 250 experiments a second), far longer than the two take to start, so they always overlap.
RACE_IDS = range(1, 1251)
# Rounds through a pooler, where runners share server sessions, and on a server directly.
ROUNDS = {"pooled": 10, "direct": 3}
SLOW_RUN = ("--batch-size", "50", "--fixed", "--sleep", "0.2", "-q")
SLOW_ALEMBIC = ("-x", "batch-size=50", "-x", "max-rows-per-second=250", "upgrade", "head")


@pytest.mark.backends("postgresql", *POOLED, "mysql")
def test_two_runners_started_together_exactly_one_wins(db: Db) -> None:
    """Items 3 and 7: two runners started together (two `run`s, or a `run` and `alembic upgrade head`),
    ten times over through a pooler (three times directly), on a fresh copy each time: exactly one finishes (exit
    0), the other exits 6, and nothing is inserted twice (one run record, every ledger row its own)."""
    gateway(db, RACE_IDS)
    db.engine.dispose()  # nobody may be connected to a database that is copied
    for round_ in range(ROUNDS["pooled" if db.backend in POOLED else "direct"]):
        url = db.server.clone(db.url)
        first = start_cli("run", "--database-url", url, *SLOW_RUN)
        other = start_alembic(url, *SLOW_ALEMBIC) if round_ % 2 else start_cli("run", "--database-url", url, *SLOW_RUN)
        outcomes = [finish(first), finish(other)]
        assert sorted(code for code, _ in outcomes) == [ExitCode.OK, ExitCode.LOCKED], (round_, outcomes)
        assert all("Traceback" not in err for _, err in outcomes), outcomes
        assert_one_exact_run(url, RACE_IDS)


def run_until_not_locked(url: str, seconds: float = 30) -> subprocess.CompletedProcess[str]:
    """`run`, started again while it exits 6, for up to ``seconds``: a lease left by a killed runner may be
    taken over only once it has gone unrenewed for a while (no time is asserted)."""
    deadline = time.monotonic() + seconds
    while True:
        result = cli(url, "run", "-q")
        if result.returncode != ExitCode.LOCKED or time.monotonic() > deadline:
            return result
        time.sleep(1)


@pytest.mark.backends("postgresql", *POOLED, "mysql")
def test_a_runner_killed_with_sigkill_leaves_the_lock_free(db: Db) -> None:
    """Items 3 and 7: after `kill -9` of the runner that holds the lock, the next `run` goes on (once the
    dead runner's lease has run out, within about 30 s) and finishes the same run exactly; then a `revert`
    on the server directly is not locked out by anything the dead runner left on a pooled server connection."""
    ids = range(1, 201)
    gateway(db, ids)
    holder = start_cli("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "0.5", "-q")
    try:
        wait_for(lambda: ledger_size(db.url) >= 3, "the runner's progress", holder)
    finally:
        holder.kill()
        holder.wait()
    assert 3 <= ledger_size(db.url) < len(ids)
    result = run_until_not_locked(db.url)
    assert result.returncode == ExitCode.OK, result.stderr
    assert_one_exact_run(db.url, ids)
    reverted = cli(db.direct_url, "revert", "--yes")
    assert reverted.returncode == ExitCode.OK, reverted.stderr
    assert tagged(db.url) == set()


def idle_limited_user(db: Db) -> str:
    """A user whose sessions the server ends after one idle second (PostgreSQL: ``ALTER ROLE ... SET
    idle_session_timeout``, set on the server; MySQL family: ``wait_timeout``, set by ``init_connect`` for
    every user without the admin privilege, i.e. not root: see :func:`idle_limit`), with every privilege
    on the database; returns its URL (through the pooler on the pooler backends)."""
    name, password = f"idle_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex[:8]
    database = sa.make_url(db.url).database
    if db.dialect == "postgresql":
        execute(
            db.direct_url,
            f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
            f"GRANT ALL ON SCHEMA public TO {name}",
            f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {name}",
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {name}",
            f"ALTER ROLE {name} SET idle_session_timeout = '1s'",
        )
    else:
        execute(
            db.direct_url,
            f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'",
            f"GRANT ALL PRIVILEGES ON `{database}`.* TO '{name}'@'%'",
        )
    return sa.make_url(db.url).set(username=name, password=password).render_as_string(hide_password=False)


@pytest.fixture
def idle_limit(db: Db) -> Iterator[None]:
    """MySQL family: every session of a user without the admin privilege (not root, which the other tests
    use) gets wait_timeout = 1 s while the test runs. Nothing to do on PostgreSQL (a role setting)."""
    if db.dialect != "mysql":
        yield
        return
    before = rows(db.direct_url, "SELECT @@GLOBAL.init_connect")[0][0]
    execute(db.direct_url, "SET GLOBAL init_connect = 'SET SESSION wait_timeout = 1'")
    try:
        yield
    finally:
        execute(db.direct_url, "SET GLOBAL init_connect = :before", before=before)


@pytest.mark.backends("postgresql", *POOLED, "mysql")
def test_a_runner_whose_idle_session_the_server_ends_is_not_joined(db: Db, idle_limit: None) -> None:
    """Items 7 and 3: the server ends a runner's session while it sleeps between batches (idle longer than
    idle_session_timeout / wait_timeout); a second `run` started then exits 6 instead of joining it, and the
    first one finishes the run correctly."""
    ids = range(1, 5)
    gateway(db, ids)
    url = idle_limited_user(db)
    first = start_cli("run", "--database-url", url, "--batch-size", "1", "--fixed", "--sleep", "6", "-q")
    try:
        wait_for(lambda: ledger_size(db.url) >= 1, "the first batch", first)
        time.sleep(2)  # the first runner sleeps 6 s: the server ends its idle session(s) after 1 s
        second = cli(url, "run", "-q")
    finally:
        code, err = finish(first)
    assert second.returncode == ExitCode.LOCKED, second.stderr
    assert code == ExitCode.OK, err
    assert_one_exact_run(db.url, ids)


def other_build(tmp_path: Path) -> Path:
    """A second copy of the tool (its package, migrations and alembic.ini) at another path, with another
    version string where the package has one; its CLI runs this copy's code."""
    copy = tmp_path / "other-build"
    copy.mkdir()
    for item in ("backfill", "migrations"):
        shutil.copytree(REPO / item, copy / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "alembic.ini", copy / "alembic.ini")
    init = copy / "backfill" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "([^"]*)"', r'__version__ = "\1+other"', init.read_text()))
    where = subprocess.run(
        [sys.executable, "-c", "import backfill; print(backfill.__file__)"],
        cwd=copy,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(copy), where.stdout
    return copy


def cli_of(build: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "backfill", *args], cwd=build, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.mark.backends("postgresql", *POOLED, "mysql")
def test_two_builds_of_the_tool_exclude_each_other(db: Db, tmp_path: Path) -> None:
    """Item 7 (and 3): two copies of the tool at different paths, with different version strings, exclude
    each other: while either runs, the other's `run` exits 6; a stopped run is then finished exactly."""
    ids = range(1, 41)
    gateway(db, ids)
    builds = (other_build(tmp_path), REPO)
    for holder_build, blocked_build in (builds, builds[::-1]):
        done = ledger_size(db.url)
        holder = cli_of(
            holder_build, "run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "0.5", "-q"
        )
        try:
            wait_for(lambda done=done: ledger_size(db.url) > done + 1, "the holder's progress", holder)
            blocked = finish(cli_of(blocked_build, "run", "--database-url", db.url, "-q"))
        finally:
            holder.send_signal(signal.SIGTERM)  # stops after the batch in flight, resumably
            stopped = finish(holder)
        assert blocked[0] == ExitCode.LOCKED, (holder_build, blocked)
        assert stopped[0] == ExitCode.STOPPED, stopped
    result = cli(db.url, "run", "-q")
    assert result.returncode == ExitCode.OK, result.stderr
    assert_one_exact_run(db.url, ids)


# ---------------------------------------------------------------- item 4: prepared statements


def prepared_statements_on_the_pooled_connections(db: Db, url: str) -> dict[int, list[str]]:
    """The prepared statements of every server connection the pooler keeps for ``url``'s database and user:
    as many clients as there are such connections, each inside a transaction (so each holds one of them), ask
    at once; every server connection seen on the server must have answered."""
    user = sa.make_url(url).username
    db.engine.dispose()  # (its idle clients would hold server connections in session pooling)
    before = {
        int(pid)
        for (pid,) in rows(
            db.direct_url,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND usename = :u "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            u=user,
        )
    }
    u = sa.make_url(url)
    clients = [
        psycopg.connect(
            host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database, prepare_threshold=None
        )
        for _ in range(max(1, len(before)))
    ]
    try:
        seen = {}
        for client in clients:
            row = client.execute(
                "SELECT pg_backend_pid(), COALESCE(array_agg(name::text), '{}') FROM pg_prepared_statements"
            ).fetchone()
            assert row is not None
            seen[int(row[0])] = list(row[1])
    finally:
        for client in clients:
            client.close()
    assert before <= set(seen), (before, seen)
    return seen


@pytest.mark.backends(*POOLED)
def test_no_prepared_statement_outlives_its_transaction(db: Db) -> None:
    """Item 4: after runs through the pooler (one batch per experiment, and status several times), no
    server connection of the pool holds a prepared statement, and `revert --yes` removes every row (exit 0,
    run record `reverted`); `?prepare_threshold=0` in the URL (psycopg's own remedy) is accepted too."""
    ids = range(1, 61)
    gateway(db, ids)
    for url in (db.url, db.url + "?prepare_threshold=0"):
        result = cli(url, "run", "--batch-size", "1", "--fixed", "-q")
        assert result.returncode == ExitCode.OK, result.stderr
        for _ in range(3):
            assert cli(url, "status").returncode == ExitCode.OK
        assert tagged(db.url) == set(ids)
        left = prepared_statements_on_the_pooled_connections(db, url)
        assert all(names == [] for names in left.values()), left
        reverted = cli(url, "revert", "--yes", "--batch-size", "1")
        assert reverted.returncode == ExitCode.OK and f"removed {len(ids)}" in reverted.stdout, reverted.stderr
        assert tagged(db.url) == set()
        assert rows(db.url, f"SELECT state FROM {RUNS_TABLE} ORDER BY id DESC LIMIT 1") == [("reverted",)]
        left = prepared_statements_on_the_pooled_connections(db, url)
        assert all(names == [] for names in left.values()), left


# ---------------------------------------------------------------- item 5: the schema


def mlflow_in_schema_mlf(db: Db) -> None:
    """MLflow's tables (all of them, as MLflow made them) move to schema ``mlf``, gateway experiments 1-5;
    ``public`` gets look-alike ``experiments`` and ``experiment_tags`` with gateway experiments 1-3, so that
    work done on the wrong schema shows."""
    execute(
        db.direct_url,
        "ALTER SCHEMA public RENAME TO mlf",
        "CREATE SCHEMA public",
        "CREATE TABLE public.experiments (LIKE mlf.experiments INCLUDING ALL)",
        "CREATE TABLE public.experiment_tags (LIKE mlf.experiment_tags INCLUDING ALL)",
        "ALTER TABLE public.experiment_tags ADD FOREIGN KEY (experiment_id) REFERENCES public.experiments",
    )
    for schema, ids in (("mlf", range(1, 6)), ("public", range(1, 4))):
        for e in ids:
            execute(
                db.direct_url,
                f"INSERT INTO {schema}.experiments (experiment_id, name, artifact_location, lifecycle_stage, "
                f"creation_time, last_update_time) VALUES ({e}, 'exp-{e}', '/tmp/{e}', 'active', 0, 0)",
                f"INSERT INTO {schema}.experiment_tags (key, value, experiment_id) VALUES ('{SRC}', 'GATEWAY', {e})",
            )


def project_tables(db: Db) -> set[tuple[str, str]]:
    """(schema, table) of the project's tables anywhere in the database."""
    return {
        (s, t)
        for s, t in rows(
            db.direct_url,
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_name LIKE 'gateway_backfill%' OR table_name = :v",
            v=VERSION_TABLE,
        )
    }


@pytest.mark.backends("postgresql", *POOLED)
def test_the_schema_option_works_on_that_schema(db: Db) -> None:
    """Item 5: `--schema mlf` (and `-x schema=mlf` for Alembic) works through the pooler as directly, on
    the MLflow tables in schema mlf, and leaves `public` (which has look-alike tables) untouched."""
    mlflow_in_schema_mlf(db)
    for command, code in ((["status"], 0), (["verify"], 1), (["run"], 0), (["verify"], 0)):
        result = cli(db.url, *command, "--schema", "mlf")
        assert result.returncode == code, (command, result.stderr)
    assert tagged(db.direct_url, "mlf") == {1, 2, 3, 4, 5} and tagged(db.direct_url, "public") == set()
    assert {s for s, _ in project_tables(db)} == {"mlf"}
    reverted = cli(db.url, "revert", "--yes", "--schema", "mlf")
    assert reverted.returncode == 0 and "removed 5" in reverted.stdout, reverted.stderr
    up = alembic(db.url, "-x", "schema=mlf", "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert tagged(db.direct_url, "mlf") == {1, 2, 3, 4, 5} and tagged(db.direct_url, "public") == set()
    assert ("mlf", VERSION_TABLE) in project_tables(db) and {s for s, _ in project_tables(db)} == {"mlf"}
    down = alembic(db.url, "-x", "schema=mlf", "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert tagged(db.direct_url, "mlf") == set() and tagged(db.direct_url, "public") == set()


@pytest.mark.backends("postgresql", *POOLED)
def test_a_search_path_in_options_reaches_the_schema_through_the_pooler(db: Db) -> None:
    """Item 5: `?options=-csearch_path%3Dmlf`, which a stock PgBouncer refuses as a start-up parameter,
    still selects schema mlf (the tool applies the `-c` settings itself): `run` tags mlf, never public."""
    mlflow_in_schema_mlf(db)
    url = db.url + "?options=-csearch_path%3Dmlf"
    result = cli(url, "run")
    assert result.returncode == ExitCode.OK, result.stderr
    assert tagged(db.direct_url, "mlf") == {1, 2, 3, 4, 5} and tagged(db.direct_url, "public") == set()
    assert {s for s, _ in project_tables(db)} == {"mlf"}
    assert cli(url, "verify").returncode == ExitCode.OK


@pytest.mark.backends("postgresql", *POOLED)
def test_a_schema_that_is_missing_or_out_of_reach_is_refused(db: Db) -> None:
    """Item 5: a schema that does not exist is exit 4, one the user lacks USAGE on is exit 5, each on one
    line, and nothing is written (not even the project's tables)."""
    mlflow_in_schema_mlf(db)
    name, password = f"nousage_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex[:8]
    database = sa.make_url(db.url).database
    execute(
        db.direct_url,
        f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
        f'GRANT CONNECT ON DATABASE "{database}" TO {name}',
        f"GRANT USAGE ON SCHEMA public TO {name}",
    )
    user_url = sa.make_url(db.url).set(username=name, password=password).render_as_string(hide_password=False)
    for result, code in (
        (cli(db.url, "run", "--schema", "nope"), ExitCode.NOT_MLFLOW),
        (alembic(db.url, "-x", "schema=nope", "upgrade", "head"), ExitCode.NOT_MLFLOW),
        (cli(user_url, "run", "--schema", "mlf"), ExitCode.PERMISSION),
    ):
        assert result.returncode == code, result.stderr
        one_line(result)
    assert project_tables(db) == set()
    assert tagged(db.direct_url, "mlf") == set() and tagged(db.direct_url, "public") == set()


# ---------------------------------------------------------------- item 6: statement pooling


@pytest.fixture
def statement_pooler(db: Db) -> Iterator[PgBouncer]:
    """A PgBouncer in statement pooling in front of the pooler backends' server, for one test."""
    assert db.server.container is not None and db.server.admin_url
    pooler = start_pgbouncer(db.server.container.get_wrapped_container().id, db.server.admin_url, "statement")
    try:
        yield pooler
    finally:
        pooler.stop()


def logins(pooler: PgBouncer, database: str) -> int:
    """How many clients have tried to log in to ``database`` through ``pooler`` (PgBouncer logs each)."""
    log = b"".join(pooler.container.get_logs()).decode(errors="replace")
    return log.count(f"login attempt: db={database} ")


@pytest.mark.backends(TRANSACTION_POOLED)
def test_statement_pooling_is_refused_at_once(db: Db, statement_pooler: PgBouncer) -> None:
    """Item 6: every writing command through a PgBouncer in statement pooling is refused at once: exit 2,
    one line naming statement pooling, no retries (one or two logins, not six), nothing written."""
    gateway(db, range(1, 11))
    url = statement_pooler.url(db.direct_url)
    database = sa.make_url(url).database or ""
    before = sorted(rows(db.direct_url, "SELECT experiment_id, key, value FROM experiment_tags"))
    for command in (
        lambda: cli(url, "run"),
        lambda: cli(url, "revert", "--yes"),
        lambda: alembic(url, "upgrade", "head"),
        lambda: alembic(url, "downgrade", "base"),
    ):
        attempts = logins(statement_pooler, database)
        result = command()
        assert result.returncode == ExitCode.USAGE, result.stderr
        one_line(result)
        assert "statement" in result.stderr.lower() and "pool" in result.stderr.lower(), result.stderr
        assert logins(statement_pooler, database) - attempts <= 2
    assert project_tables(db) == set()
    assert sorted(rows(db.direct_url, "SELECT experiment_id, key, value FROM experiment_tags")) == before


# ---------------------------------------------------------------- item 8: messages


def assert_no_password_claim(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    output = result.stdout + result.stderr
    assert "password" not in result.stderr.lower(), result.stderr
    assert not any(s in output for s in secrets), output
    one_line(result)


def test_a_bad_sslmode_is_named() -> None:
    """Item 8: `?sslmode=bogus` gets a message naming the bad value (exit 2), with or without a password in
    the URL, never claiming that a password is in it, never printing the password."""
    for url in ("postgresql://mgb@127.0.0.1:1/mlflow", "postgresql://mgb:s3cret-pw@127.0.0.1:1/mlflow"):
        result = cli(url + "?sslmode=bogus", "status")
        assert result.returncode == ExitCode.USAGE, result.stderr
        assert "bogus" in result.stderr
        assert_no_password_claim(result, "s3cret-pw")


@pytest.mark.parametrize("password", ["p@ss:word", "p@ss/word", "p@ss?word", "p@ss#word"])
def test_an_unencoded_password_gets_the_percent_encoding_hint(password: str) -> None:
    """Item 8: a password with an unencoded character that breaks the URL apart (`@` with `:`, `/`, `?` or
    `#` after it) is refused with the percent-encoding hint (exit 2), printing no part of it."""
    result = cli(f"postgresql://mgb:{password}@127.0.0.1:1/mlflow", "status", "--connect-timeout", "1")
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "percent-encode" in result.stderr
    output = result.stdout + result.stderr
    assert password not in output and password.split("@", 1)[1] not in output, output
    one_line(result)


def self_signed_certificate(directory: Path) -> Path:
    """A client certificate file (self-signed; its key is thrown away)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mgb")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = directory / "client.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.backends(TRANSACTION_POOLED)
def test_a_missing_tls_file_is_named(db: Db, tmp_path: Path) -> None:
    """Item 8: a missing `sslrootcert` or `sslkey` file is named in the message, which never claims that
    a password is in it nor prints the password. On the pooler backends' server directly: it speaks TLS (the
    PgBouncer in front of it does not, to its clients)."""
    password = sa.make_url(db.url).password or ""
    missing = tmp_path / "nowhere"
    certificate = self_signed_certificate(tmp_path)
    for query, named in (
        (f"sslmode=verify-full&sslrootcert={missing / 'root.crt'}", missing / "root.crt"),
        (f"sslmode=require&sslcert={certificate}&sslkey={missing / 'client.key'}", missing / "client.key"),
    ):
        result = cli(f"{db.direct_url}?{query}", "status", "--connect-timeout", "2")
        assert result.returncode in (ExitCode.USAGE, ExitCode.CONNECT), result.stderr
        assert str(named) in result.stderr, result.stderr
        assert_no_password_claim(result, password)
