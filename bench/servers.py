"""Where benchmark databases live: a work directory (SQLite) or a server container per backend.

The backends are the tests' (``tests/backends.py``: the same ids, the same offline images, never pulled):
SQLite, PostgreSQL 15 and 18, Oracle MySQL 9.7, MariaDB 10.11 and 11.8. The containers (named
``mgb-bench-<backend>-<random>``) are started side by side up front and each is removed as soon as its
backend is done, also on an error or Ctrl-C. Every database the benchmark makes is its own (``bench_*``).

A measurement gets a database in the state of the seeded source (:meth:`Server.fresh`):

* SQLite: a copy of the file; PostgreSQL: ``CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY`` (a file
  copy, planner statistics included, in well under a second at 1M experiments).
* MySQL family: the source itself, *reset*: the isGateway rows the seed did not write and the experiments
  the load created are deleted, the project's tables dropped, InnoDB's purge waited for, and the
  statistics taken again as the seed took them. InnoDB has no template databases: a replayed seed takes
  40 s (MariaDB) to 70 s (MySQL 9.7) at 1M experiments and a transportable-tablespace copy 3 s (MariaDB)
  to 13 s (MySQL 9.7, which rewrites every page on import), against 2 to 3 s for the reset.

Before it is measured, every database is settled (nothing left for the server to write out) and warmed by
the same reads.
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backfill.sql import IS_GATEWAY_KEY, LEDGER_TABLE, LOCK_TABLE, RUNS_TABLE, TRUE
from bench import measure, seed

BACKENDS = ("sqlite", "postgresql", "postgresql-18", "mysql", "mariadb", "mariadb-11")


class Server:
    """Makes, resets, copies and drops bench databases on one backend."""

    def __init__(self, backend: str, workdir: Path, admin_url: str | None = None, container: Any = None) -> None:
        self.backend = backend
        self.workdir = workdir
        self.admin_url = admin_url
        self.container = container
        self.family = "sqlite" if admin_url is None else "postgresql" if admin_url.startswith("postgresql") else "mysql"
        self.created: list[str] = []
        self.shapes: dict[str, tuple[int, str]] = {}  # source database -> (experiments, shape)

    def url_for(self, name: str) -> str:
        if self.family == "sqlite":
            return f"sqlite:///{self.workdir / (name + '.db')}"
        assert self.admin_url is not None
        return sa.make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def _admin(self, statement: str) -> None:
        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text(statement))

    def _name(self, label: str) -> str:
        return f"bench_{re.sub(r'[^a-z0-9]', '', label.lower())}_{secrets.token_hex(3)}"

    def _create(self, name: str) -> None:
        if self.family == "postgresql":
            self._admin(f'CREATE DATABASE "{name}"')
        elif self.family == "mysql":
            self._admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
            sa.create_engine(self.url_for(name), poolclass=sa.NullPool).connect().close()
        self.created.append(name)

    # -- sources

    def seeded(self, n: int, shape: str, previous: str | None = None) -> tuple[str, float]:
        """A database of ``n`` experiments of ``shape``; returns (name, seconds). ``previous``: the source of
        the shape before, which the ``mixed`` shape is made from (its newer half tagged, then analyzed) instead
        of seeding again; on the MySQL family that source itself becomes the new one."""
        t0 = time.monotonic()
        if previous is None:
            name = self._name(f"src{n}")
            self._create(name)
            from tests.mlflow_data import mlflow_store

            mlflow_store(self.url_for(name)).engine.dispose()
            seed.seed(self.url_for(name), n, shape, create_schema=False)
        else:
            if self.family == "mysql":
                self.reset(previous)
                name = previous
            else:
                name = self._copy(previous, f"src{n}{shape}")
            self._tag_newer_half(name, n, shape)
        self.shapes[name] = (n, shape)
        return name, time.monotonic() - t0

    def _tag_newer_half(self, name: str, n: int, shape: str) -> None:
        k = "`key`" if self.family == "mysql" else "key"
        engine = sa.create_engine(self.url_for(name), poolclass=sa.NullPool)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"INSERT INTO experiment_tags ({k}, value, experiment_id) SELECT :isgw, :tv, experiment_id"
                    f" FROM experiments WHERE experiment_id % 10 = 0 AND experiment_id > :lo AND experiment_id <= :n"
                ),
                {"isgw": IS_GATEWAY_KEY, "tv": TRUE, "lo": seed.tagged_from(n, shape), "n": n},
            )
        seed.analyze(engine)

    # -- fresh databases

    def fresh(self, source: str, label: str) -> str:
        """A database in the state of ``source``, settled and warmed; give it back with :meth:`release`."""
        if self.family == "mysql":
            self.reset(source)
            name = source
        else:
            name = self._copy(source, label)
        self.settle()
        measure.warm(self.url_for(name))
        return name

    def release(self, name: str) -> None:
        """Done with a database from :meth:`fresh` (a copy is dropped; a reset source stays)."""
        if name not in self.shapes:
            self.drop(name)

    def _copy(self, source: str, label: str) -> str:
        name = self._name(label)
        if self.family == "sqlite":
            shutil.copyfile(self.workdir / f"{source}.db", self.workdir / f"{name}.db")
        else:
            self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{source}" STRATEGY FILE_COPY')
        self.created.append(name)
        return name

    def reset(self, name: str) -> None:
        """MySQL family: bring ``name`` back to its seeded state (see the module docstring)."""
        n, shape = self.shapes[name]
        engine = sa.create_engine(self.url_for(name), poolclass=sa.NullPool)
        with engine.begin() as conn:
            binds = {"isgw": IS_GATEWAY_KEY, "lo": seed.tagged_from(n, shape), "n": n}
            conn.execute(sa.text("DELETE FROM experiment_tags WHERE `key` = :isgw AND experiment_id <= :lo"), binds)
            conn.execute(sa.text("DELETE FROM experiment_tags WHERE experiment_id > :n"), binds)
            conn.execute(sa.text("DELETE FROM experiments WHERE experiment_id > :n"), binds)
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {LEDGER_TABLE}, {RUNS_TABLE}, {LOCK_TABLE}"))
        self._wait_for_purge()
        seed.analyze(engine)

    def _wait_for_purge(self, timeout: float = 60.0) -> None:
        """InnoDB removes deleted rows in the background: wait until its purge has been idle for three polls
        in a row (neither its history list length nor the transaction counters tell: MySQL 9.7 keeps purged
        undo logs listed, and hands out transaction ids that purge never sees)."""
        engine = sa.create_engine(self.admin_url, poolclass=sa.NullPool)
        deadline = time.monotonic() + timeout
        idle = 0
        with engine.connect() as conn:
            while idle < 3:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.backend}: InnoDB's purge still busy after {timeout:g} s")
                time.sleep(0.1)
                status = conn.execute(sa.text("SHOW ENGINE INNODB STATUS")).one()[2]
                line = re.search(r"Purge done for trx's.*", status)
                idle = idle + 1 if line is None or "idle" in line.group(0) else 0

    def settle(self, timeout: float = 60.0) -> None:
        """Write out what seeding or resetting left dirty, so the measurement that follows does not share
        the disk with it. PostgreSQL: CHECKPOINT. MySQL family: flush the buffer pool's dirty pages (its page
        cleaner would otherwise write them during the measurement). SQLite: nothing is deferred."""
        if self.family == "postgresql":
            self._admin("CHECKPOINT")
        elif self.family == "mysql":
            engine = sa.create_engine(self.admin_url, poolclass=sa.NullPool)
            with engine.connect() as conn:
                names = ("innodb_max_dirty_pages_pct", "innodb_io_capacity_max", "innodb_io_capacity")
                saved = conn.execute(sa.text("SELECT " + ", ".join(f"@@{n}" for n in names))).one()
                # The default io_capacity (200 pages/s) would take minutes over 1M experiments' pages.
                for name, value in zip(names, (0, 40000, 20000), strict=True):
                    conn.execute(sa.text(f"SET GLOBAL {name} = {value}"))
                deadline = time.monotonic() + timeout
                dirty = "SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'"
                while int(conn.execute(sa.text(dirty)).one()[1]) > 100 and time.monotonic() < deadline:
                    time.sleep(0.2)
                for name, value in reversed(list(zip(names, saved, strict=True))):
                    conn.execute(sa.text(f"SET GLOBAL {name} = {value}"))

    def drop(self, name: str) -> None:
        if self.family == "postgresql":
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        elif self.family == "mysql":
            self._admin(f"DROP DATABASE IF EXISTS `{name}`")
        else:
            for path in self.workdir.glob(f"{name}.db*"):  # its -wal, -journal, the tool's lock file
                path.unlink(missing_ok=True)
        if name in self.created:
            self.created.remove(name)
        self.shapes.pop(name, None)

    def drop_all(self) -> None:
        for name in list(self.created):
            self.drop(name)

    def describe(self) -> str:
        """Server version, for the results' machine info."""
        if self.family == "sqlite":
            import sqlite3

            return f"SQLite {sqlite3.sqlite_version}"
        engine = sa.create_engine(self.admin_url, poolclass=sa.NullPool)
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT VERSION()")).scalar())


def _start(backend: str, workdir: Path) -> Server:
    if backend == "sqlite":
        return Server(backend, workdir)
    from tests import backends

    container = backends.start_server(backend, name=f"mgb-bench-{backend}-{secrets.token_hex(3)}")
    try:
        url = sa.make_url(container.get_connection_url())
        if backends.server_backend(backend).family == "postgresql":
            url = url.set(drivername="postgresql+psycopg", database="postgres")
        server = Server(backend, workdir, url.render_as_string(hide_password=False), container)
        if server.family == "mysql":
            # InnoDB reads with O_DIRECT: its buffer pool is the only cache. The image's 128 MB default would
            # make 1M experiments (0.6 to 1.2 GB) a disk benchmark; a production server sizes it to its data.
            server._admin("SET GLOBAL innodb_buffer_pool_size = 4294967296")
        return server
    except BaseException:
        container.stop()
        raise


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` blocks remove the containers."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def servers(backends: list[str], workdir: Path) -> Iterator[dict[str, Server]]:
    """Start the requested backends side by side; on the way out drop their bench databases and remove the
    containers that are still there (:func:`stop` removes one earlier)."""
    _terminate_on_sigterm()
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=len(backends)) as pool:
        futures = {backend: pool.submit(_start, backend, workdir) for backend in backends}
        started: dict[str, Server] = {}
        try:
            for backend, future in futures.items():
                started[backend] = future.result()
                stack.callback(stop, started[backend])
        except BaseException:
            for future in futures.values():  # the others, once started, are removed too
                if not future.cancel() and future.exception() is None and future.result() not in started.values():
                    stop(future.result())
            raise
        yield started


def stop(server: Server) -> None:
    """Drop the server's bench databases, or remove its container with its data (idempotent)."""
    if server.container is None:
        server.drop_all()
    elif server.admin_url is not None:
        server.admin_url = None  # once: the container goes with its data
        server.container.stop()
