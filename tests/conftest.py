"""Backends as a pytest parameter: every test that takes ``db`` runs on each server MLflow users run.

Backend ids: ``sqlite``, ``postgresql`` (15), ``postgresql-18``, ``mysql`` (Oracle MySQL 9.7), ``mariadb``
(10.11), ``mariadb-11`` (11.8), and ``postgresql-pgbouncer-transaction`` / ``postgresql-pgbouncer-session``
(PostgreSQL 15 through PgBouncer 1.18 in that pool mode); ``MGB_TEST_BACKENDS`` picks some (default: all).
Servers: one container per backend per session, started in parallel when the session starts
(tests/backends.py; images built offline by scripts/build-test-images.sh, never pulled), or an existing
server given by ``MGB_TEST_<ID>_URL`` (e.g. ``MGB_TEST_POSTGRESQL_18_URL``; a user that may create
databases). A requested backend that cannot be reached fails the tests that need it; it is never skipped.
pytest's header names each server and its version as the server reports it.

``@pytest.mark.backends(...)`` limits a test to some backends, named by id or by SQL dialect
(``postgresql`` and ``mysql`` stand for their whole family: ``backends("mysql")`` is Oracle MySQL and both
MariaDBs). Each test gets a fresh database holding MLflow's schema (copied from a template that real
MLflow created once per session) and no data besides MLflow's Default experiment.

The pooler backends (:data:`POOLERS`) share one PostgreSQL 15 server of their own (not the ``postgresql``
backend's, which fault tests pause and restart), each with a PgBouncer in front of it in its pool mode, and
run on one xdist worker (group ``pgbouncer``). A test's database is made and copied on the server directly;
the URL the test gets (``db.url``, ``server.url_for``) goes through the pooler, and ``server.direct_url_for``
reaches the same database without it. They run the tests of :data:`POOLER_MODULES` (behaviour, live safety,
Alembic), whose dialect markers (``backends("postgresql")``) include them, and elsewhere only the tests
that name them by id: a ``backends("postgresql")`` test in another module stays off them. An existing stack
is given by ``MGB_TEST_<ID>_URL`` (the server, directly) and ``MGB_TEST_<ID>_POOLER_URL`` (the same user
through the pooler). The tests' own engines on a pooler disable psycopg's server-side prepared statements
(:func:`_no_prepared_statements_through_poolers`), as an application behind PgBouncer 1.18 must; the
tool's engines are left as the tool makes them.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backfill.schema import metadata
from backfill.sql import VERSION_TABLE
from tests.mlflow_data import mlflow_store

# The project's own tables: those of its metadata, and its Alembic version table. Comparisons of MLflow's
# tables skip exactly these, so a table the project adds is never taken for a change to MLflow's.
OURS = (*sorted(metadata.tables), VERSION_TABLE)

# PostgreSQL 15 through PgBouncer, by pool mode.
POOLERS = {"postgresql-pgbouncer-transaction": "transaction", "postgresql-pgbouncer-session": "session"}
BACKENDS = ("sqlite", "postgresql", "postgresql-18", "mysql", "mariadb", "mariadb-11", *POOLERS)
DIALECTS = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgresql-18": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "mariadb-11": "mysql",
} | dict.fromkeys(POOLERS, "postgresql")
FLAVORS = {"sqlite": "sqlite", "postgresql": "postgresql", "postgresql-18": "postgresql", "mysql": "mysql"}
FLAVORS |= {"mariadb": "mariadb", "mariadb-11": "mariadb"} | dict.fromkeys(POOLERS, "postgresql")
# The modules whose tests run on the pooler backends without naming them (see the module docstring).
POOLER_MODULES = ("test_backfill.py", "test_live.py", "test_alembic.py")


def selected_backends() -> list[str]:
    raw = os.environ.get("MGB_TEST_BACKENDS") or ",".join(BACKENDS)  # unset or empty: all of them
    wanted = [b.strip() for b in raw.split(",") if b.strip()]
    unknown = sorted(set(wanted) - set(BACKENDS))
    if unknown:
        raise pytest.UsageError(f"MGB_TEST_BACKENDS: unknown backend(s) {unknown}; choose from {BACKENDS}")
    return wanted


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("backends")
        pooler_module = metafunc.definition.path.name in POOLER_MODULES
        backends = [b for b in selected_backends() if _runs_on(b, only.args if only else None, pooler_module)]
        # Each test carries its backend's pytest-xdist group (--dist loadgroup): one worker per server.
        params = [pytest.param(b, id=b, marks=pytest.mark.xdist_group(_group(b))) for b in backends]
        metafunc.parametrize("backend", params, scope="session")


def _runs_on(backend: str, named: tuple[str, ...] | None, pooler_module: bool) -> bool:
    """Whether a test limited to ``named`` (None: not limited) runs on ``backend``: named by id, always; a
    pooler backend otherwise only in :data:`POOLER_MODULES`; the others when ``named`` is None or names
    their dialect."""
    if named is not None and backend in named:
        return True
    if backend in POOLERS and not pooler_module:
        return False
    return named is None or DIALECTS[backend] in named


def _group(backend: str) -> str:
    """The pytest-xdist group: the backend, or ``pgbouncer`` for both pooler backends (they share a server)."""
    return "pgbouncer" if backend in POOLERS else backend


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run only on these backends (ids or dialects)")
    config.addinivalue_line("markers", "migration_check: the CI migration check (make migration-check)")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Start every selected server at once (they take seconds each), before the header names them.

    Under ``pytest -n N`` (pytest-xdist) this process only starts them, and hands each server to the workers
    through the environment (``MGB_TEST_<ID>_URL`` and ``..._CONTAINER``); every test of one backend runs on
    the same worker (``--dist loadgroup``, see :func:`pytest_generate_tests`), so no server is used by
    two workers at once and the fault tests (pause, restart) disturb no other test.
    """
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    tmp = Path(session.config._tmp_path_factory.mktemp("servers"))  # type: ignore[attr-defined]
    wanted = [b for b in selected_backends() if b not in _servers and b not in _failed]
    with ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:
        for backend, future in [(b, pool.submit(_start_server, b, tmp / b)) for b in wanted]:
            try:
                _servers[backend] = future.result()
            except Exception as exc:  # noqa: BLE001 - reported as a failure of every test that needs it
                _failed[backend] = f"backend {backend!r} requested but unavailable: {exc}"
    if getattr(session.config.option, "numprocesses", None):
        for backend, srv in _servers.items():
            if srv.admin_url and srv.container is not None:
                os.environ[_env(backend, "URL")] = srv.admin_url
                os.environ[_env(backend, "CONTAINER")] = srv.container.get_wrapped_container().id
            if srv.pooler_url:
                os.environ[_env(backend, "POOLER_URL")] = srv.pooler_url


def _env(backend: str, what: str) -> str:
    return f"MGB_TEST_{backend.upper().replace('-', '_')}_{what}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the empty parameter sets of tests limited to backends that were not selected (they are not tests
    of this run, not skipped ones)."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("skip")
        if marker and str(marker.kwargs.get("reason", "")).startswith("got empty parameter set"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for backend in selected_backends():
        if backend in _servers:
            lines.append(f"backend {backend}: {_servers[backend].version}")
        elif backend in _failed:
            lines.append(f"backend {backend}: UNAVAILABLE ({_failed[backend]})")
    return lines


@dataclass
class Server:
    """A place to make databases: a temp dir (SQLite) or a PostgreSQL / MySQL-family server."""

    backend: str
    tmp: Path
    admin_url: str | None = None
    container: Any = None
    template: str | None = None
    created: list[str] = field(default_factory=list)
    version: str = ""  # what the server says it is (SELECT version()), and the pooler in front of it
    # Pooler backends: the superuser's URL through the pooler (url_for goes through it), and the PgBouncer
    # started for this session (None when another process started it).
    pooler_url: str | None = None
    pooler: Any = None
    # The copier of :meth:`new_mlflow_database`: copies made ahead, the lock each copy is made under.
    _ready: queue.Queue[str | Exception] = field(default_factory=lambda: queue.Queue(maxsize=2), repr=False)
    _copying: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _filler: threading.Thread | None = field(default=None, repr=False)

    @property
    def dialect(self) -> str:
        return DIALECTS[self.backend]

    @property
    def flavor(self) -> str:
        return FLAVORS[self.backend]

    def _admin(self, statement: str) -> None:
        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(statement))
        finally:
            engine.dispose()

    def url_for(self, name: str) -> str:
        """Database ``name``'s URL as the tests use it (through the pooler on the pooler backends)."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.tmp / (name + '.db')}"
        return sa.make_url(self.pooler_url or self.admin_url).set(database=name).render_as_string(hide_password=False)

    def direct_url_for(self, name: str) -> str:
        """Database ``name``'s URL on the server itself (the same as :meth:`url_for` but on pooler backends)."""
        if self.pooler_url is None:
            return self.url_for(name)
        return sa.make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def new_database(self, name: str | None = None) -> str:
        """An empty database; returns its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        if self.dialect == "postgresql":
            self._admin(f'CREATE DATABASE "{name}"')
        elif self.dialect == "mysql":
            self._admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        else:
            sa.create_engine(self.url_for(name)).connect().close()
        self.created.append(name)
        return self.url_for(name)

    def new_mlflow_database(self) -> str:
        """A fresh database with MLflow's schema, copied from the session's template.

        Copies are made ahead, two at a time, by a thread of their own: a copy costs the server its DDL
        (MySQL has no template databases: some forty CREATE TABLEs), which then overlaps the tests. A test
        that disturbs the server (pause, restart) holds the copier off with :meth:`undisturbed_copies`.
        """
        if self.template is None:
            self.template = f"tmpl_{uuid.uuid4().hex[:8]}"
            self.new_database(self.template)
            # Directly: a pooler would keep a server connection to the template, and nobody may be
            # connected to a database that is copied.
            mlflow_store(self.direct_url_for(self.template)).engine.dispose()
            self._filler = threading.Thread(target=self._fill, name=f"copies-{self.backend}", daemon=True)
            self._filler.start()
        made = self._ready.get(timeout=300)
        if isinstance(made, Exception):
            raise made
        return made

    @contextmanager
    def undisturbed_copies(self) -> Iterator[None]:
        """No copy is in flight inside this block: for a test that pauses or restarts the server."""
        with self._copying:
            yield

    def _fill(self) -> None:
        """Make copies until the session ends. A failed copy is tried again (three attempts) and, failing
        still, handed to the next test as its error; the copier itself never stops early, so one bad moment
        of the server costs one test, not every later one."""
        while not self._stopping.is_set():
            made: str | Exception = RuntimeError("no copy made")
            for attempt in range(3):
                try:
                    with self._copying:
                        made = self.clone(self.template or "")
                    break
                except Exception as exc:  # noqa: BLE001 - handed to the test that asks next
                    made = exc
                    self._stopping.wait(2 * (attempt + 1))
            while not self._stopping.is_set():
                try:
                    self._ready.put(made, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def stop_copies(self) -> None:
        if self._filler is not None:
            self._stopping.set()
            self._filler.join(timeout=120)

    def clone(self, source: str) -> str:
        """A copy of database ``source`` (a name or URL; nobody may be connected to it); returns its URL."""
        if "://" in source:
            source = (
                Path(sa.make_url(source).database or "").stem
                if self.dialect == "sqlite"
                else (sa.make_url(source).database or "")
            )
        name = f"t_{uuid.uuid4().hex[:12]}"
        if self.dialect == "sqlite":
            shutil.copyfile(self.tmp / f"{source}.db", self.tmp / f"{name}.db")
        elif self.dialect == "postgresql":
            self._close_pooled_connections(source)
            self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        else:
            self._copy_mysql(source, name)
        self.created.append(name)
        return self.url_for(name)

    def _close_pooled_connections(self, database: str) -> None:
        """End the idle server connections a pooler keeps to ``database`` (its clients have gone; PgBouncer
        opens new ones when needed): CREATE DATABASE ... TEMPLATE refuses a database anyone is connected to.
        Only the pooler's (they come from its network); a connection in use is left alone, and the copy fails."""
        if self.pooler_url is None or self.container is None:
            return
        from tests.backends import pooler_subnet

        subnet = pooler_subnet(self.container.get_wrapped_container().id)
        self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND state = 'idle' AND client_addr << inet '{subnet}'"
        )

    def _copy_mysql(self, source: str, target: str) -> None:
        # MySQL has no template databases: replay SHOW CREATE TABLE (keeps foreign keys) and copy the rows.
        engine = sa.create_engine(self.url_for(source))
        with engine.connect() as conn:
            tables = [r[0] for r in conn.execute(sa.text("SHOW FULL TABLES WHERE Table_type = 'BASE TABLE'"))]
            ddl = [conn.execute(sa.text(f"SHOW CREATE TABLE `{t}`")).one()[1] for t in tables]
            filled = [t for t in tables if conn.execute(sa.text(f"SELECT 1 FROM `{t}` LIMIT 1")).first()]
        engine.dispose()
        self._admin(f"CREATE DATABASE `{target}` CHARACTER SET utf8mb4")
        engine = sa.create_engine(self.url_for(target))
        with engine.begin() as conn:
            conn.execute(sa.text("SET FOREIGN_KEY_CHECKS = 0"))
            # MLflow's Default experiment has id 0, which AUTO_INCREMENT would otherwise renumber.
            conn.execute(sa.text("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_AUTO_VALUE_ON_ZERO')"))
            for statement in ddl:
                conn.execute(sa.text(statement.replace(":", r"\:")))
            for t in filled:
                conn.execute(sa.text(f"INSERT INTO `{t}` SELECT * FROM `{source}`.`{t}`"))
        engine.dispose()

    def run_sql_script(self, url: str, script: str) -> None:
        """Apply a SQL script with the database's own client (psql / mariadb), as a DBA would."""
        database = sa.make_url(url).database
        if self.dialect == "sqlite":
            subprocess.run(
                ["sqlite3", database], input=script, text=True, check=True, capture_output=True
            ) if shutil.which("sqlite3") else _sqlite_executescript(database, script)
        elif self.container is not None:
            from tests.backends import run_sql_in_container

            run_sql_in_container(self.container, self.backend, database, script)
        else:
            _run_local_client(self.dialect, url, script)

    def drop_all(self) -> None:
        for name in self.created:
            if self.dialect == "postgresql":
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            elif self.dialect == "mysql":
                self._admin(f"DROP DATABASE IF EXISTS `{name}`")


def _sqlite_executescript(path: str, script: str) -> None:
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.executescript(script)


def _run_local_client(backend: str, url: str, script: str) -> None:
    u = sa.make_url(url)
    env = dict(os.environ)
    if backend == "postgresql":
        env["PGPASSWORD"] = u.password or ""
        cmd = [
            "psql",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-h",
            u.host or "localhost",
            "-p",
            str(u.port or 5432),
            "-U",
            u.username or "",
            "-d",
            u.database or "",
        ]
    else:
        env["MYSQL_PWD"] = u.password or ""
        cmd = [
            shutil.which("mariadb") or "mysql",
            "-h",
            u.host or "127.0.0.1",
            "-P",
            str(u.port or 3306),
            "-u",
            u.username or "",
            u.database or "",
        ]
    subprocess.run(cmd, input=script, text=True, check=True, capture_output=True, env=env)


def _start_server(backend: str, tmp: Path) -> Server:
    if backend == "sqlite":
        import sqlite3

        tmp.mkdir(parents=True, exist_ok=True)
        return Server(backend, tmp, version=f"SQLite {sqlite3.sqlite_version}")
    from backfill.urls import parse_url

    env_url = os.environ.get(_env(backend, "URL"))
    if env_url:
        admin = parse_url(env_url)
        if DIALECTS[backend] == "postgresql":
            admin = admin.set(database="postgres")
        container = None
        if os.environ.get(_env(backend, "CONTAINER")):  # started by the controlling pytest process
            from tests.backends import SharedContainer

            container = SharedContainer(
                os.environ[_env(backend, "CONTAINER")], admin.username or "", admin.password or ""
            )
        server = Server(backend, tmp, admin_url=admin.render_as_string(hide_password=False), container=container)
        if backend in POOLERS:
            pooled = os.environ.get(_env(backend, "POOLER_URL"))
            if not pooled:
                raise RuntimeError(f"{_env(backend, 'URL')} is set but {_env(backend, 'POOLER_URL')} is not")
            server.pooler_url = parse_url(pooled).set(database="postgres").render_as_string(hide_password=False)
    elif backend in POOLERS:
        from tests import backends

        container = _pooled_server()
        url = sa.make_url(container.get_connection_url()).set(drivername="postgresql+psycopg", database="postgres")
        admin_url = url.render_as_string(hide_password=False)
        pooler = backends.start_pgbouncer(container.get_wrapped_container().id, admin_url, POOLERS[backend])
        server = Server(backend, tmp, admin_url=admin_url, container=container, pooler=pooler)
        server.pooler_url = pooler.url(admin_url)
    else:
        from tests import backends

        container = backends.start_server(backend)
        url = sa.make_url(container.get_connection_url())
        if DIALECTS[backend] == "postgresql":
            url = url.set(drivername="postgresql+psycopg", database="postgres")
        server = Server(backend, tmp, admin_url=url.render_as_string(hide_password=False), container=container)
    if backend in POOLERS:
        server._copying = _pooled_copying
    engine = sa.create_engine(server.admin_url)
    try:
        with engine.connect() as conn:
            server.version = str(conn.execute(sa.text("SELECT version()")).scalar())
    finally:
        engine.dispose()
    if server.pooler_url:
        if POOLERS[backend] != "session":
            pooled_per_transaction(server.pooler_url)
        pooler = server.pooler.version if server.pooler else f"the pooler at {sa.make_url(server.pooler_url).host}"
        server.version += f", through {pooler} ({POOLERS[backend]} pooling)"
    return server


_pooled_lock = threading.Lock()
_pooled: list[Any] = []  # the pooler backends' own PostgreSQL container, once started
# Both pooler backends copy databases on that one server: a test that pauses or restarts it holds off both
# copiers (Server.undisturbed_copies).
_pooled_copying = threading.Lock()


def _pooled_server() -> Any:
    """The PostgreSQL 15 container that both pooler backends share (TLS on), started (and made ready for
    poolers) by whichever asks first."""
    from tests import backends

    with _pooled_lock:
        if not _pooled:
            _pooled.append(backends.start_pooled_postgres())
        return _pooled[0]


_servers: dict[str, Server] = {}
_failed: dict[str, str] = {}
# The ports of the poolers that hand out a server connection per transaction (not per session).
_per_transaction_poolers: set[int] = set()


def pooled_per_transaction(url: str) -> None:
    """Mark the pooler ``url`` points at as one that shares server connections between transactions."""
    _per_transaction_poolers.add(sa.make_url(url).port or 0)


@sa.event.listens_for(sa.Engine, "engine_connect")
def _no_prepared_statements_through_poolers(conn: sa.Connection) -> None:
    """The tests' own engines (and MLflow's, in this process) prepare no statement on the server when they
    go through a transaction- or statement-pooling PgBouncer: psycopg would prepare a query after its fifth
    run on one server connection and run it later on another, which PgBouncer 1.18 cannot follow. This is
    what an application behind such a pooler must do (``prepare_threshold=None``), the one whose engine the
    Alembic tests hand to env.py included. The tool's own engines (``backfill.connect.create_engine``, also
    used in this process) are left as the tool makes them: how they fare through the pooler is what the
    tests are about."""
    if conn.dialect.name != "postgresql" or not _per_transaction_poolers:
        return
    if getattr(conn.engine, "_mgb_owned", False):  # (an application's engine handed to Alembic is not)
        return
    raw = conn.connection.dbapi_connection
    if getattr(getattr(raw, "info", None), "port", None) in _per_transaction_poolers:
        raw.prepare_threshold = None  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The session's server for ``backend``; a backend that cannot start fails every test that needs it."""
    if backend in _failed:
        pytest.fail(_failed[backend], pytrace=False)
    if backend not in _servers:
        try:
            _servers[backend] = _start_server(backend, tmp_path_factory.mktemp(backend))
        except Exception as exc:  # noqa: BLE001 - reported as a failure, never a skip
            _failed[backend] = f"backend {backend!r} requested but unavailable: {exc}"
            pytest.fail(_failed[backend], pytrace=False)
    return _servers[backend]


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.backends import SharedContainer, remove_pooler_network

    try:
        for srv in _servers.values():
            srv.stop_copies()
            srv.drop_all()
    finally:
        for srv in _servers.values():
            if srv.pooler is not None:
                srv.pooler.stop()
        # The pooler backends' server is in _pooled (even when no pooler could start) and in two Servers.
        containers = {id(c): c for c in [*_pooled, *(srv.container for srv in _servers.values())] if c is not None}
        for container in containers.values():
            if not isinstance(container, SharedContainer):
                container_id = container.get_wrapped_container().id
                container.stop()
                if container in _pooled:
                    remove_pooler_network(container_id)


@dataclass
class Db:
    """A fresh MLflow database on one backend, and ways to look at it."""

    backend: str
    url: str
    server: Server
    engine: sa.Engine

    @property
    def dialect(self) -> str:
        return DIALECTS[self.backend]

    @property
    def flavor(self) -> str:
        return FLAVORS[self.backend]

    @property
    def direct_url(self) -> str:
        """This database on the server itself, not through the pooler (the same as ``url`` but on the pooler
        backends)."""
        return self.server.direct_url_for(sa.make_url(self.url).database or "")

    def tags(self) -> set[tuple[int, str, str | None]]:
        tags = sa.Table("experiment_tags", sa.MetaData(), autoload_with=self.engine)
        with self.engine.connect() as conn:
            query = sa.select(tags.c.experiment_id, tags.c.key, tags.c.value)
            return {(int(e), k, v) for e, k, v in conn.execute(query)}

    def table(self, name: str) -> list[tuple]:
        with self.engine.connect() as conn:
            return sorted(tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {name}")))

    def table_names(self) -> set[str]:
        return set(sa.inspect(self.engine).get_table_names())

    def add_experiments(self, rows: list[tuple[int, str, list[tuple[str, str | None]]]]) -> None:
        """Insert (experiment_id, lifecycle_stage, [(key, value), ...]) rows directly, like MLflow stores them."""
        meta = sa.MetaData()
        experiments = sa.Table("experiments", meta, autoload_with=self.engine)
        tags = sa.Table("experiment_tags", meta, autoload_with=self.engine)
        with self.engine.begin() as conn:
            if rows:
                conn.execute(
                    experiments.insert(),
                    [
                        {
                            "experiment_id": e,
                            "name": f"exp-{e}",
                            "artifact_location": f"/tmp/{e}",
                            "lifecycle_stage": stage,
                            "creation_time": 0,
                            "last_update_time": 0,
                        }
                        for e, stage, _ in rows
                    ],
                )
            values = [{"experiment_id": e, "key": k, "value": v} for e, _, kv in rows for k, v in kv]
            if values:
                conn.execute(tags.insert(), values)

    def set_tag(self, experiment_id: int, key: str, value: str | None) -> None:
        tags = sa.Table("experiment_tags", sa.MetaData(), autoload_with=self.engine)
        with self.engine.begin() as conn:
            conn.execute(tags.insert().values(experiment_id=experiment_id, key=key, value=value))


@pytest.fixture
def db(server: Server) -> Iterator[Db]:
    url = server.new_mlflow_database()
    engine = sa.create_engine(url)
    yield Db(server.backend, url, server, engine)
    engine.dispose()


REPO = Path(__file__).resolve().parent.parent


def alembic(url: str | None, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``alembic`` command line of this project, as a user would."""
    import sys

    command = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini")]
    if url:
        command += ["-x", f"database-url={url}"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def snapshot(url: str, skip: tuple[str, ...] = ()) -> dict[str, list[tuple]]:
    """Every row of every table (sorted), for before/after comparisons."""
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    meta.reflect(engine)
    try:
        with engine.connect() as conn:
            return {
                name: sorted(tuple(map(repr, r)) for r in conn.execute(sa.select(table)))
                for name, table in meta.tables.items()
                if name not in skip
            }
    finally:
        engine.dispose()


def start_cli(*args: str) -> subprocess.Popen[str]:
    """``python -m backfill ARGS`` in the background, as a user would start it."""
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "backfill", *args], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m backfill ARGS`` to the end."""
    import sys

    return subprocess.run(
        [sys.executable, "-m", "backfill", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
    )


def wait_for(condition: Callable[[], object], seconds: float = 120) -> None:
    """Until ``condition()`` is true (a database error counts as not yet: its tables may be being created);
    fails the test after ``seconds``, which only catch a hang."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except sa.exc.SQLAlchemyError:
            pass
        time.sleep(0.02)
    raise AssertionError("condition not reached")
