"""Every SQL statement the project runs, for every dialect, in one place.

The rule: each experiment with an ``experiment_tags`` row (``mlflow.experiment.sourceType``, exactly
``GATEWAY``) gets the row (``mlflow.experiment.isGateway``, ``true``) unless it already has an isGateway
row of any value. Each inserted row is also recorded in the project's ledger table, in the same
transaction, so that ``revert`` removes exactly what this project wrote.

How each dialect keeps the ledger exact when a live MLflow may insert the same row meanwhile:

* PostgreSQL: one statement; ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` feeds the ledger, so only
  rows this statement really inserted are recorded.
* SQLite: the batch runs under ``BEGIN IMMEDIATE`` (the database's single write lock), so nobody can
  write between the ledger insert and the tag insert.
* MySQL family (no ``RETURNING`` in MySQL): the ledger first, then a plain ``INSERT`` of exactly the
  ledger's new rows. Should MLflow add one of those rows in between, the plain insert fails with a
  duplicate key and the whole batch is rolled back and retried (it is then not a candidate any more), so
  the ledger never claims a row somebody else wrote. Values are compared with ``BINARY`` because the
  default collations ignore case and trailing spaces; MLflow's own filter does the same.

Every statement takes the same named parameters, so the same text also serves Alembic's offline
``--sql`` mode (rendered with literal values).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SOURCE_TYPE_KEY = "mlflow.experiment.sourceType"
IS_GATEWAY_KEY = "mlflow.experiment.isGateway"
GATEWAY = "GATEWAY"
TRUE = "true"

RUNS_TABLE = "gateway_backfill_runs"
LEDGER_TABLE = "gateway_backfill_rows"
VERSION_TABLE = "alembic_version_gateway_backfill"
LOCK_NAME = "mlflow_gateway_backfill"
# pg_try_advisory_lock takes a bigint: a stable 63-bit number derived from the lock's name.
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big") >> 1

# Names bound by every statement below (besides :lo, :hi, :n, :run, :now).
CONSTANTS = {"src": SOURCE_TYPE_KEY, "isgw": IS_GATEWAY_KEY, "gw": GATEWAY, "tv": TRUE}

SUPPORTED = ("sqlite", "postgresql", "mysql")


@dataclass(frozen=True)
class DialectSQL:
    """The statements for one dialect (see :func:`for_dialect`)."""

    name: str
    batch: tuple[str, ...]  # one transaction; the last statement's rowcount is the rows inserted
    first_missing: str
    count_from: str
    next_bound: str
    status: str
    revert_bound: str
    revert: tuple[str, str]  # tag rows, then ledger rows, of one keyset range of the ledger
    probe: tuple[str, ...]  # writes nothing; fails at once when the user lacks a privilege `run` needs
    lock: str | None  # session-level single-runner lock (None: SQLite uses the runs table)
    unlock: str | None
    per_transaction: str | None  # run at the start of every transaction on PostgreSQL


def _q(dialect: str) -> str:
    """How the ``key`` column is written (a reserved word in MySQL)."""
    return "`key`" if dialect == "mysql" else "key"


def _eq(dialect: str, column: str, param: str) -> str:
    """Exact, case- and space-sensitive equality of a column with a parameter."""
    return f"BINARY {column} = :{param}" if dialect == "mysql" else f"{column} = :{param}"


def _candidates(dialect: str, columns: str, bounded: bool, join: bool = False) -> str:
    """SELECT of the experiments in (lo, hi] that are gateway and have no isGateway row.

    ``join`` brings in the experiment as ``e`` (its creation time goes into the ledger).
    """
    k = _q(dialect)
    rng = " AND s.experiment_id > :lo AND s.experiment_id <= :hi" if bounded else ""
    experiments = " JOIN experiments e ON e.experiment_id = s.experiment_id" if join else ""
    return (
        f"SELECT {columns} FROM experiment_tags s{experiments}"
        f" WHERE s.{k} = :src AND {_eq(dialect, 's.value', 'gw')}{rng}"
        f" AND NOT EXISTS (SELECT 1 FROM experiment_tags g"
        f" WHERE g.{k} = :isgw AND g.experiment_id = s.experiment_id)"
    )


_LEDGER_INSERT = f"INSERT INTO {LEDGER_TABLE} (experiment_id, experiment_created, run_id, inserted_at_ns)"
_LEDGER_COLUMNS = "s.experiment_id, e.creation_time, :run, :now"


def _batch(dialect: str, bounded: bool) -> tuple[str, ...]:
    k = _q(dialect)
    rng = " AND r.experiment_id > :lo AND r.experiment_id <= :hi" if bounded else ""
    if dialect == "postgresql":
        return (
            f"WITH ins AS (INSERT INTO experiment_tags ({k}, value, experiment_id)"
            # psycopg 3 sends typed parameters: one parameter must not be text here and varchar below.
            f" {_candidates(dialect, 'CAST(:isgw AS VARCHAR), CAST(:tv AS VARCHAR), s.experiment_id', bounded)}"
            f" ON CONFLICT ({k}, experiment_id) DO NOTHING RETURNING experiment_id)"
            f" {_LEDGER_INSERT} SELECT ins.experiment_id, e.creation_time, :run, :now"
            " FROM ins JOIN experiments e ON e.experiment_id = ins.experiment_id"
            " ON CONFLICT (experiment_id) DO UPDATE SET experiment_created = EXCLUDED.experiment_created,"
            " run_id = EXCLUDED.run_id, inserted_at_ns = EXCLUDED.inserted_at_ns",
        )
    # The ledger first, then exactly the ledger rows of this batch (the timestamp identifies it) as tags.
    from_ledger = (
        f"INSERT INTO experiment_tags ({k}, value, experiment_id)"
        f" SELECT :isgw, :tv, r.experiment_id FROM {LEDGER_TABLE} r"
        f" WHERE r.inserted_at_ns = :now{rng}"
    )
    if dialect == "sqlite":
        return (
            f"{_LEDGER_INSERT} {_candidates(dialect, _LEDGER_COLUMNS, bounded, join=True)}"
            " ON CONFLICT (experiment_id) DO UPDATE SET experiment_created = excluded.experiment_created,"
            " run_id = excluded.run_id, inserted_at_ns = excluded.inserted_at_ns",
            f"{from_ledger} ON CONFLICT ({k}, experiment_id) DO NOTHING",
        )
    ledger_first = (
        f"{_LEDGER_INSERT} {_candidates(dialect, _LEDGER_COLUMNS, bounded, join=True)}"
        " ON DUPLICATE KEY UPDATE experiment_created = VALUES(experiment_created), run_id = VALUES(run_id),"
        " inserted_at_ns = VALUES(inserted_at_ns)"
    )
    if bounded:
        # A plain INSERT: a row that someone added since the ledger insert read is a duplicate-key error,
        # and the batch is rolled back whole and retried (see job.is_transient).
        return ledger_first, from_ledger
    # The offline script: it locks the candidates first (offline_backfill), so nothing can race it; a no-op
    # update (not INSERT IGNORE, which would hide real errors) keeps a second application harmless.
    return ledger_first, f"{from_ledger} ON DUPLICATE KEY UPDATE experiment_tags.{k} = experiment_tags.{k}"


def _revert(dialect: str, bounded: bool) -> tuple[str, str]:
    """Delete the tag rows the ledger lists, only while they still hold the value we wrote (a row a user
    changed since is theirs now) and belong to the same experiment (ids can be reused after
    `mlflow gc`: the creation time tells them apart); then the ledger rows."""
    k = _q(dialect)
    rng = " AND l.experiment_id > :lo AND l.experiment_id <= :hi" if bounded else ""
    return (
        f"DELETE FROM experiment_tags WHERE {k} = :isgw AND {_eq(dialect, 'value', 'tv')}"
        f" AND experiment_id IN (SELECT l.experiment_id FROM {LEDGER_TABLE} l"
        " JOIN experiments e ON e.experiment_id = l.experiment_id"
        f" WHERE COALESCE(l.experiment_created, -1) = COALESCE(e.creation_time, -1){rng})",
        f"DELETE FROM {LEDGER_TABLE}" + (" WHERE experiment_id > :lo AND experiment_id <= :hi" if bounded else ""),
    )


def _status(dialect: str) -> str:
    k = _q(dialect)
    return (
        "SELECT COUNT(*) AS gateway,"
        " COALESCE(SUM(CASE WHEN e.lifecycle_stage = 'deleted' THEN 1 ELSE 0 END), 0) AS deleted,"
        f" COALESCE(SUM(CASE WHEN g.experiment_id IS NOT NULL AND {_eq(dialect, 'g.value', 'tv')}"
        " THEN 1 ELSE 0 END), 0) AS tagged,"
        " COALESCE(SUM(CASE WHEN g.experiment_id IS NULL THEN 1 ELSE 0 END), 0) AS missing"
        " FROM experiment_tags s"
        " JOIN experiments e ON e.experiment_id = s.experiment_id"
        f" LEFT JOIN experiment_tags g ON g.{k} = :isgw AND g.experiment_id = s.experiment_id"
        f" WHERE s.{k} = :src AND {_eq(dialect, 's.value', 'gw')}"
    )


def _probe(dialect: str) -> tuple[str, ...]:
    """Statements of the batch's shape that match no row: privileges are checked, nothing is written."""
    k = _q(dialect)
    insert = (
        f"INSERT INTO experiment_tags ({k}, value, experiment_id) SELECT s.{k}, s.value, s.experiment_id"
        " FROM experiment_tags s WHERE 1 = 0"
    )
    if dialect == "mysql":
        return (insert,)
    return (f"{insert} ON CONFLICT ({k}, experiment_id) DO NOTHING",)


def for_dialect(dialect: str) -> DialectSQL:
    """The statements for ``dialect`` (a SQLAlchemy dialect name: sqlite, postgresql or mysql)."""
    if dialect not in SUPPORTED:
        raise ValueError(f"unsupported dialect {dialect!r}")
    k = _q(dialect)
    locks = {
        "postgresql": (f"SELECT pg_try_advisory_lock({PG_LOCK_KEY})", f"SELECT pg_advisory_unlock({PG_LOCK_KEY})"),
        # GET_LOCK names are server-wide: qualify with the database (PostgreSQL's are per database already).
        "mysql": (
            f"SELECT GET_LOCK(CONCAT('{LOCK_NAME}.', DATABASE()), 0)",
            f"SELECT RELEASE_LOCK(CONCAT('{LOCK_NAME}.', DATABASE()))",
        ),
        "sqlite": (None, None),
    }[dialect]
    return DialectSQL(
        name=dialect,
        batch=_batch(dialect, bounded=True),
        first_missing=_candidates(dialect, "MIN(s.experiment_id)", bounded=False),
        count_from=f"SELECT COUNT(*) FROM experiment_tags WHERE {k} = :src AND experiment_id > :lo",
        # Keyset: the upper end (and count) of the next n rows of the (key, experiment_id) primary key. No OFFSET.
        next_bound=(
            "SELECT MAX(experiment_id), COUNT(*) FROM (SELECT experiment_id FROM experiment_tags"
            f" WHERE {k} = :src AND experiment_id > :lo ORDER BY experiment_id LIMIT :n) b"
        ),
        status=_status(dialect),
        revert_bound=(
            f"SELECT MAX(experiment_id) FROM (SELECT experiment_id FROM {LEDGER_TABLE}"
            " WHERE experiment_id > :lo ORDER BY experiment_id LIMIT :n) b"
        ),
        revert=_revert(dialect, bounded=True),
        probe=_probe(dialect),
        lock=locks[0],
        unlock=locks[1],
        per_transaction=(
            "SELECT set_config('lock_timeout', :lock_timeout, true),"
            " set_config('statement_timeout', :statement_timeout, true)"
            if dialect == "postgresql"
            else None
        ),
    )


def offline_backfill(dialect: str) -> tuple[str, ...]:
    """The backfill as one unbounded batch in one transaction, for Alembic's ``--sql`` script (idempotent)."""
    statements = _batch(dialect, bounded=False)
    if dialect == "mysql":
        # Lock the candidate experiments for the whole script: a tag insert takes a shared lock on its
        # experiment through the foreign key, so nobody can add an isGateway row to them meanwhile.
        lock = (
            "SELECT COUNT(*) FROM experiments e WHERE e.experiment_id IN"
            f" ({_candidates(dialect, 's.experiment_id', False)}) FOR UPDATE"
        )
        return ("START TRANSACTION", lock, *statements, "COMMIT")
    return statements


def offline_revert(dialect: str) -> tuple[str, str]:
    """Undo everything in the ledger, for ``alembic downgrade --sql``."""
    return _revert(dialect, bounded=False)
