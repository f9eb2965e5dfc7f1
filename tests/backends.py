"""Real PostgreSQL and MySQL-family servers for the tests, in local Docker containers.

The images are never pulled (no registry is reachable on the project's machines):
they must exist locally. By default they are the stand-ins that
``scripts/build-test-images.sh`` builds (PostgreSQL 15 and MariaDB 10.11 from Debian
packages); ``MGB_POSTGRES_IMAGE`` and ``MGB_MYSQL_IMAGE`` select others (e.g.
``postgres:16``, ``mysql:8.4`` on a host that could pull them). The unmodified
testcontainers classes start them.

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
from pathlib import Path
from typing import TypeVar

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
from docker.errors import DockerException, ImageNotFound
from testcontainers.community.mysql import MySqlContainer
from testcontainers.community.postgres import PostgresContainer

DEFAULT_POSTGRES_IMAGE = "mlflow-gateway-backfill/postgres:15"
DEFAULT_MYSQL_IMAGE = "mlflow-gateway-backfill/mariadb:10.11"

DbContainer = PostgresContainer | MySqlContainer
_C = TypeVar("_C", PostgresContainer, MySqlContainer)

_SETUP_HINT = (
    "run `make test`, or scripts/ensure-docker.sh then scripts/build-test-images.sh "
    "(they start a Docker engine and build the images offline)"
)
_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def postgres_image() -> str:
    """Return the PostgreSQL image: ``$MGB_POSTGRES_IMAGE`` or our own default."""
    return os.environ.get("MGB_POSTGRES_IMAGE") or DEFAULT_POSTGRES_IMAGE


def mysql_image() -> str:
    """Return the MySQL-family image: ``$MGB_MYSQL_IMAGE`` or our own default."""
    return os.environ.get("MGB_MYSQL_IMAGE") or DEFAULT_MYSQL_IMAGE


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


def start_postgres() -> PostgresContainer:
    """Start a PostgreSQL container (superuser and database ``mgb``) and return it."""
    image = postgres_image()
    _require_local_image(image, "MGB_POSTGRES_IMAGE")
    container = PostgresContainer(image, username="mgb", password=secrets.token_hex(12), dbname="mgb", driver="psycopg")
    return _start(container)


def start_mysql() -> MySqlContainer:
    """Start a MySQL-family container and return it.

    The tests connect as ``root`` (MySqlContainer then sets only
    ``MYSQL_ROOT_PASSWORD`` and ``MYSQL_DATABASE``, and its URL uses root), so they can
    create users and databases.
    """
    image = mysql_image()
    _require_local_image(image, "MGB_MYSQL_IMAGE")
    container = MySqlContainer(image, username="root", password=secrets.token_hex(12), dbname="mgb", dialect="pymysql")
    return _start(container)


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


def run_sql_in_container(container: DbContainer, dialect: str, database: str, sql_text: str) -> None:
    """Run the SQL script ``sql_text`` on ``database`` with the server's own client.

    ``dialect`` is ``"postgresql"`` (runs ``psql``, stopping at the first error) or
    ``"mysql"`` / ``"mariadb"`` (runs ``mariadb``, or ``mysql`` where only that exists,
    as root). The script is fed to the client's standard input through
    ``docker exec -i``. Raises RuntimeError with the client's output if it fails.
    """
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise RuntimeError(f"no docker client on PATH: {_SETUP_HINT}")
    wrapped = container.get_wrapped_container()
    if wrapped is None:
        raise RuntimeError("the container has not been started")
    if dialect.startswith("postgres") and isinstance(container, PostgresContainer):
        env = f"PGPASSWORD={container.password}"
        client = ["psql", "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"]
        client += [f"--username={container.username}", f"--dbname={database}"]
    elif dialect in ("mysql", "mariadb") and isinstance(container, MySqlContainer):
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
