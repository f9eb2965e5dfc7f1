"""Read replicas: hold the work while they lag, and wait until they have the result.

MLflow 3 can serve every read, the UI's experiment list included, from a read replica
(``--read-replica-backend-store-uri``). A backfill that outruns replication makes every page stale, and a
result checked on the primary is not what users see. So, like gh-ost and pt-archiver, the tool measures
each replica's lag before every batch and waits while it exceeds ``--max-replica-lag``, and at the end it
waits until every replica has replayed the last batch.

Lag is measured by position, never by a clock the replica reports (an idle replica that stopped replaying
would read 0): after each batch the primary's position is noted with the time; a replica lags by the age
of the oldest noted position it has not replayed yet.

* PostgreSQL: the primary's ``pg_current_wal_insert_lsn()`` after the batch, against the replica's
  ``pg_last_wal_replay_lsn()``. No privilege needed. An insert position just past a WAL page or segment
  header (where it sits on a quiet primary after a segment switch) is read as the page's start, which is
  where the replica's replay of the previous record ends: otherwise a caught-up standby would look behind.
* Oracle MySQL: the primary's ``@@GLOBAL.gtid_executed`` after the batch, against the replica's
  ``GTID_SUBSET(position, @@GLOBAL.gtid_executed)`` (GTID replication, ``gtid_mode=ON``).
* MariaDB: the primary's ``@@GLOBAL.gtid_binlog_pos`` after the batch, against ``MASTER_GTID_WAIT(pos, 0)``
  on the replica.

Before anything is written, every replica URL is checked (:meth:`Replicas.check`): it must answer, be of
the primary's family and be a replica (PostgreSQL: in recovery; the MySQL family: another server than the
primary). Once the work is under way, a replica that cannot be reached, or whose replication is stopped,
lags ever more: it holds the work, and past ``--replica-timeout`` the work stops resumably (exit 7) with a
one-line reason. A stop requested while the work is held ends it too (exit 7): the work is done only when
every replica has what it wrote, which is why a resumed run first notes the primary's current position.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from backfill.connect import close, connect, create_engine, failure, reading
from backfill.errors import BackfillError, ExitCode
from backfill.retry import Timeouts
from backfill.urls import display, parse_url

DEFAULT_MAX_LAG = 5.0
DEFAULT_TIMEOUT = 600.0
POLL = 0.25  # seconds between two looks at a lagging replica


@dataclass
class Lag:
    """One replica's state as last measured."""

    replica: str  # its URL as it may be printed
    seconds: float  # age of the oldest batch it has not replayed (0: it has everything)
    pending: int  # batches it has not replayed
    reason: str | None = None  # why it could not be measured (unreachable, not a replica, ...)


def position_sql(flavor: str) -> str:
    """What the primary reports as its position after a batch (PostgreSQL: and its WAL page and segment
    sizes, see :func:`pg_position`)."""
    return {
        "postgresql": "SELECT CAST(pg_current_wal_insert_lsn() AS TEXT), CAST(current_setting('wal_block_size') AS"
        " INTEGER), (SELECT CAST(setting AS BIGINT) FROM pg_catalog.pg_settings WHERE name = 'wal_segment_size')",
        "mysql": "SELECT @@GLOBAL.gtid_executed",
        "mariadb": "SELECT @@GLOBAL.gtid_binlog_pos",
    }[flavor]


# PostgreSQL's WAL page headers: a segment's first page has the long one (SizeOfXLogLongPHD), every other
# page the short one (SizeOfXLogShortPHD), MAXALIGNed on 64-bit builds.
_LONG_HEADER, _SHORT_HEADER = 40, 24


def pg_position(lsn: str, block: int, segment: int) -> str:
    """The insert position ``lsn`` as the end of the last record: no record ends inside a page header, and
    pg_current_wal_insert_lsn() at a page boundary points past the header, where replay never gets."""
    high, low = lsn.split("/")
    value = (int(high, 16) << 32) | int(low, 16)
    if segment and value % segment == _LONG_HEADER:
        value -= _LONG_HEADER
    elif block and value % block == _SHORT_HEADER:
        value -= _SHORT_HEADER
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def server_sql(dialect: str) -> str:
    """Before anything is written, on the primary and on each replica URL: the server's family, and whether
    it is a replica (PostgreSQL) or which server it is (the MySQL family: compared with the primary's)."""
    if dialect == "postgresql":
        return "SELECT 'postgresql', CAST(pg_is_in_recovery() AS TEXT)"
    return "SELECT CASE WHEN VERSION() LIKE '%MariaDB%' THEN 'mariadb' ELSE 'mysql' END, CAST(@@server_id AS CHAR)"


def replayed_sql(flavor: str) -> str:
    """On a replica: 1 when it has replayed up to :pos, else 0 (NULL: it is not a replica)."""
    return {
        "postgresql": "SELECT CASE WHEN pg_is_in_recovery() THEN CAST(pg_last_wal_replay_lsn() >= CAST(:pos AS pg_lsn)"
        " AS INTEGER) END",
        "mysql": "SELECT GTID_SUBSET(:pos, @@GLOBAL.gtid_executed)",
        "mariadb": "SELECT CASE WHEN MASTER_GTID_WAIT(:pos, 0) = 0 THEN 1 ELSE 0 END",
    }[flavor]


@dataclass
class _Replica:
    url: str
    engine: Engine
    conn: Connection | None = None
    pending: deque[tuple[str, float]] = field(default_factory=deque)  # (primary position, when) not replayed

    @property
    def shown(self) -> str:
        return display(self.engine.url)


class Replicas:
    """The replicas of one run: noted positions, lag, holding and the final wait."""

    def __init__(
        self,
        urls: list[str],
        flavor: str,
        timeouts: Timeouts,
        max_lag: float = DEFAULT_MAX_LAG,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.flavor = flavor
        self.timeouts = timeouts
        self.max_lag = max_lag
        self.timeout = timeout
        self.replicas = [_Replica(u, create_engine(parse_url(u), timeouts, read_only=True)) for u in urls]
        self.waited = 0.0  # seconds spent holding, for the report

    def __bool__(self) -> bool:
        return bool(self.replicas)

    def check(self, primary: Connection) -> None:
        """Before anything is written: every replica answers, is of the primary's family and is a replica."""
        with reading(primary):
            mine = str(primary.execute(sa.text(server_sql(self.flavor))).one()[1])
        for replica in self.replicas:
            dialect = replica.engine.dialect.name
            flavor, state = "sqlite", None
            if dialect != "sqlite":
                try:
                    replica.conn = connect(replica.engine, self.timeouts)
                    with reading(replica.conn):
                        flavor, state = replica.conn.execute(sa.text(server_sql(dialect))).one()
                except BackfillError as exc:
                    raise BackfillError(f"replica {replica.shown}: {exc}; nothing was written", exc.code) from None
                except SQLAlchemyError as exc:
                    error = failure(exc, replica.engine.url)
                    raise BackfillError(f"replica {replica.shown}: {error}; nothing was written", error.code) from None
            if flavor != self.flavor:
                problem = f"a {flavor} database, not a replica of this {self.flavor} primary"
            elif flavor == "postgresql" and state != "true":
                problem = "not a replica (pg_is_in_recovery() is false): give the URL of a standby"
            elif flavor != "postgresql" and str(state) == mine:
                problem = f"the primary itself (same server_id {mine}): give the URL of a replica"
            else:
                continue
            raise BackfillError(f"{replica.shown} is {problem}; nothing was written", ExitCode.USAGE)

    def note(self, conn: Connection) -> None:
        """After a batch committed on the primary (and when the work starts): remember the position every
        replica must reach."""
        if not self.replicas:
            return
        with reading(conn):
            row = conn.execute(sa.text(position_sql(self.flavor))).one()
        position = pg_position(str(row[0]), int(row[1]), int(row[2] or 0)) if self.flavor == "postgresql" else row[0]
        if not position:
            raise BackfillError(
                "the primary reports no replication position (MySQL needs gtid_mode=ON and MariaDB a binary log "
                "to measure replica lag): lag cannot be measured, so the run will not go on blind",
                ExitCode.STOPPED,
            )
        now = time.monotonic()
        for replica in self.replicas:
            replica.pending.append((str(position), now))

    def settle(self, seconds: float) -> list[Lag]:
        """Each replica's lag, once every one has replayed what was noted or ``seconds`` have passed (status)."""
        deadline = time.monotonic() + seconds
        lags = self.measure()
        while any(lag.pending or lag.reason for lag in lags) and time.monotonic() < deadline:
            time.sleep(0.1)
            lags = self.measure()
        return lags

    def measure(self) -> list[Lag]:
        """Each replica's lag now (a replica that cannot be measured reports why)."""
        return [self._measure(r) for r in self.replicas]

    def _measure(self, replica: _Replica) -> Lag:
        now = time.monotonic()
        try:
            if replica.conn is None or replica.conn.closed or replica.conn.invalidated:
                replica.conn = connect(replica.engine)
            with reading(replica.conn):
                while replica.pending:
                    done = replica.conn.execute(
                        sa.text(replayed_sql(self.flavor)), {"pos": replica.pending[0][0]}
                    ).scalar()
                    if done is None:  # promoted since the check: no longer a replica
                        raise BackfillError(
                            f"{replica.shown} is not a replica any more (pg_is_in_recovery() is false)",
                            ExitCode.USAGE,
                        )
                    if not done:
                        break
                    replica.pending.popleft()
        except BackfillError as exc:
            if exc.code == ExitCode.USAGE:
                raise
            return self._unreachable(replica, now, exc)
        except SQLAlchemyError as exc:
            error = failure(exc, replica.engine.url)
            if error.code == ExitCode.PERMISSION:  # never taken for a lag of 0, nor waited on
                raise BackfillError(f"cannot measure the lag of replica {replica.shown}: {error}", error.code) from None
            return self._unreachable(replica, now, error)
        seconds = now - replica.pending[0][1] if replica.pending else 0.0
        return Lag(replica.shown, seconds, len(replica.pending))

    @staticmethod
    def _unreachable(replica: _Replica, now: float, reason: BackfillError) -> Lag:
        if replica.conn is not None:
            close(replica.conn)
            replica.conn = None
        oldest = replica.pending[0][1] if replica.pending else now
        return Lag(replica.shown, now - oldest, len(replica.pending), f"unreachable: {reason}")

    def hold(
        self,
        limit: float,
        should_stop: Callable[[], bool],
        waiting: Callable[[Lag], None],
        what: str,
    ) -> None:
        """Wait while any replica lags more than ``limit`` seconds (0: until each has replayed everything).

        Gives up with exit 7 once ``timeout`` seconds pass without the replicas catching up, or when a stop
        is requested meanwhile (the work is not done until the replicas have it).
        """
        if not self.replicas:
            return
        started = time.monotonic()
        while True:
            behind = [lag for lag in self.measure() if lag.reason or (lag.pending and lag.seconds >= limit)]
            if not behind:
                self.waited += time.monotonic() - started
                return
            worst = max(behind, key=lambda lag: lag.seconds)
            if time.monotonic() - started >= self.timeout:
                self.waited += time.monotonic() - started
                state = worst.reason or f"lag {worst.seconds:.0f} s"
                raise BackfillError(
                    f"replica {worst.replica} did not catch up within --replica-timeout {self.timeout:g} s "
                    f"({state}, {worst.pending} batches behind) {what}",
                    ExitCode.STOPPED,
                )
            waiting(worst)
            if should_stop():
                self.waited += time.monotonic() - started
                reason = getattr(should_stop, "reason", "stopped on request")
                raise BackfillError(
                    f"{reason} while waiting for replica {worst.replica} ({worst.pending} batches behind) {what}",
                    ExitCode.STOPPED,
                )
            time.sleep(POLL)

    def close(self) -> None:
        for replica in self.replicas:
            if replica.conn is not None:
                close(replica.conn)
            replica.engine.dispose()
