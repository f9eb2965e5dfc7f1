#!/usr/bin/env python3
"""Smoke test of the test server images (scripts/build-test-images.sh) through tests/backends.py.

For each backend id given (default: all five, and ``pgbouncer``): start the server with the unmodified testcontainers
class, connect with SQLAlchemy and the project's drivers as the superuser/root and as a freshly made
ordinary user, pipe a SQL script into the server's own client, ``docker restart`` it and log in again
(MySQL 9.7: the first caching_sha2_password login after a restart takes the full-authentication path),
and time a ``docker stop``. Then, per backend, a primary/replica pair: a write reaches the replica,
the replica refuses writes, pausing replication makes it lag, resuming catches up, and replication
survives a restart of the replica and of the primary. ``pgbouncer`` (not a database backend): a PostgreSQL
15 server with a PgBouncer in front of it in each pool mode; the superuser and a fresh role log in through
it with their own passwords, a wrong password is refused, the `options` start-up parameter is refused
(stock ``ignore_startup_parameters``), clients share the pooled server connections, statement pooling
refuses a transaction, and a restart of the server is survived.

Run from the repository with the project's venv: ``.venv/bin/python scripts/smoke-test-images.py
[--skip-replication] [BACKEND...]``. Containers and networks are named ``mgb-smoke-*`` / ``mgb-repl-*``
and removed at the end. Prints what it measured; exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa
from pymysql import _auth

from tests import backends


def log(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def engine_for(url: str | sa.URL, **connect_args: object) -> Iterator[sa.Engine]:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args=connect_args)
    try:
        yield engine
    finally:
        engine.dispose()


def scalar(url: str | sa.URL, statement: str, **params: object) -> object:
    with engine_for(url) as engine, engine.connect() as connection:
        return connection.execute(sa.text(statement), params).scalar()


def execute(url: str | sa.URL, *statements: str) -> None:
    with engine_for(url) as engine, engine.connect() as connection:
        for statement in statements:
            connection.execute(sa.text(statement))


def admin_url(container: backends.DbContainer, database: str | None = None) -> sa.URL:
    url = sa.make_url(container.get_connection_url())
    return url.set(database=database) if database else url


def restart(container: backends.DbContainer) -> float:
    """``docker restart`` (stop, then start) and wait until the server takes connections again."""
    wrapped = container.get_wrapped_container()
    t0 = time.monotonic()
    wrapped.restart(timeout=20)
    deadline = time.monotonic() + 120
    while True:
        try:
            scalar(admin_url(container), "SELECT 1")
            return time.monotonic() - t0
        except sa.exc.DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def mysql_auth_probe(container: backends.DbContainer, user_url: sa.URL) -> None:
    """What PyMySQL does with caching_sha2_password's full authentication (cache empty after a restart)."""
    restart(container)
    pymysql_version = importlib.metadata.version("PyMySQL")
    log(f"    PyMySQL {pymysql_version}, cryptography package importable: {_auth._have_cryptography}")
    saved = _auth._have_cryptography
    _auth._have_cryptography = False
    try:
        with engine_for(user_url, ssl_disabled=True) as engine:
            engine.connect().close()
        log("    full auth, TLS disabled, cryptography hidden: connected (unexpected)")
    except Exception as exc:  # noqa: BLE001 - reported
        log(f"    full auth, TLS disabled, cryptography hidden: refused ({type(exc).__name__}: {exc})")
    finally:
        _auth._have_cryptography = saved
    with engine_for(user_url, ssl_disabled=True) as engine, engine.connect() as connection:
        cipher = connection.execute(sa.text("SHOW SESSION STATUS LIKE 'Ssl_cipher'")).one()[1]
    log(f"    full auth, TLS disabled, with cryptography: connected by RSA key exchange (Ssl_cipher={cipher!r})")


def smoke_server(backend_id: str) -> dict[str, object]:
    result: dict[str, object] = {"backend": backend_id, "image": backends.image_for(backend_id)}
    t0 = time.monotonic()
    container = backends.start_server(backend_id, name=f"mgb-smoke-{backend_id}-{secrets.token_hex(3)}")
    try:
        result["ready_s"] = round(time.monotonic() - t0, 1)
        version = backends.server_version(container)
        result["version"] = version
        log(f"[{backend_id}] ready in {result['ready_s']} s: {version}")
        postgres = backend_id.startswith("postgresql")
        root = admin_url(container)
        if postgres:
            execute(root, "CREATE ROLE app LOGIN PASSWORD 'app-pw-1'", "CREATE DATABASE appdb OWNER app")
            user_url = root.set(username="app", password="app-pw-1", database="appdb")
        else:
            execute(
                root,
                "CREATE USER 'app'@'%' IDENTIFIED BY 'app-pw-1'",
                "CREATE DATABASE appdb",
                "GRANT ALL PRIVILEGES ON appdb.* TO 'app'@'%'",
            )
            user_url = root.set(username="app", password="app-pw-1", database="appdb")
            plugin = scalar(root, "SELECT plugin FROM mysql.user WHERE user = 'app'")
            result["auth_plugin"] = plugin
            log(f"[{backend_id}] ordinary user 'app' has {plugin}")
        execute(user_url, "CREATE TABLE t (id INTEGER PRIMARY KEY, v VARCHAR(10))", "INSERT INTO t VALUES (1, 'a')")
        assert scalar(user_url, "SELECT count(*) FROM t") == 1
        if not postgres:
            cipher = (
                scalar(
                    user_url,
                    "SELECT variable_value FROM performance_schema.session_status WHERE variable_name = 'Ssl_cipher'",
                )
                if backend_id == "mysql"
                else None
            )
            log(f"[{backend_id}] ordinary user connected (TLS cipher {cipher!r})")
        backends.run_sql_in_container(
            container, backend_id, "appdb", "INSERT INTO t VALUES (2, 'b');\nINSERT INTO t VALUES (3, 'c');\n"
        )
        assert scalar(user_url, "SELECT count(*) FROM t") == 3, "the client in the container did not run the script"
        result["restart_s"] = round(restart(container), 1)
        # The ordinary user's first login after the restart (MySQL: full authentication, cache empty).
        assert scalar(user_url, "SELECT count(*) FROM t") == 3
        assert backends.server_version(container) == version
        log(f"[{backend_id}] docker restart + ready in {result['restart_s']} s; both users log in again, data kept")
        if backend_id == "mysql":
            mysql_auth_probe(container, user_url)
        wrapped = container.get_wrapped_container()
        t1 = time.monotonic()
        wrapped.stop(timeout=20)
        result["stop_s"] = round(time.monotonic() - t1, 1)
        wrapped.reload()
        result["exit_code"] = wrapped.attrs["State"]["ExitCode"]
        log(f"[{backend_id}] docker stop took {result['stop_s']} s (exit code {result['exit_code']})")
    finally:
        container.stop()
    return result


def count_on(container: backends.DbContainer, database: str) -> int:
    return int(scalar(admin_url(container, database), "SELECT count(*) FROM t"))  # type: ignore[arg-type]


def smoke_replication(backend_id: str) -> dict[str, object]:
    result: dict[str, object] = {"backend": backend_id}
    t0 = time.monotonic()
    primary, replica, network = backends.start_primary_and_replica(backend_id)
    try:
        result["pair_ready_s"] = round(time.monotonic() - t0, 1)
        log(f"[{backend_id} pair] primary and replica ready, first write replicated, in {result['pair_ready_s']} s")
        postgres = backend_id.startswith("postgresql")
        p_root = admin_url(primary)
        if postgres:
            execute(admin_url(primary, "postgres"), "CREATE DATABASE smoke")
            execute(
                admin_url(primary, "smoke"),
                "CREATE TABLE t (id INTEGER PRIMARY KEY)",
                "INSERT INTO t VALUES (1)",
                "CREATE ROLE app LOGIN PASSWORD 'app-pw-1'",
                "GRANT ALL ON t TO app",
            )
            user_url = admin_url(replica, "smoke").set(username="app", password="app-pw-1")
        else:
            execute(
                p_root,
                "CREATE DATABASE smoke",
                "CREATE TABLE smoke.t (id INTEGER PRIMARY KEY)",
                "INSERT INTO smoke.t VALUES (1)",
                "CREATE USER 'app'@'%' IDENTIFIED BY 'app-pw-1'",
                "GRANT ALL PRIVILEGES ON smoke.* TO 'app'@'%'",
            )
            user_url = admin_url(replica, "smoke").set(username="app", password="app-pw-1")
        backends.wait_for_replica(primary, replica)
        assert count_on(replica, "smoke") == 1
        log(f"[{backend_id} pair] a write on the primary is on the replica")
        try:
            execute(user_url, "INSERT INTO t VALUES (100)")
        except sa.exc.DBAPIError as exc:
            log(f"[{backend_id} pair] the replica refuses an ordinary user's write: {str(exc.orig).splitlines()[0]}")
        else:
            raise AssertionError("the replica accepted a write")
        backends.pause_replication(replica)
        execute(admin_url(primary, "smoke"), "INSERT INTO t VALUES (2)")
        time.sleep(1)
        assert count_on(replica, "smoke") == 1, "the paused replica applied a write"
        try:
            backends.wait_for_replica(primary, replica, timeout=2)
        except TimeoutError as exc:
            log(f"[{backend_id} pair] paused: the replica lags ({str(exc)[:160]}...)")
        else:
            raise AssertionError("wait_for_replica returned while replication was paused")
        backends.resume_replication(replica)
        t1 = time.monotonic()
        backends.wait_for_replica(primary, replica)
        assert count_on(replica, "smoke") == 2
        log(f"[{backend_id} pair] resumed: caught up in {time.monotonic() - t1:.2f} s")
        result["replica_restart_s"] = round(restart(replica), 1)
        execute(admin_url(primary, "smoke"), "INSERT INTO t VALUES (3)")
        backends.wait_for_replica(primary, replica)
        assert count_on(replica, "smoke") == 3
        result["primary_restart_s"] = round(restart(primary), 1)
        execute(admin_url(primary, "smoke"), "INSERT INTO t VALUES (4)")
        t2 = time.monotonic()
        backends.wait_for_replica(primary, replica)
        assert count_on(replica, "smoke") == 4
        log(
            f"[{backend_id} pair] replication survives a restart of the replica ({result['replica_restart_s']} s) "
            f"and of the primary ({result['primary_restart_s']} s; caught up {time.monotonic() - t2:.1f} s later)"
        )
    finally:
        backends.stop_replication_pair(primary, replica, network)
    return result


def pg_login(url: sa.URL, **options: object) -> tuple[int, str]:
    """Log in with psycopg (no prepared statements) and return (server pid, current_user)."""
    with backends.psycopg_connect(url, connect_timeout=5, **options) as connection:
        row = connection.execute("SELECT pg_backend_pid(), current_user").fetchone()
        assert row is not None
        return int(row[0]), str(row[1])


def smoke_pgbouncer() -> dict[str, object]:
    """A PgBouncer in each pool mode in front of one PostgreSQL 15 server."""
    import psycopg

    result: dict[str, object] = {"backend": "pgbouncer", "image": backends.pgbouncer_image()}
    postgres = backends.start_server("postgresql", name=f"mgb-smoke-pgbouncer-pg-{secrets.token_hex(3)}")
    poolers: list[backends.PgBouncer] = []
    try:
        root = admin_url(postgres, "postgres").set(drivername="postgresql+psycopg")
        backends.prepare_for_poolers(root.render_as_string(hide_password=False))
        execute(root, "CREATE ROLE app LOGIN PASSWORD 'app-pw-1'", "CREATE DATABASE appdb OWNER app")
        for mode in backends.POOL_MODES:
            t0 = time.monotonic()
            pooler = backends.start_pgbouncer(
                postgres.get_wrapped_container().id,
                root.render_as_string(hide_password=False),
                mode,
                name=f"mgb-smoke-pgbouncer-{mode}-{secrets.token_hex(3)}",
            )
            poolers.append(pooler)
            result[f"{mode}_ready_s"] = round(time.monotonic() - t0, 1)
            through = sa.make_url(pooler.url(root.render_as_string(hide_password=False)))
            app = through.set(username="app", password="app-pw-1", database="appdb")
            assert pg_login(through)[1] == root.username
            pids = {pg_login(app)[0] for _ in range(8)}
            assert pg_login(app)[1] == "app"
            assert len(pids) <= pooler.pool_size, pids
            log(
                f"[pgbouncer {mode}] {pooler.version} ready in {result[f'{mode}_ready_s']} s; the superuser and a "
                f"new role log in with their own passwords; 8 clients used {len(pids)} server connection(s)"
            )
            for refused, url, options in (
                ("a wrong password", app.set(password="wrong"), {}),
                ("`options`", app, {"options": "-c lock_timeout=1000"}),
            ):
                try:
                    pg_login(url, **options)
                except psycopg.OperationalError as exc:
                    log(f"[pgbouncer {mode}] {refused} refused: {str(exc).strip().splitlines()[-1]}")
                else:
                    raise AssertionError(f"{mode} pooling accepted {refused}")
            if mode == "statement":
                try:
                    with psycopg.connect(
                        host=app.host, port=app.port, user=app.username, password=app.password, dbname=app.database
                    ) as conn:
                        conn.execute("SELECT 1")  # psycopg opens a transaction first (autocommit is off)
                except psycopg.Error as exc:
                    log(f"[pgbouncer {mode}] a transaction is refused: {str(exc).strip().splitlines()[0]}")
                else:
                    raise AssertionError("statement pooling ran a transaction of two statements")
        result["server_restart_s"] = round(restart(postgres), 1)
        for pooler in poolers:
            through = sa.make_url(pooler.url(root.render_as_string(hide_password=False)))
            deadline = time.monotonic() + 30
            while True:
                try:
                    pg_login(through.set(username="app", password="app-pw-1", database="appdb"))
                    break
                except psycopg.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        log(f"[pgbouncer] after a restart of the server ({result['server_restart_s']} s) every pooler logs in again")
    finally:
        for pooler in poolers:
            pooler.stop()
        container_id = postgres.get_wrapped_container().id
        postgres.stop()
        backends.remove_pooler_network(container_id)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backends", nargs="*", default=[*backends.SERVER_BACKENDS, "pgbouncer"])
    parser.add_argument("--skip-replication", action="store_true")
    parser.add_argument("--only-replication", action="store_true")
    args = parser.parse_args()
    results = []
    for backend_id in args.backends:
        if backend_id == "pgbouncer":
            results.append(smoke_pgbouncer())
            continue
        if not args.only_replication:
            results.append(smoke_server(backend_id))
        if not args.skip_replication:
            results.append(smoke_replication(backend_id))
    log("\nsummary:")
    for r in results:
        log("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
