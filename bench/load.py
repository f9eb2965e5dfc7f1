"""An MLflow-like load on the same tables, to run beside the backfill: what a busy tracking server sends.

* **Writers** create experiments as MLflow 3.10.1's ``SqlAlchemyStore.create_experiment`` does, in one
  transaction: ``INSERT INTO experiments`` (the id from the table's own sequence), the tags in one
  ``executemany``, then ``UPDATE experiments SET artifact_location`` (MLflow derives it from the new id).
  Every tenth is a gateway experiment as MLflow 3.10.1+ writes one (``sourceType=GATEWAY``, ``sourceId``
  and ``isGateway=true``), so the backfill never has anything to add to them.
* **Readers** load the UI's experiment list: exactly the two statements MLflow 3.10.1 sends for
  ``search_experiments(max_results=25, order_by=["last_update_time DESC"],
  filter_string="tags.`mlflow.experiment.isGateway` IS NULL")`` (captured from its SQLAlchemy store:
  the page, then the page's tags through the same subquery), in one transaction.

Each client is a thread with its own connection, paced to a fixed rate, the clients of a kind evenly
staggered (an operation that falls behind starts the next one at once, without a burst to catch up).
Latencies are kept per window (:meth:`Load.window`), so the load alone and the load during a backfill
can be compared side by side.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.sql import GATEWAY, IS_GATEWAY_KEY, SOURCE_TYPE_KEY, TRUE
from bench.seed import SOURCE_ID_KEY


@dataclass(frozen=True)
class LoadSpec:
    writers: int = 2
    creates_per_second: float = 5.0  # per writer
    readers: int = 2
    lists_per_second: float = 0.25  # per reader

    def describe(self) -> str:
        return (
            f"{self.writers} writers creating {self.creates_per_second:g} experiments/s each, "
            f"{self.readers} readers loading the UI's experiment list {self.lists_per_second:g} times/s each"
        )


def _list_statements(dialect: str) -> tuple[str, str]:
    """MLflow 3.10.1's two statements for the UI's first page (see the module docstring)."""
    k = "`key`" if dialect == "mysql" else '"key"' if dialect == "sqlite" else "key"
    page = (
        "FROM experiments WHERE NOT (EXISTS (SELECT experiment_tags.experiment_id FROM experiment_tags"
        f" WHERE experiment_tags.experiment_id = experiments.experiment_id AND experiment_tags.{k} = :isgw))"
        " AND experiments.lifecycle_stage IN (:active)"
        " ORDER BY experiments.last_update_time DESC, experiments.experiment_id DESC LIMIT :limit OFFSET :offset"
    )
    columns = (
        "experiments.experiment_id, experiments.name, experiments.workspace, experiments.artifact_location,"
        " experiments.lifecycle_stage, experiments.creation_time, experiments.last_update_time"
    )
    return (
        f"SELECT {columns} {page}",
        f"SELECT experiment_tags.{k}, experiment_tags.value, experiment_tags.experiment_id,"
        f" anon_1.experiments_experiment_id FROM (SELECT experiments.experiment_id AS experiments_experiment_id"
        f" {page}) AS anon_1 JOIN experiment_tags ON anon_1.experiments_experiment_id = experiment_tags.experiment_id",
    )


class Load:
    """The load on ``url`` while the ``with`` block runs (see the module docstring)."""

    def __init__(self, url: str, spec: LoadSpec) -> None:
        self.url, self.spec = url, spec
        self.engine = sa.create_engine(url, pool_size=spec.writers + spec.readers, max_overflow=0)
        self.dialect = self.engine.dialect.name
        self.key = "`key`" if self.dialect == "mysql" else "key"
        self.done = threading.Event()
        self.samples: list[tuple[str, float, float]] = []  # (kind, end time, seconds)
        self.errors: list[str] = []
        self.created = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> Load:
        if self.dialect == "sqlite":  # as MLflow's SQLite engine: foreign keys on, a 20 s busy timeout
            sa.event.listen(self.engine, "connect", _sqlite_session)
        clients: list[tuple[str, float, Callable[[sa.Connection], None]]] = [
            ("create", self.spec.creates_per_second, self._create)
        ] * self.spec.writers + [("list", self.spec.lists_per_second, self._list)] * self.spec.readers
        for i, (kind, rate, op) in enumerate(clients):
            # Clients of a kind take turns: reader i of 2 starts half an interval after reader 0.
            same = [c for c in clients if c[0] == kind]
            offset = (i - clients.index(same[0])) / (len(same) * rate)
            thread = threading.Thread(
                target=self._client, args=(kind, rate, op, offset), name=f"load-{kind}-{i}", daemon=True
            )
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.engine.dispose()

    def _client(self, kind: str, rate: float, op: Callable[[sa.Connection], None], offset: float) -> None:
        interval = 1.0 / rate
        with self.engine.connect() as conn:
            due = time.perf_counter() + offset
            while not self.done.is_set():
                wait = due - time.perf_counter()
                if wait > 0 and self.done.wait(wait):
                    break
                t0 = time.perf_counter()
                try:
                    op(conn)
                except sa.exc.DBAPIError as exc:  # kept and reported: the load must not stop the bench
                    conn.rollback()
                    with self.lock:
                        self.errors.append(f"{kind}: {str(exc.orig)[:200]}")
                    continue
                t1 = time.perf_counter()
                with self.lock:
                    self.samples.append((kind, t1, t1 - t0))
                due = max(due + interval, t1 - interval)

    def _create(self, conn: sa.Connection) -> None:
        with self.lock:
            self.created += 1
            gateway = self.created % 10 == 0
        name = f"{'gateway/' if gateway else ''}load-{uuid.uuid4().hex}"
        now = int(time.time() * 1000)
        values = {"name": name, "stage": "active", "t": now}
        insert = (
            "INSERT INTO experiments (name, workspace, artifact_location, lifecycle_stage, creation_time,"
            " last_update_time) VALUES (:name, 'default', NULL, :stage, :t, :t)"
        )
        with conn.begin():
            if self.dialect == "postgresql":
                experiment_id = conn.execute(sa.text(insert + " RETURNING experiment_id"), values).scalar_one()
            else:
                experiment_id = conn.execute(sa.text(insert), values).lastrowid
            tags = [("mlflow.user", "load@example.com"), ("team", "load")]
            if gateway:
                tags += [(SOURCE_TYPE_KEY, GATEWAY), (SOURCE_ID_KEY, name), (IS_GATEWAY_KEY, TRUE)]
            conn.execute(
                sa.text(f"INSERT INTO experiment_tags ({self.key}, value, experiment_id) VALUES (:k, :v, :e)"),
                [{"k": k, "v": v, "e": experiment_id} for k, v in tags],
            )
            conn.execute(
                sa.text("UPDATE experiments SET artifact_location = :loc WHERE experiments.experiment_id = :e"),
                {"loc": f"mlflow-artifacts:/{experiment_id}", "e": experiment_id},
            )

    def _list(self, conn: sa.Connection) -> None:
        binds = {"isgw": IS_GATEWAY_KEY, "active": "active", "limit": 26, "offset": 0}
        with conn.begin():
            for statement in _list_statements(self.dialect):
                conn.execute(sa.text(statement), binds).all()

    @contextmanager
    def window(self) -> Iterator[dict[str, Any]]:
        """The latencies of the operations that ended during the block, filled in when it ends."""
        figures: dict[str, Any] = {}
        t0 = time.perf_counter()
        errors = len(self.errors)
        yield figures
        t1 = time.perf_counter()
        with self.lock:
            samples = [(kind, s) for kind, end, s in self.samples if t0 <= end < t1]
            figures["errors"] = self.errors[errors:]
        figures["seconds"] = round(t1 - t0, 2)
        for kind in ("create", "list"):
            times = sorted(s for k, s in samples if k == kind)
            figures[kind] = {
                "count": len(times),
                "p50": round(statistics.median(times), 4) if times else None,
                "p99": round(times[min(len(times) - 1, int(0.99 * len(times)))], 4) if times else None,
                "max": round(times[-1], 4) if times else None,
            }


def _sqlite_session(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA busy_timeout = 20000")
    cursor.close()
