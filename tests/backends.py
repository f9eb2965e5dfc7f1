"""Real PostgreSQL and MySQL-family servers for the tests, in local Docker containers.

The images are never pulled (no registry is reachable on the project's machines):
they must exist locally. By default they are the stand-ins that
``scripts/build-test-images.sh`` builds from Debian packages, one per backend id:

==============  =======================  ======================================
backend id      image variable           default image
==============  =======================  ======================================
postgresql      MGB_POSTGRES_IMAGE       mlflow-gateway-backfill/postgres:15
postgresql-18   MGB_POSTGRES_18_IMAGE    mlflow-gateway-backfill/postgres:18
mysql           MGB_MYSQL_IMAGE          mlflow-gateway-backfill/mysql:9.7
mariadb         MGB_MARIADB_IMAGE        mlflow-gateway-backfill/mariadb:10.11
mariadb-11      MGB_MARIADB_11_IMAGE     mlflow-gateway-backfill/mariadb:11.8
==============  =======================  ======================================

An image variable selects another image (e.g. ``postgres:17``, ``mysql:8.4``,
``mariadb:11`` on a host that could pull them). The unmodified testcontainers classes
start them: :func:`start_server`. :func:`start_primary_and_replica` makes a replication
pair of our own images (their entrypoints read ``MGB_REPLICATION`` and friends; see
images/*-entrypoint.sh).

:func:`start_pgbouncer` puts a PgBouncer (``$MGB_PGBOUNCER_IMAGE``, default
``mlflow-gateway-backfill/pgbouncer:1.18``, Debian's package; images/pgbouncer-entrypoint.sh)
in front of a running PostgreSQL container, in one pool mode, with PgBouncer's stock
``ignore_startup_parameters``: every role of the server logs in through it with its own
password (``auth_query`` and SCRAM pass-through).

One container per server is meant to serve a whole session; each test gets a fresh
database on it through :func:`new_postgres_database` / :func:`new_mysql_database`.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

# testcontainers reads these when it is imported: set them before the imports below.
# Ryuk (the reaper) is an image of its own that cannot be pulled here; without it,
# containers are removed by stop() (or by `docker rm -f` after a killed run).
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
if Path("/.dockerenv").exists():
    # Inside a container testcontainers would otherwise hand out URLs on the bridge
    # gateway address; the published ports are reachable on localhost (the Docker host).
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

import docker
import sqlalchemy
from docker.errors import DockerException, ImageNotFound, NotFound
from testcontainers.community.mysql import MySqlContainer
from testcontainers.community.postgres import PostgresContainer
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

if TYPE_CHECKING:
    import psycopg


@dataclass(frozen=True)
class ServerBackend:
    """A server backend id, its image variable and our image for it."""

    id: str
    family: str  # "postgresql" or "mysql" (MySQL and MariaDB)
    variable: str
    default_image: str


SERVER_BACKENDS: dict[str, ServerBackend] = {
    b.id: b
    for b in (
        ServerBackend("postgresql", "postgresql", "MGB_POSTGRES_IMAGE", "mlflow-gateway-backfill/postgres:15"),
        ServerBackend("postgresql-18", "postgresql", "MGB_POSTGRES_18_IMAGE", "mlflow-gateway-backfill/postgres:18"),
        ServerBackend("mysql", "mysql", "MGB_MYSQL_IMAGE", "mlflow-gateway-backfill/mysql:9.7"),
        ServerBackend("mariadb", "mysql", "MGB_MARIADB_IMAGE", "mlflow-gateway-backfill/mariadb:10.11"),
        ServerBackend("mariadb-11", "mysql", "MGB_MARIADB_11_IMAGE", "mlflow-gateway-backfill/mariadb:11.8"),
    )
}
# The label scripts/build-test-images.sh puts on the images it builds (a hash of their recipe).
_RECIPE_LABEL = "org.mlflow-gateway-backfill.recipe"

DbContainer = PostgresContainer | MySqlContainer
_C = TypeVar("_C", PostgresContainer, MySqlContainer)

_SETUP_HINT = (
    "run `make test`, or scripts/ensure-docker.sh then scripts/build-test-images.sh "
    "(they start a Docker engine and build the images offline)"
)
_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def server_backend(backend_id: str) -> ServerBackend:
    """Return the description of server backend ``backend_id``; ValueError for an unknown id."""
    try:
        return SERVER_BACKENDS[backend_id]
    except KeyError:
        raise ValueError(f"unknown server backend {backend_id!r}; choose from {sorted(SERVER_BACKENDS)}") from None


def image_for(backend_id: str) -> str:
    """Return the image for ``backend_id``: its variable's value, or our own image."""
    backend = server_backend(backend_id)
    return os.environ.get(backend.variable) or backend.default_image


def postgres_image() -> str:
    """Return the image of :func:`start_postgres`: the ``postgresql`` backend's."""
    return image_for("postgresql")


def mysql_image() -> str:
    """Return the image of :func:`start_mysql` (kept for the current conftest).

    ``$MGB_MYSQL_IMAGE`` when set, as before; otherwise the ``mariadb`` backend's image
    (MariaDB 10.11), which served as the MySQL family before Oracle MySQL was built here.
    """
    return os.environ.get("MGB_MYSQL_IMAGE") or image_for("mariadb")


def _require_local_image(image: str, variable: str) -> None:
    """Raise RuntimeError unless ``image`` exists locally (testcontainers would pull)."""
    try:
        client = docker.from_env()
    except DockerException as exc:
        raise RuntimeError(f"No Docker engine reachable ({exc}): {_SETUP_HINT}.") from exc
    try:
        client.images.get(image)
    except ImageNotFound:
        raise RuntimeError(
            f"Docker image {image!r} (${variable}) is not present locally and is never "
            f"pulled: {_SETUP_HINT}, or unset ${variable}."
        ) from None
    except DockerException as exc:
        raise RuntimeError(f"Docker error while looking up {image!r}: {exc}") from exc
    finally:
        client.close()


def _free_port() -> int:
    """Return a TCP port that is free on this host right now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _start(container: _C) -> _C:
    """Start ``container``; remove it again if it never becomes ready.

    The server's port is published on a fixed free host port rather than a random one:
    Docker would pick a new random port at each ``docker restart``, so the URLs handed
    out before a restart would stop working.
    """
    container.with_bind_ports(container.port, _free_port())
    try:
        container.start()
    except BaseException:
        if container.get_wrapped_container() is not None:
            container.stop()
        raise
    return container


def _container(backend_id: str, image: str, password: str, name: str | None = None) -> DbContainer:
    """An unstarted container of ``image`` for ``backend_id`` (superuser/root, database ``mgb``)."""
    if server_backend(backend_id).family == "postgresql":
        return PostgresContainer(image, username="mgb", password=password, dbname="mgb", driver="psycopg", name=name)
    # As root (MySqlContainer then sets only MYSQL_ROOT_PASSWORD and MYSQL_DATABASE, and its
    # URL uses root), so the tests can create users and databases.
    container = MySqlContainer(image, username="root", password=password, dbname="mgb", dialect="pymysql", name=name)
    if backend_id in SNAPSHOT_ISOLATION_OFF:
        container.with_command(" ".join(SNAPSHOT_ISOLATION_OFF[backend_id]))
    return container


# MariaDB 11.6+ turns innodb_snapshot_isolation on by default, and MLflow 3.10's gateway store then fails with
# error 1020 ("Record has changed since last read in table 'endpoints'") as it creates an endpoint, so the
# tests that make real gateway experiments through MLflow could not. The server option (not SET GLOBAL)
# survives the restarts of the fault tests. The tool itself runs at READ COMMITTED, which the setting does
# not affect.
SNAPSHOT_ISOLATION_OFF = {"mariadb-11": ("--innodb-snapshot-isolation=OFF",)}


def start_server(backend_id: str, *, name: str | None = None) -> DbContainer:
    """Start a server for ``backend_id`` (see the table above) and return its container.

    PostgreSQL: superuser and database ``mgb``, a ``postgresql+psycopg://`` URL. The MySQL
    family: ``root`` and database ``mgb``, a ``mysql+pymysql://`` URL. The port is published
    on a fixed free host port, so the URL survives ``docker restart``. ``name`` names the
    container (Docker picks one otherwise).
    """
    image = image_for(backend_id)
    _require_local_image(image, server_backend(backend_id).variable)
    return _start(_container(backend_id, image, secrets.token_hex(12), name))


def start_postgres() -> PostgresContainer:
    """Start a PostgreSQL container (superuser and database ``mgb``) and return it."""
    container = start_server("postgresql")
    assert isinstance(container, PostgresContainer)
    return container


def start_mysql() -> MySqlContainer:
    """Start the MySQL-family container of the current conftest (:func:`mysql_image`) and return it.

    The tests connect as ``root`` (MySqlContainer then sets only
    ``MYSQL_ROOT_PASSWORD`` and ``MYSQL_DATABASE``, and its URL uses root), so they can
    create users and databases.
    """
    image = mysql_image()
    _require_local_image(image, "MGB_MYSQL_IMAGE" if os.environ.get("MGB_MYSQL_IMAGE") else "MGB_MARIADB_IMAGE")
    container = _container("mariadb", image, secrets.token_hex(12))
    assert isinstance(container, MySqlContainer)
    return _start(container)


def _scalar(container: DbContainer, statement: str, **params: object) -> object:
    """Run one statement (autocommit) on the container's database; return the first column of its first row."""
    engine = sqlalchemy.create_engine(container.get_connection_url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(statement), params).scalar()
    finally:
        engine.dispose()


def _run(container: DbContainer, statement: str) -> None:
    """Run one statement (autocommit) on the container's database, ignoring what it returns."""
    engine = sqlalchemy.create_engine(container.get_connection_url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(statement))
    finally:
        engine.dispose()


def server_version(container: DbContainer) -> str:
    """Return what ``SELECT version()`` returns on ``container``'s server."""
    return str(_scalar(container, "SELECT version()"))


def _flavour(container: DbContainer) -> str:
    """``"postgresql"``, ``"mysql"`` or ``"mariadb"``: which server runs in ``container``."""
    if isinstance(container, PostgresContainer):
        return "postgresql"
    return "mariadb" if "mariadb" in server_version(container).lower() else "mysql"


# Per server: statements that stop / restart applying what the replica has received.
_PAUSE = {
    "postgresql": ("SELECT pg_wal_replay_pause()", "SELECT pg_wal_replay_resume()"),
    "mysql": ("STOP REPLICA SQL_THREAD", "START REPLICA SQL_THREAD"),
    "mariadb": ("STOP SLAVE SQL_THREAD", "START SLAVE SQL_THREAD"),
}


def pause_replication(replica: DbContainer) -> None:
    """Stop applying changes on ``replica`` (it keeps receiving them): from now on it lags."""
    _run(replica, _PAUSE[_flavour(replica)][0])


def resume_replication(replica: DbContainer) -> None:
    """Apply changes on ``replica`` again (see :func:`wait_for_replica` to wait until it caught up)."""
    _run(replica, _PAUSE[_flavour(replica)][1])


def wait_for_replica(primary: DbContainer, replica: DbContainer, timeout: float = 60) -> None:
    """Wait until ``replica`` has applied everything committed on ``primary`` so far.

    PostgreSQL: replay reached the primary's current WAL insert position. MySQL: the primary's
    ``gtid_executed`` (``WAIT_FOR_EXECUTED_GTID_SET``). MariaDB: its ``gtid_binlog_pos``
    (``MASTER_GTID_WAIT``). Raises TimeoutError, with the replica's replication status, when
    it does not catch up in ``timeout`` seconds (e.g. while replication is paused).
    """
    flavour = _flavour(primary)
    if flavour == "postgresql":
        # The insert position: with synchronous_commit=off a commit returns before its WAL is written.
        lsn = _scalar(primary, "SELECT pg_current_wal_insert_lsn()::text")
        deadline = time.monotonic() + timeout
        while not _scalar(replica, "SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)", lsn=lsn):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not replay up to {lsn} in {timeout} s: {_replica_status(replica)}")
            time.sleep(0.05)
        return
    if flavour == "mysql":
        position = _scalar(primary, "SELECT @@GLOBAL.gtid_executed")
        waited = _scalar(replica, "SELECT WAIT_FOR_EXECUTED_GTID_SET(:pos, :t)", pos=position, t=timeout)
    else:
        position = _scalar(primary, "SELECT @@GLOBAL.gtid_binlog_pos")
        waited = _scalar(replica, "SELECT MASTER_GTID_WAIT(:pos, :t)", pos=position, t=timeout)
    if waited != 0:
        raise TimeoutError(f"the replica did not apply {position!r} in {timeout} s: {_replica_status(replica)}")


def _replica_status(replica: DbContainer) -> str:
    """A one-line summary of the replica's replication state, for error messages."""
    engine = sqlalchemy.create_engine(replica.get_connection_url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            if isinstance(replica, PostgresContainer):
                row = connection.execute(
                    sqlalchemy.text(
                        "SELECT pg_is_in_recovery(), pg_get_wal_replay_pause_state(), "
                        "(SELECT status FROM pg_stat_wal_receiver), pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()"
                    )
                ).one()
                return "in recovery {}, replay {}, receiver {}, received {}, replayed {}".format(*row)
            statement = "SHOW SLAVE STATUS" if _flavour(replica) == "mariadb" else "SHOW REPLICA STATUS"
            status = connection.execute(sqlalchemy.text(statement)).mappings().first()
            if status is None:
                return "no replication configured"
            keys = [k for k in status if re.search(r"Running$|Last_(IO|SQL)_Error$|Gtid", k)]
            return ", ".join(f"{k}={status[k]!r}" for k in keys)
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(status unavailable: {exc})"
    finally:
        engine.dispose()


def _is_our_image(image: str) -> bool:
    """Whether ``image`` was built by scripts/build-test-images.sh (its entrypoint knows MGB_REPLICATION)."""
    client = docker.from_env()
    try:
        return _RECIPE_LABEL in (client.images.get(image).labels or {})
    finally:
        client.close()


def start_primary_and_replica(backend_id: str) -> tuple[DbContainer, DbContainer, Network]:
    """Start a primary and a streaming replica of it for ``backend_id``; return (primary, replica, network).

    Both are containers of the backend's image (ours: official images do not read the
    ``MGB_REPLICATION`` variables) on a new user-defined Docker network, where the primary
    is reachable as ``primary``; both publish their port on the host like :func:`start_server`
    and have the same superuser/root password and database ``mgb``. PostgreSQL: a hot standby
    made by ``pg_basebackup -R``; MySQL: GTID auto-positioning; MariaDB: ``MASTER_USE_GTID=slave_pos``.
    The replica is read-only for ordinary users. Returns once the replica has applied a first
    write (table ``heartbeat`` in database ``mgb_replication`` on the primary). Clean up with
    :func:`stop_replication_pair`.
    """
    backend = server_backend(backend_id)
    image = image_for(backend_id)
    _require_local_image(image, backend.variable)
    if not _is_our_image(image):
        raise RuntimeError(
            f"{image!r} (${backend.variable}) is not one of the images scripts/build-test-images.sh builds: "
            "replication pairs need their MGB_REPLICATION support; unset the variable"
        )
    tag = f"mgb-repl-{backend_id}-{secrets.token_hex(4)}"
    password, replication_password = secrets.token_hex(12), secrets.token_hex(12)
    network = Network()
    network.name = tag
    network.create()
    primary: DbContainer | None = None
    replica: DbContainer | None = None
    try:
        primary = _container(backend_id, image, password, name=f"{tag}-primary")
        primary.with_network(network).with_network_aliases("primary")
        primary.with_env("MGB_REPLICATION", "primary").with_env("MGB_SERVER_ID", "1")
        primary.with_env("MGB_REPLICATION_PASSWORD", replication_password)
        _start(primary)
        replica = _container(backend_id, image, password, name=f"{tag}-replica")
        replica.with_network(network)
        replica.with_env("MGB_REPLICATION", "replica").with_env("MGB_SERVER_ID", "2")
        replica.with_env("MGB_REPLICATION_PASSWORD", replication_password)
        replica.with_env("MGB_PRIMARY_HOST", "primary").with_env("MGB_PRIMARY_PORT", str(primary.port))
        _start(replica)
        _first_write(primary, replica)
    except BaseException:
        stop_replication_pair(primary, replica, network)
        raise
    return primary, replica, network


def _first_write(primary: DbContainer, replica: DbContainer, timeout: float = 60) -> None:
    """Write a row on the primary and wait until the replica has it."""
    token = secrets.token_hex(8)
    if isinstance(primary, PostgresContainer):
        _execute_autocommit(_url_for(primary, "postgres"), "CREATE DATABASE mgb_replication")
        url = _url_for(primary, "mgb_replication")
        table = "heartbeat"
    else:
        _execute_autocommit(_url_for(primary, primary.dbname), "CREATE DATABASE mgb_replication")
        url = _url_for(primary, primary.dbname)
        table = "mgb_replication.heartbeat"
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, token VARCHAR(32))"))
            connection.execute(sqlalchemy.text(f"INSERT INTO {table} VALUES (1, :token)"), {"token": token})
    finally:
        engine.dispose()
    replica_url = _url_for(replica, "mgb_replication" if isinstance(replica, PostgresContainer) else replica.dbname)
    deadline = time.monotonic() + timeout
    while True:
        engine = sqlalchemy.create_engine(replica_url)
        try:
            with engine.connect() as connection:
                if connection.execute(sqlalchemy.text(f"SELECT token FROM {table}")).scalar() == token:
                    return
        except sqlalchemy.exc.DBAPIError:
            pass  # the database or table is not there yet
        finally:
            engine.dispose()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replica did not get a first write in {timeout} s: {_replica_status(replica)}")
        time.sleep(0.1)


def stop_replication_pair(primary: DbContainer | None, replica: DbContainer | None, network: Network | None) -> None:
    """Remove the containers and the network of :func:`start_primary_and_replica` (any may be None)."""
    errors: list[BaseException] = []
    for container in (replica, primary):
        if container is not None and container.get_wrapped_container() is not None:
            try:
                container.stop()
            except Exception as exc:  # noqa: BLE001 - the others are still removed
                errors.append(exc)
    if network is not None:
        try:
            network.remove()
        except NotFound:
            pass
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    if errors:
        raise errors[0]


def _check_name(name: str) -> str:
    """Return ``name`` if it is a plain identifier (no quoting needed); else raise."""
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
    return name


def _url_for(container: DbContainer, database: str) -> str:
    """Return the container's SQLAlchemy URL (password included) for ``database``."""
    url = sqlalchemy.make_url(container.get_connection_url()).set(database=database)
    return url.render_as_string(hide_password=False)


def _execute_autocommit(url: str, statement: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(statement))
    finally:
        engine.dispose()


def new_postgres_database(container: PostgresContainer, name: str) -> str:
    """Create an empty database ``name`` on ``container``; return its SQLAlchemy URL.

    The URL is ``postgresql+psycopg://...`` for the container's superuser.
    """
    _check_name(name)
    _execute_autocommit(_url_for(container, "postgres"), f'CREATE DATABASE "{name}"')
    return _url_for(container, name)


def drop_postgres_database(container: PostgresContainer, name: str) -> None:
    """Drop database ``name`` from ``container`` if it exists, closing its sessions."""
    _check_name(name)
    _execute_autocommit(_url_for(container, "postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_mysql_database(container: MySqlContainer, name: str) -> str:
    """Create an empty database ``name`` on ``container``; return its SQLAlchemy URL.

    The database gets utf8mb4 with that character set's default collation
    (case-insensitive: utf8mb4_general_ci on MariaDB, utf8mb4_0900_ai_ci on MySQL 8),
    as a server with default settings gives it. The URL is ``mysql+pymysql://root:...``.
    """
    _check_name(name)
    _execute_autocommit(_url_for(container, container.dbname), f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    return _url_for(container, name)


def drop_mysql_database(container: MySqlContainer, name: str) -> None:
    """Drop database ``name`` from ``container`` if it exists.

    Dispose of the engines connected to it first: open sessions holding metadata locks
    on its tables would make the drop wait.
    """
    _check_name(name)
    _execute_autocommit(_url_for(container, container.dbname), f"DROP DATABASE IF EXISTS `{name}`")


@dataclass
class SharedContainer:
    """A server container another pytest process started (the controller of ``pytest -n``), as the tests use
    one: its Docker container (pause, restart, exec) and the superuser's name and password."""

    container_id: str
    username: str
    password: str

    @property
    def root_password(self) -> str:
        return self.password

    def get_wrapped_container(self):  # type: ignore[no-untyped-def]
        return docker.from_env().containers.get(self.container_id)


def run_sql_in_container(container: DbContainer | SharedContainer, dialect: str, database: str, sql_text: str) -> None:
    """Run the SQL script ``sql_text`` on ``database`` with the server's own client.

    ``dialect`` is ``"postgresql"`` (runs ``psql``, stopping at the first error) or
    ``"mysql"`` / ``"mariadb"`` (runs ``mariadb``, or ``mysql`` where only that exists,
    as root), or any server backend id (``postgresql-18``, ``mariadb-11``, ...). The
    script is fed to the client's standard input through ``docker exec -i``. Raises
    RuntimeError with the client's output if it fails.
    """
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise RuntimeError(f"no docker client on PATH: {_SETUP_HINT}")
    wrapped = container.get_wrapped_container()
    if wrapped is None:
        raise RuntimeError("the container has not been started")
    family = SERVER_BACKENDS[dialect].family if dialect in SERVER_BACKENDS else dialect
    if family.startswith("postgres") and isinstance(container, PostgresContainer | SharedContainer):
        env = f"PGPASSWORD={container.password}"
        client = ["psql", "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"]
        client += [f"--username={container.username}", f"--dbname={database}"]
    elif family in ("mysql", "mariadb") and isinstance(container, MySqlContainer | SharedContainer):
        # MYSQL_PWD keeps the password off the command line; the official mysql images
        # have no `mariadb` command, hence the fallback to `mysql`.
        env = f"MYSQL_PWD={container.root_password}"
        find_client = 'exec "$(command -v mariadb || command -v mysql)" "$@"'
        client = ["sh", "-c", find_client, "sh", "--user=root", f"--database={database}"]
    else:
        raise ValueError(f"dialect {dialect!r} does not fit {type(container).__name__}")
    result = subprocess.run(
        [docker_cli, "exec", "-i", "-e", env, wrapped.id, *client],
        input=sql_text,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip()
        raise RuntimeError(f"SQL script on {dialect} database {database!r} failed (exit {result.returncode}): {output}")


# ---------------------------------------------------------------- PgBouncer in front of a PostgreSQL container

PGBOUNCER_VARIABLE = "MGB_PGBOUNCER_IMAGE"
PGBOUNCER_DEFAULT_IMAGE = "mlflow-gateway-backfill/pgbouncer:1.18"
POOL_MODES = ("session", "transaction", "statement")
# default_pool_size per pool mode: server connections per (database, user).
# Transaction and statement pooling hand a server connection to a client for one transaction (statement)
# only, so four are shared by every client of a test (the test's own engines, one or two runners and their
# heartbeats): enough that no transaction ever waits for a server connection held by a client that is itself
# waiting for one (no test opens more than three transactions at once on one database), few enough that
# consecutive clients land on the same server connections (a prepared statement left behind is met again).
# Session pooling ties a server connection to a client for the client's whole life; the tests' SQLAlchemy
# pools keep idle clients connected, so the pool must cover every client of a test at once (about a dozen at
# most) or a test would wait for a connection its own process holds. Server connections are still shared,
# one client after another (PgBouncer resets each with DISCARD ALL in between).
POOL_SIZES = {"session": 20, "transaction": 4, "statement": 4}
# The role that may read password hashes (through a SECURITY DEFINER function), and that function: PgBouncer's
# documented auth_query setup, as managed poolers and Kubernetes operators do it.
_LOOKUP_ROLE = "pgbouncer_lookup"
_AUTH_QUERY = "SELECT uname, phash FROM pgbouncer.user_lookup($1)"
_LOOKUP_FUNCTION = f"""
CREATE SCHEMA IF NOT EXISTS pgbouncer;
CREATE OR REPLACE FUNCTION pgbouncer.user_lookup(i_username text, OUT uname text, OUT phash text)
RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
$$ SELECT usename::text, passwd::text FROM pg_catalog.pg_shadow WHERE usename = i_username $$;
REVOKE ALL ON FUNCTION pgbouncer.user_lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbouncer TO {_LOOKUP_ROLE};
GRANT EXECUTE ON FUNCTION pgbouncer.user_lookup(text) TO {_LOOKUP_ROLE};
"""
_NETWORK_PREFIX = "mgb-pgb-"
_network_lock = threading.Lock()  # one network per server, whichever of this process's threads asks first
_UPSTREAM_ALIAS = "postgres"


def pgbouncer_image() -> str:
    """Return PgBouncer's image: ``$MGB_PGBOUNCER_IMAGE``, or ours."""
    return os.environ.get(PGBOUNCER_VARIABLE) or PGBOUNCER_DEFAULT_IMAGE


def prepare_for_poolers(admin_url: str) -> None:
    """Make the PostgreSQL server at ``admin_url`` (a superuser's URL) ready for :func:`start_pgbouncer`.

    Creates the lookup role and, in ``template1`` and every database that exists now, the function that
    ``auth_query`` calls (with a wildcard database entry PgBouncer 1.18 runs auth_query in the database the
    client asked for, so every database needs it; later ones get it from template1). Idempotent.
    """
    url = sqlalchemy.make_url(admin_url)
    _execute_autocommit(
        url.set(database="postgres").render_as_string(hide_password=False),
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{_LOOKUP_ROLE}') "
        f"THEN CREATE ROLE {_LOOKUP_ROLE} NOLOGIN; END IF; END $$",
    )
    databases = _execute_query(
        url.set(database="postgres").render_as_string(hide_password=False),
        "SELECT datname FROM pg_database WHERE datallowconn",
    )
    for database in databases:
        engine = sqlalchemy.create_engine(url.set(database=database), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(_LOOKUP_FUNCTION)
        finally:
            engine.dispose()


# The pooler backends' server speaks TLS, as managed databases do, with the snake-oil certificate Debian's
# ssl-cert package made when the image's root was built (the postgres user is in group ssl-cert): PgBouncer's
# server connections use it (its server_tls_sslmode is prefer), and the tests of the TLS options' messages
# (a missing root certificate or client key) need a server that answers TLS at all.
# max_connections 400 (the image's 200): the poolers keep idle server connections to each test database for
# up to two minutes (images/pgbouncer-entrypoint.sh).
_POOLED_SERVER_OPTIONS = (
    "-c ssl=on -c ssl_cert_file=/etc/ssl/certs/ssl-cert-snakeoil.pem "
    "-c ssl_key_file=/etc/ssl/private/ssl-cert-snakeoil.key -c max_connections=400"
)


def start_pooled_postgres(*, name: str | None = None) -> PostgresContainer:
    """Start a PostgreSQL server of the ``postgresql`` backend's image, with TLS on (and room for the
    poolers' idle connections), made ready for
    :func:`start_pgbouncer` (:func:`prepare_for_poolers`); return its container."""
    image = image_for("postgresql")
    _require_local_image(image, server_backend("postgresql").variable)
    container = _container("postgresql", image, secrets.token_hex(12), name)
    assert isinstance(container, PostgresContainer)
    container.with_command(_POOLED_SERVER_OPTIONS)
    _start(container)
    try:
        url = sqlalchemy.make_url(container.get_connection_url()).set(database="postgres")
        prepare_for_poolers(url.render_as_string(hide_password=False))
    except BaseException:
        container.stop()
        raise
    return container


def _execute_query(url: str, statement: str) -> list[str]:
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            return [str(row[0]) for row in connection.execute(sqlalchemy.text(statement))]
    finally:
        engine.dispose()


def _pooler_network(postgres_container_id: str) -> str:
    """The user-defined network on which the PostgreSQL container is reachable as ``postgres``: the one made
    for it before (by this process or another), else a new one it is attached to now (it keeps its port)."""
    with _network_lock:
        client = docker.from_env()
        try:
            container = client.containers.get(postgres_container_id)
            for name in container.attrs["NetworkSettings"]["Networks"]:
                if name.startswith(_NETWORK_PREFIX):
                    return str(name)
            name = _NETWORK_PREFIX + container.id[:12]
            network = client.networks.create(name)
            network.connect(container, aliases=[_UPSTREAM_ALIAS])
            return name
        finally:
            client.close()


def pooler_subnet(postgres_container_id: str) -> str:
    """The subnet of the network of :func:`_pooler_network`: the server connections of its poolers come from it."""
    client = docker.from_env()
    try:
        network = client.networks.get(_pooler_network(postgres_container_id))
        return str(network.attrs["IPAM"]["Config"][0]["Subnet"])
    finally:
        client.close()


def remove_pooler_network(postgres_container_id: str) -> None:
    """Remove the network of :func:`_pooler_network` (after the PgBouncers on it and the server are gone)."""
    client = docker.from_env()
    try:
        for network in client.networks.list(names=[_NETWORK_PREFIX + postgres_container_id[:12]]):
            network.remove()
    except NotFound:
        pass
    finally:
        client.close()


@dataclass
class PgBouncer:
    """A running PgBouncer in front of one PostgreSQL server: its container, pool mode and published port."""

    container: DockerContainer
    pool_mode: str
    pool_size: int
    host: str
    port: int
    version: str  # what its admin console says (SHOW VERSION), e.g. "PgBouncer 1.18.0"

    def url(self, direct_url: str) -> str:
        """``direct_url`` (any user, password and database of the server) through this pooler."""
        url = sqlalchemy.make_url(direct_url).set(host=self.host, port=self.port)
        return url.render_as_string(hide_password=False)

    def stop(self) -> None:
        self.container.stop()


def start_pgbouncer(
    postgres_container_id: str, admin_url: str, pool_mode: str, *, name: str | None = None
) -> PgBouncer:
    """Start a PgBouncer in ``pool_mode`` in front of the running PostgreSQL container, and return it once a
    login through it works (as the superuser of ``admin_url``: a real SCRAM pass-through login).

    The server must have been through :func:`prepare_for_poolers`. The pooler gets a lookup role of its own
    (a member of the lookup role), port 6432 published on a fixed free host port, every database of the
    server, and :data:`POOL_SIZES` server connections per database and user. ``name`` names the container.
    """
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool mode {pool_mode!r}: choose from {POOL_MODES}")
    image = pgbouncer_image()
    _require_local_image(image, PGBOUNCER_VARIABLE)
    network = _pooler_network(postgres_container_id)
    auth_user, auth_password = f"pgb_{secrets.token_hex(4)}", secrets.token_hex(12)
    _execute_autocommit(
        sqlalchemy.make_url(admin_url).set(database="postgres").render_as_string(hide_password=False),
        f"CREATE ROLE {auth_user} LOGIN PASSWORD '{auth_password}' IN ROLE {_LOOKUP_ROLE}",
    )
    container = DockerContainer(image, name=name).with_kwargs(network=network)
    container.with_envs(
        MGB_PGBOUNCER_UPSTREAM_HOST=_UPSTREAM_ALIAS,
        MGB_PGBOUNCER_UPSTREAM_PORT="5432",
        MGB_PGBOUNCER_POOL_MODE=pool_mode,
        MGB_PGBOUNCER_POOL_SIZE=str(POOL_SIZES[pool_mode]),
        MGB_PGBOUNCER_AUTH_USER=auth_user,
        MGB_PGBOUNCER_AUTH_PASSWORD=auth_password,
        MGB_PGBOUNCER_AUTH_QUERY=_AUTH_QUERY,
    )
    container.with_bind_ports(6432, _free_port())
    try:
        container.start()
        host, port = container.get_container_host_ip(), int(container.get_exposed_port(6432))
        probe = sqlalchemy.make_url(admin_url).set(host=host, port=port, database="postgres")
        _wait_for_login(container, probe)
        version = _pgbouncer_version(host, port, auth_user, auth_password)
    except BaseException:
        if container.get_wrapped_container() is not None:
            container.stop()
        raise
    return PgBouncer(container, pool_mode, POOL_SIZES[pool_mode], host, port, version)


def psycopg_connect(url: sqlalchemy.URL, **options: object) -> psycopg.Connection:
    """A plain psycopg connection to ``url`` that any pool mode takes: autocommit (one statement, no
    transaction: statement pooling too) and no server-side prepared statements."""
    import psycopg

    return psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=True,
        prepare_threshold=None,
        **options,  # type: ignore[arg-type]
    )


def _wait_for_login(container: DockerContainer, url: sqlalchemy.URL, timeout: float = 60) -> None:
    """Wait until ``url`` (through the pooler) logs in and answers; raise with the pooler's log if it never does."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg_connect(url, connect_timeout=2) as connection:
                connection.execute("SELECT 1")
                return
        except psycopg.Error as exc:
            if time.monotonic() > deadline:
                logs = b"".join(container.get_logs()).decode(errors="replace")[-2000:]
                raise RuntimeError(f"no login through PgBouncer in {timeout} s ({exc}); its log:\n{logs}") from None
            time.sleep(0.2)


def _pgbouncer_version(host: str, port: int, user: str, password: str) -> str:
    """``SHOW VERSION`` on PgBouncer's admin console (which speaks the simple query protocol only)."""
    import psycopg

    with psycopg.connect(
        host=host, port=port, user=user, password=password, dbname="pgbouncer", autocommit=True
    ) as connection:
        row = psycopg.ClientCursor(connection).execute("SHOW VERSION").fetchone()
    return str(row[0]) if row else "PgBouncer (version unknown)"
