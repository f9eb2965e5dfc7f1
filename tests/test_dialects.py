"""Dialect details, proven on the real servers."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from backfill.connect import create_engine
from backfill.job import Backfill
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from backfill.urls import parse_url
from backfill.walk import Settings
from tests.conftest import Db

# Per-server facts (each checked against the server below, never assumed from another one).
# Does the default utf8mb4 collation ignore trailing spaces? MariaDB's (utf8mb4_general_ci, and 11.8's
# utf8mb4_uca1400_ai_ci) pad; MySQL 8+'s utf8mb4_0900_ai_ci does not.
TRAILING_SPACES_IGNORED = {"mysql": False, "mariadb": True, "mariadb-11": True}
# The session's isolation level: MySQL 8 dropped @@tx_isolation; MariaDB added @@transaction_isolation in 11.1.
ISOLATION_VARIABLE = {
    "mysql": "@@transaction_isolation",
    "mariadb": "@@tx_isolation",
    "mariadb-11": "@@transaction_isolation",
}
# The default collation of a utf8mb4 database.
DEFAULT_COLLATION = {
    "mysql": "utf8mb4_0900_ai_ci",
    "mariadb": "utf8mb4_general_ci",
    "mariadb-11": "utf8mb4_uca1400_ai_ci",
}


@pytest.mark.backends("mysql")
def test_exact_matching_despite_a_case_insensitive_collation(db: Db) -> None:
    with db.engine.connect() as conn:  # the premise, per server: case ignored; trailing spaces per the table above
        collation = conn.execute(sa.text("SELECT @@collation_database")).scalar()
        ignored = conn.execute(sa.text("SELECT 'gateway' = 'GATEWAY', 'GATEWAY ' = 'GATEWAY'")).one()
    assert collation == DEFAULT_COLLATION[db.backend]
    assert tuple(ignored) == (1, int(TRAILING_SPACES_IGNORED[db.backend]))
    db.add_experiments(
        [
            (1, "active", [(SRC, "GATEWAY")]),
            (2, "active", [(SRC, "gateway")]),
            (3, "active", [(SRC, "GATEWAY ")]),
            (4, "active", [(SRC, "Gateway"), (ISGW, "TRUE")]),
        ]
    )
    job = Backfill(create_engine(parse_url(db.url)))
    assert job.status().gateway == 1
    job.run()
    assert {e for e, k, _ in db.tags() if k == ISGW} == {1, 4}
    assert job.status().conflicts == 0  # experiment 4 is not a gateway experiment, so its TRUE is no conflict


@pytest.mark.backends("mysql")
def test_batches_run_at_read_committed(db: Db) -> None:
    db.add_experiments([(1, "active", [(SRC, "GATEWAY")])])
    engine = create_engine(parse_url(db.url))
    levels: list[str] = []

    @event.listens_for(engine, "after_cursor_execute")
    def isolation(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO experiment_tags") and not levels:
            other = cursor.connection.cursor()
            other.execute(f"SELECT {ISOLATION_VARIABLE[db.backend]}")
            levels.append(other.fetchone()[0])

    Backfill(engine).run()
    assert levels == ["READ-COMMITTED"]


@pytest.mark.backends("postgresql")
def test_psycopg_gets_integer_binds(db: Db) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 6)])
    engine = create_engine(parse_url(db.url))
    seen: list[dict] = []

    @event.listens_for(engine, "before_cursor_execute")
    def binds(conn, cursor, statement, parameters, *_):  # type: ignore[no-untyped-def]
        if statement.startswith("WITH ins"):
            seen.append(parameters)

    Backfill(engine, Settings(batch_size=2, adaptive=False)).run()
    assert len(seen) == 3
    for parameters in seen:
        assert all(type(parameters[k]) is int for k in ("lo", "hi", "run", "now"))
    with engine.connect() as conn:  # integer binds keep the keyset range on the primary key index
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                sa.text(
                    "EXPLAIN SELECT 1 FROM experiment_tags s WHERE s.key = :k AND s.experiment_id > :lo "
                    "AND s.experiment_id <= :hi"
                ),
                {"k": SRC, "lo": 1, "hi": 3},
            )
        )
    assert "experiment_tag_pk" in plan and "Seq Scan" not in plan


@pytest.mark.backends("mysql")
def test_a_row_written_between_ledger_and_insert_is_retried_not_claimed(db: Db) -> None:
    """MySQL has no RETURNING: a batch writes its ledger, then a plain INSERT of those rows. A writer that adds
    one of them in between makes that INSERT fail with a duplicate key; the batch is rolled back and retried,
    and the ledger never claims the other writer's row (so revert leaves it, even though it is identical)."""
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 6)])
    engine = create_engine(parse_url(db.url))
    raced: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def other_writer(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        if raced or not statement.startswith("INSERT INTO experiment_tags") or LEDGER_TABLE not in statement:
            return
        with db.engine.begin() as other:  # commits at once: the batch holds no lock that would stop it
            other.execute(
                sa.text("INSERT INTO experiment_tags (`key`, value, experiment_id) VALUES (:k, 'true', 3)"), {"k": ISGW}
            )
        raced.append(statement)

    job = Backfill(engine, Settings(batch_size=10, adaptive=False))
    report = job.run()
    assert raced and report.state == "done" and report.inserted == 4
    assert {e for e, k, v in db.tags() if k == ISGW and v == "true"} == {1, 2, 3, 4, 5}
    assert {row[0] for row in db.table(LEDGER_TABLE)} == {1, 2, 4, 5}
    job.revert()
    assert {e for e, k, _ in db.tags() if k == ISGW} == {3}


@pytest.mark.backends("mysql")
def test_no_statement_leaves_a_warning(db: Db) -> None:
    """MySQL 9 deprecates `BINARY expr` and `VALUES()` in ON DUPLICATE KEY UPDATE (warning 1287): every
    statement of status, verify, run (its first batch included) and revert is checked with SHOW WARNINGS."""
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 8)])
    db.add_experiments([(9, "active", [(SRC.upper(), "GATEWAY")])])
    engine = create_engine(parse_url(db.url))
    warnings: list[tuple[str, tuple]] = []

    @event.listens_for(engine, "after_cursor_execute")
    def show_warnings(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        other = cursor.connection.cursor()  # the statement's own cursor may still hold its rows
        other.execute("SHOW WARNINGS")
        warnings.extend((statement, tuple(row)) for row in other.fetchall() if row[0] != "Error")

    job = Backfill(engine, Settings(batch_size=3, adaptive=False))
    job.status()
    job.missing()
    job.run()
    job.revert()
    assert warnings == []


@pytest.mark.backends("postgresql", "mysql")
def test_the_longest_database_names_work(server) -> None:  # type: ignore[no-untyped-def]
    """The longest database names each server allows (63 on PostgreSQL, 64 on the MySQL family) work for every
    command, Alembic included (nothing the tool derives from the name, such as a lock's, may exceed a limit)."""
    from tests.mlflow_data import mlflow_store

    name = "m" * (63 if server.dialect == "postgresql" else 64)
    url = server.new_database(name)
    mlflow_store(url).engine.dispose()
    engine = sa.create_engine(url)
    Db(server.backend, url, server, engine).add_experiments([(1, "active", [(SRC, "GATEWAY")])])
    job = Backfill(create_engine(parse_url(url)))
    assert job.run().inserted == 1
    assert job.revert().removed == 1
    from tests.conftest import alembic

    up = alembic(url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    engine.dispose()


@pytest.mark.backends("postgresql", "mysql")
def test_the_statement_timeout_bounds_writes_too(db: Db) -> None:
    """--statement-timeout ends a write that runs too long on every server: PostgreSQL's statement_timeout,
    MariaDB's max_statement_time, and on Oracle MySQL (whose max_execution_time limits SELECT only) a
    KILL QUERY from the watchdog. The write is an INSERT ... SELECT that sleeps 4 s, limited to 1 s."""
    from backfill.connect import BEGIN, transaction
    from backfill.retry import Timeouts, is_transient, limits

    timeouts = Timeouts(statement=1)
    engine = create_engine(parse_url(db.url), timeouts)
    k = "`key`" if db.dialect == "mysql" else "key"
    slow = (
        f"INSERT INTO experiment_tags ({k}, value, experiment_id) SELECT 'slow', 'x', 0 FROM (SELECT pg_sleep(4)) z"
        if db.dialect == "postgresql"
        else f"INSERT INTO experiment_tags ({k}, value, experiment_id) SELECT 'slow', 'x', 0 FROM (SELECT SLEEP(4)) z"
    )
    with limits(timeouts), engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError) as err, transaction(conn, BEGIN[db.dialect]):
            conn.exec_driver_sql(slow)  # PostgreSQL: the limits are set by the transaction's BEGIN
        assert is_transient(err.value)  # a timeout: the batch is retried smaller
    assert "slow" not in {k for _, k, _ in db.tags()}
    engine.dispose()


@pytest.mark.backends("mysql")
def test_caching_sha2_password_first_login(db: Db) -> None:
    """MySQL 8+/9 users log in with caching_sha2_password; without TLS, the first login after a restart
    (or FLUSH PRIVILEGES) needs RSA from the `cryptography` package, which the project depends on
    (PyMySQL[rsa]). Without it: one line and exit 3, never a traceback and exit 1."""
    import subprocess
    import sys

    from tests.conftest import REPO

    if db.flavor != "mysql":
        assert db.flavor == "mariadb"  # MariaDB has no caching_sha2_password: nothing to check there
        return
    name, password = "sha2_" + uuid.uuid4().hex[:6], "pw-" + uuid.uuid4().hex[:8]
    database = sa.make_url(db.url).database
    with db.engine.connect() as conn:
        conn.execute(sa.text(f"CREATE USER '{name}'@'%' IDENTIFIED WITH caching_sha2_password BY '{password}'"))
        conn.execute(sa.text(f"GRANT SELECT ON `{database}`.* TO '{name}'@'%'"))
        conn.execute(sa.text("FLUSH PRIVILEGES"))  # empties the password cache: the next login is a first one
    url = (
        sa.make_url(db.url)
        .set(username=name, password=password)
        .update_query_dict({"ssl_disabled": "true"})
        .render_as_string(hide_password=False)
    )
    cli = "import sys; from backfill.cli import main; sys.argv = ['mlflow-gateway-backfill', *sys.argv[1:]]; main()"
    blocked = "import sys; sys.modules['cryptography'] = None; " + cli
    without = subprocess.run(
        [sys.executable, "-c", blocked, "status", "--database-url", url], cwd=REPO, capture_output=True, text=True
    )
    assert without.returncode == 3, without.stderr
    assert "cryptography" in without.stderr and "Traceback" not in without.stderr and password not in without.stderr
    with_rsa = subprocess.run(
        [sys.executable, "-c", cli, "status", "--database-url", url], cwd=REPO, capture_output=True, text=True
    )
    assert with_rsa.returncode == 0, with_rsa.stderr
