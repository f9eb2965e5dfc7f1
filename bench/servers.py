"""Where benchmark databases live: a work directory (SQLite) or a PostgreSQL / MariaDB container.

Containers are started through tests/backends.py (offline images, never pulled) and always stopped by
:func:`servers` on the way out, also on an error or Ctrl-C. Every database the benchmark makes is its own
(``bench_*``), so nothing else on a server is touched.

Fresh copies of a seeded database: a file copy on SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL
(a file-level copy). MariaDB has no template databases; there a copy is the same set-based seed replayed
into a new database whose MLflow schema is copied from a template (see :meth:`Server.clone`).
"""

from __future__ import annotations

import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import seed

BACKENDS = ("sqlite", "postgresql", "mysql")


class Server:
    """Makes, copies and drops bench databases on one backend."""

    def __init__(self, backend: str, workdir: Path, admin_url: str | None = None, container: Any = None) -> None:
        self.backend = backend
        self.workdir = workdir
        self.admin_url = admin_url
        self.container = container
        self.created: list[str] = []
        self.schema_template: str | None = None
        self.seeded: dict[str, int] = {}  # database name -> experiments, for MariaDB's replayed copies

    # -- naming

    def url_for(self, name: str) -> str:
        if self.backend == "sqlite":
            return f"sqlite:///{self.workdir / (name + '.db')}"
        assert self.admin_url is not None
        return sa.make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def _admin(self, statement: str) -> None:
        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(statement))
        finally:
            engine.dispose()

    # -- databases

    def new_database(self, label: str) -> str:
        """An empty database named ``bench_<label>_<random>``; returns its name."""
        name = f"bench_{label}_{uuid.uuid4().hex[:6]}"
        if self.backend == "postgresql":
            self._admin(f'CREATE DATABASE "{name}"')
        elif self.backend == "mysql":
            self._admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
            sa.create_engine(self.url_for(name)).connect().close()
        self.created.append(name)
        return name

    def seeded_database(self, n: int) -> tuple[str, float]:
        """A database with MLflow's schema and ``n`` seeded experiments; returns (name, seed seconds)."""
        if self.schema_template is None:
            self.schema_template = self.new_database("schema")
            from tests.mlflow_data import mlflow_store

            mlflow_store(self.url_for(self.schema_template)).engine.dispose()
        name = self._copy(self.schema_template, f"seed{n}")
        seconds = seed.seed(self.url_for(name), n, create_schema=False)
        self.seeded[name] = n
        return name, seconds

    def clone(self, source: str, label: str) -> str:
        """A fresh, identical copy of seeded database ``source`` (nobody may be connected to it)."""
        if self.backend == "mysql":
            name = self._copy(self.schema_template or source, label)
            seed.seed(self.url_for(name), self.seeded[source], create_schema=False)
            return name
        name = self._copy(source, label)
        if self.backend == "postgresql":
            # A copy has the template's statistics and visibility map; ANALYZE is cheap and keeps plans equal.
            seed.analyze(sa.create_engine(self.url_for(name), poolclass=sa.NullPool))
        return name

    def _copy(self, source: str, label: str) -> str:
        name = f"bench_{label}_{uuid.uuid4().hex[:6]}"
        if self.backend == "sqlite":
            shutil.copyfile(self.workdir / f"{source}.db", self.workdir / f"{name}.db")
        elif self.backend == "postgresql":
            self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        else:
            self._copy_mysql_schema(source, name)
        self.created.append(name)
        return name

    def _copy_mysql_schema(self, source: str, target: str) -> None:
        """Replay SHOW CREATE TABLE (foreign keys included) and the small tables' rows (MLflow's Default...)."""
        engine = sa.create_engine(self.url_for(source), poolclass=sa.NullPool)
        with engine.connect() as conn:
            tables = [r[0] for r in conn.execute(sa.text("SHOW FULL TABLES WHERE Table_type = 'BASE TABLE'"))]
            ddl = [conn.execute(sa.text(f"SHOW CREATE TABLE `{t}`")).one()[1] for t in tables]
        self._admin(f"CREATE DATABASE `{target}` CHARACTER SET utf8mb4")
        engine = sa.create_engine(self.url_for(target), poolclass=sa.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text("SET FOREIGN_KEY_CHECKS = 0"))
            conn.execute(sa.text("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_AUTO_VALUE_ON_ZERO')"))
            for statement in ddl:
                conn.execute(sa.text(statement.replace(":", r"\:")))
            for t in tables:  # schema-only source: only MLflow's own rows (Default experiment, alembic_version)
                conn.execute(sa.text(f"INSERT INTO `{t}` SELECT * FROM `{source}`.`{t}`"))

    def settle(self, timeout: float = 60.0) -> None:
        """Write out what seeding left dirty, so the measurement that follows does not share the disk with it.

        PostgreSQL: CHECKPOINT. MariaDB: flush the buffer pool's dirty pages (its page cleaner would otherwise
        write a fresh copy's ~0.5 GB during the measurement). SQLite: nothing is deferred.
        """
        if self.backend == "postgresql":
            self._admin("CHECKPOINT")
        elif self.backend == "mysql":
            engine = sa.create_engine(self.admin_url, poolclass=sa.NullPool)
            with engine.connect() as conn:
                names = ("innodb_max_dirty_pages_pct", "innodb_io_capacity_max", "innodb_io_capacity")
                saved = conn.execute(sa.text("SELECT " + ", ".join(f"@@{n}" for n in names))).one()
                # The default io_capacity (200 pages/s) would take minutes over a fresh 1M-experiment copy.
                for name, value in zip(names, (0, 40000, 20000), strict=True):
                    conn.execute(sa.text(f"SET GLOBAL {name} = {value}"))
                deadline = time.monotonic() + timeout
                dirty = "SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'"
                while int(conn.execute(sa.text(dirty)).one()[1]) > 100 and time.monotonic() < deadline:
                    time.sleep(0.2)
                for name, value in reversed(list(zip(names, saved, strict=True))):
                    conn.execute(sa.text(f"SET GLOBAL {name} = {value}"))

    def drop(self, name: str) -> None:
        if self.backend == "postgresql":
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        elif self.backend == "mysql":
            self._admin(f"DROP DATABASE IF EXISTS `{name}`")
        else:
            (self.workdir / f"{name}.db").unlink(missing_ok=True)
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            self.drop(name)

    def describe(self) -> str:
        """Server version, for the results' machine info."""
        if self.backend == "sqlite":
            import sqlite3

            return f"SQLite {sqlite3.sqlite_version}"
        engine = sa.create_engine(self.admin_url, poolclass=sa.NullPool)
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT VERSION()")).scalar())


def _start(backend: str, workdir: Path) -> Server:
    if backend == "sqlite":
        return Server(backend, workdir)
    from tests import backends

    container = backends.start_postgres() if backend == "postgresql" else backends.start_mysql()
    url = sa.make_url(container.get_connection_url())
    url = url.set(drivername="postgresql+psycopg", database="postgres") if backend == "postgresql" else url
    server = Server(backend, workdir, url.render_as_string(hide_password=False), container)
    if backend == "mysql":
        # InnoDB reads with O_DIRECT: its buffer pool is the only cache. The image's 128 MB default would make
        # 1M experiments (~0.6 GB per database) a disk benchmark; a production server sizes it to its data.
        # 4 GB holds the seeded source and the copy being measured.
        server._admin("SET GLOBAL innodb_buffer_pool_size = 4294967296")
    return server


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` blocks stop the containers."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def servers(backends: list[str], workdir: Path) -> Iterator[dict[str, Server]]:
    """Start the requested backends; on the way out drop their bench databases and stop the containers."""
    _terminate_on_sigterm()
    with ExitStack() as stack:
        started: dict[str, Server] = {}
        for backend in backends:
            server = _start(backend, workdir)
            stack.callback(_stop, server)
            started[backend] = server
        yield started


def _stop(server: Server) -> None:
    try:
        if server.container is None:
            server.drop_all()
    finally:
        if server.container is not None:
            server.container.stop()  # removes the container and its data with it
