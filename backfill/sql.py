"""Every SQL statement the project runs, for every dialect, in one place.

The rule: an experiment is *missing* the tag when its ``experiments`` row exists, it has an
``experiment_tags`` row (``mlflow.experiment.sourceType``, exactly ``GATEWAY``), and it has no
``mlflow.experiment.isGateway`` row of any value. ``run``, ``status``, ``verify``, the end-of-pass check
and the offline script all use :func:`_missing` for it. An orphan tag row (its experiment is gone;
SQLite does not enforce MLflow's foreign keys) is never missing: there is no experiment to tag.

Each inserted row is recorded in the project's ledger, in the same transaction, so that ``revert``
removes exactly what this project wrote. How each dialect keeps the ledger exact when a live MLflow may
insert the same row meanwhile:

* PostgreSQL: one statement; ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` feeds the ledger, so only
  rows this statement really inserted are recorded.
* SQLite: the batch runs under ``BEGIN IMMEDIATE`` (the database's single write lock), so nobody can
  write between the ledger insert and the tag insert.
* MySQL family (no ``RETURNING``): the ledger first, then a plain ``INSERT`` of exactly the ledger's new
  rows. Should MLflow add one of those rows in between, the plain insert fails with a duplicate key and
  the whole batch is rolled back and retried (it is then not a candidate any more), so the ledger never
  claims a row somebody else wrote.

Exact matching on the MySQL family, whose default collations ignore case (MariaDB's also trailing
spaces, MySQL 8+'s ``utf8mb4_0900_ai_ci`` accents): ``CAST(col AS BINARY) = :v`` next to the collation's
``col = :v`` (which keeps the primary-key range scan). Neither ``BINARY col`` nor ``VALUES()`` is used:
MySQL 9 deprecates both. The isGateway key itself is matched by the collation, as the primary key does:
a row whose key differs only in case already occupies the slot our row would take.

Every statement names its tables with the schema of the MLflow tables it works on (PostgreSQL: the
schema ``experiment_tags`` resolves to; see ``schema.py``) and takes the same named parameters, so the
same text also serves Alembic's offline ``--sql`` mode (rendered with literal values). Keyset ranges are
inclusive (``experiment_id >= :lo AND experiment_id <= :hi``), so any 64-bit id can start or end one.
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
LOCK_TABLE = "gateway_backfill_lock"
LOCK_NAME = "mlflow_gateway_backfill"

# Names bound by every statement below (besides :lo, :hi, :n, :run, :now).
CONSTANTS = {"src": SOURCE_TYPE_KEY, "isgw": IS_GATEWAY_KEY, "gw": GATEWAY, "tv": TRUE}


@dataclass(frozen=True)
class DialectSQL:
    """The statements for one dialect and schema (see :func:`statements`)."""

    name: str
    begin_write: str  # starts a batch's transaction (SQLite: takes the write lock at once)
    batch: tuple[str, ...]  # one transaction; the last statement's rowcount is the rows inserted
    first_missing: str  # the lowest experiment id that is missing the tag, or NULL
    next_bound: str  # the upper end and count of the next :n sourceType rows from :lo
    count_from: str  # sourceType rows from :lo (the progress bar's total)
    missing: str  # how many experiments are missing the tag (verify, dry run)
    # Run first, in the same transaction, before first_missing and missing (PostgreSQL: no nested loops,
    # so their anti-join is a hash or merge join, linear whatever the statistics say).
    whole_table_setup: tuple[str, ...]
    status: str  # gateway, deleted, tagged, missing, conflicts, orphans
    revert_bound: str
    revert: tuple[str, str]  # tag rows, then ledger rows, of one keyset range of the ledger
    probe_run: tuple[str, ...]  # write nothing; fail at once when the user lacks a privilege `run` needs
    probe_revert: tuple[str, ...]
    # The same for the project's tables, each when it exists: {table: (run's probes, revert's probes)}
    probe_project: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    # PostgreSQL: true when the user may draw run ids (the runs table's id sequence), which a zero-row probe
    # cannot tell (nextval runs per row); None elsewhere
    sequence_check: str | None

    def probes(self, revert: bool, existing: set[str]) -> tuple[str, ...]:
        """Every probe of `run` (or `revert`) on MLflow's tables and on those of the project's that exist."""
        own = [statements[revert] for table, statements in self.probe_project.items() if table in existing]
        return (self.probe_revert if revert else self.probe_run) + tuple(s for group in own for s in group)


@dataclass(frozen=True)
class Names:
    """Qualified, quoted table names (``"mlf".experiment_tags`` on PostgreSQL; plain elsewhere)."""

    tags: str
    experiments: str
    runs: str
    ledger: str
    lease: str

    @classmethod
    def in_schema(cls, prefix: str = "") -> Names:
        return cls(
            f"{prefix}experiment_tags",
            f"{prefix}experiments",
            f"{prefix}{RUNS_TABLE}",
            f"{prefix}{LEDGER_TABLE}",
            f"{prefix}{LOCK_TABLE}",
        )


def _key(dialect: str) -> str:
    """How the ``key`` column is written (a reserved word in MySQL)."""
    return "`key`" if dialect == "mysql" else "key"


def _exact(dialect: str, column: str, param: str) -> str:
    """Equality that is exact (case, accents, trailing spaces) and still uses the column's index."""
    if dialect == "mysql":
        return f"{column} = :{param} AND CAST({column} AS BINARY) = :{param}"
    return f"{column} = :{param}"


def _range(column: str, bounded: bool) -> str:
    return f" AND {column} >= :lo AND {column} <= :hi" if bounded else ""


def _no_isgateway(dialect: str, t: Names, bounded: bool, anti_join: bool = False) -> str:
    """The experiment ``s`` has no isGateway row.

    By default one primary-key probe per experiment: a correlated scalar subquery with LIMIT 1, which no
    planner turns into a join, so the cost stays one index lookup per gateway experiment whatever the
    statistics say. (A NOT EXISTS became, on PostgreSQL with statistics taken before any isGateway row
    existed, a nested loop over a materialized list of every isGateway row, rescanned for each experiment:
    quadratic.) In a batch the lookup is also bounded to the batch's range, which keeps MySQL's optional
    subquery_to_derived rewrite to the batch too.

    ``anti_join``: NOT EXISTS, for the whole-table reads (verify, the end-of-pass check), where a hash or
    merge anti-join reads each table once and beats a probe per row (about 4x on PostgreSQL). On PostgreSQL
    it runs only under :attr:`DialectSQL.whole_table_setup`, which rules the quadratic nested loop out. The
    MySQL family's plans for NOT EXISTS are linear without help; SQLite plans it as the probe anyway.
    """
    k = _key(dialect)
    lookup = (
        f"FROM {t.tags} g WHERE g.{k} = :isgw AND g.experiment_id = s.experiment_id{_range('g.experiment_id', bounded)}"
    )
    if anti_join or (dialect == "mysql" and not bounded):
        return f"NOT EXISTS (SELECT 1 {lookup})"
    return f"(SELECT 1 {lookup} LIMIT 1) IS NULL"


def _missing(dialect: str, t: Names, columns: str, bounded: bool, anti_join: bool = False) -> str:
    """SELECT ``columns`` of the experiments missing the tag (in [lo, hi] when ``bounded``); the gateway
    tag row is ``s``, its experiment ``e``. Every table is bounded to the batch's range."""
    k = _key(dialect)
    return (
        f"SELECT {columns} FROM {t.tags} s JOIN {t.experiments} e ON e.experiment_id = s.experiment_id"
        f" WHERE {_exact(dialect, f's.{k}', 'src')} AND {_exact(dialect, 's.value', 'gw')}"
        f"{_range('s.experiment_id', bounded)}{_range('e.experiment_id', bounded)}"
        f" AND {_no_isgateway(dialect, t, bounded, anti_join)}"
    )


def _quoted_literal(name: str) -> str:
    return "'" + name.replace("'", "''") + "'"


def _ledger_insert(t: Names) -> str:
    return f"INSERT INTO {t.ledger} (experiment_id, experiment_created, run_id, inserted_at_ns)"


def _batch(dialect: str, t: Names, bounded: bool) -> tuple[str, ...]:
    k = _key(dialect)
    if dialect == "postgresql":
        return (
            f"WITH ins AS (INSERT INTO {t.tags} ({k}, value, experiment_id)"
            # psycopg 3 sends typed parameters: one parameter must not be text here and varchar below.
            f" {_missing(dialect, t, 'CAST(:isgw AS VARCHAR), CAST(:tv AS VARCHAR), s.experiment_id', bounded)}"
            f" ON CONFLICT ({k}, experiment_id) DO NOTHING RETURNING experiment_id)"
            f" {_ledger_insert(t)} SELECT ins.experiment_id, e.creation_time, :run, :now"
            f" FROM ins JOIN {t.experiments} e ON e.experiment_id = ins.experiment_id WHERE 1 = 1"
            f"{_range('e.experiment_id', bounded)}"
            " ON CONFLICT (experiment_id) DO UPDATE SET experiment_created = EXCLUDED.experiment_created,"
            " run_id = EXCLUDED.run_id, inserted_at_ns = EXCLUDED.inserted_at_ns",
        )
    # The ledger first, then exactly the ledger rows of this batch (the timestamp identifies it) as tags.
    ledger_first = (
        f"{_ledger_insert(t)} {_missing(dialect, t, 's.experiment_id, e.creation_time, :run, :now', bounded)}"
    )
    from_ledger = (
        f"INSERT INTO {t.tags} ({k}, value, experiment_id) SELECT :isgw, :tv, r.experiment_id FROM {t.ledger} r"
        f" WHERE r.inserted_at_ns = :now{_range('r.experiment_id', bounded)}"
    )
    if dialect == "sqlite":
        return (
            f"{ledger_first} ON CONFLICT (experiment_id) DO UPDATE SET experiment_created ="
            " excluded.experiment_created, run_id = excluded.run_id, inserted_at_ns = excluded.inserted_at_ns",
            f"{from_ledger} ON CONFLICT ({k}, experiment_id) DO NOTHING",
        )
    # A ledger row of an earlier run whose tag has gone since is this batch's now (no VALUES(): MySQL 9
    # deprecates it; the SELECT's own columns and the parameters say the same).
    ledger_first += (
        " ON DUPLICATE KEY UPDATE experiment_created = e.creation_time, run_id = :run, inserted_at_ns = :now"
    )
    if bounded:
        # A plain INSERT: a row that someone added since the ledger insert read is a duplicate-key error,
        # and the batch is rolled back whole and retried (see retry.is_transient).
        return ledger_first, from_ledger
    # The offline script: it locks the candidates first (offline_backfill), so nothing can race it; a no-op
    # update (not INSERT IGNORE, which would hide real errors) keeps a second application harmless.
    return ledger_first, f"{from_ledger} ON DUPLICATE KEY UPDATE {t.tags}.{k} = {t.tags}.{k}"


def _revert(dialect: str, t: Names, bounded: bool) -> tuple[str, str]:
    """Delete the tag rows the ledger lists, only while they are still exactly the row we wrote (a row a
    user changed since is theirs now) and belong to the same experiment (ids can be reused after
    `mlflow gc`: the creation time tells them apart); then the ledger rows."""
    k = _key(dialect)
    return (
        f"DELETE FROM {t.tags} WHERE {_exact(dialect, k, 'isgw')} AND {_exact(dialect, 'value', 'tv')}"
        f"{_range('experiment_id', bounded)} AND experiment_id IN (SELECT l.experiment_id FROM {t.ledger} l"
        f" JOIN {t.experiments} e ON e.experiment_id = l.experiment_id"
        " WHERE COALESCE(l.experiment_created, -1) = COALESCE(e.creation_time, -1)"
        f"{_range('l.experiment_id', bounded)}{_range('e.experiment_id', bounded)})",
        f"DELETE FROM {t.ledger}" + (" WHERE experiment_id >= :lo AND experiment_id <= :hi" if bounded else ""),
    )


def _status(dialect: str, t: Names) -> str:
    """gateway, deleted, tagged, missing (orphans excluded), orphans: one pass over the gateway tag rows.

    PostgreSQL probes each experiment's isGateway row (a scalar subquery; OFFSET 0 keeps it from being
    inlined, so it runs once per row), for the reason given in :func:`_no_isgateway`. SQLite and the MySQL
    family keep a LEFT JOIN: their plans for it are a probe per row already (SQLite would flatten the
    derived table and probe twice).
    """
    k = _key(dialect)
    gateway = f"{_exact(dialect, f's.{k}', 'src')} AND {_exact(dialect, 's.value', 'gw')}"
    counts = (
        "COUNT(x.experiment_id) AS gateway,"
        " COALESCE(SUM(CASE WHEN x.lifecycle_stage = 'deleted' THEN 1 ELSE 0 END), 0) AS deleted,"
        " COALESCE(SUM(CASE WHEN x.experiment_id IS NOT NULL AND x.tag = 1 THEN 1 ELSE 0 END), 0) AS tagged,"
        " COALESCE(SUM(CASE WHEN x.experiment_id IS NOT NULL AND x.tag IS NULL THEN 1 ELSE 0 END), 0) AS missing,"
        " COALESCE(SUM(CASE WHEN x.experiment_id IS NULL THEN 1 ELSE 0 END), 0) AS orphans"
    )
    if dialect == "postgresql":
        tag = (
            f"(SELECT CASE WHEN g.value = :tv THEN 1 ELSE 0 END FROM {t.tags} g"
            " WHERE g.key = :isgw AND g.experiment_id = s.experiment_id LIMIT 1)"
        )
        rows = (
            f"SELECT e.experiment_id, e.lifecycle_stage, {tag} AS tag FROM {t.tags} s"
            f" LEFT JOIN {t.experiments} e ON e.experiment_id = s.experiment_id WHERE {gateway} OFFSET 0"
        )
    else:
        rows = (
            "SELECT e.experiment_id, e.lifecycle_stage,"
            f" CASE WHEN g.experiment_id IS NULL THEN NULL WHEN {_exact(dialect, 'g.value', 'tv')} THEN 1 ELSE 0 END"
            f" AS tag FROM {t.tags} s LEFT JOIN {t.experiments} e ON e.experiment_id = s.experiment_id"
            f" LEFT JOIN {t.tags} g ON g.{k} = :isgw AND g.experiment_id = s.experiment_id WHERE {gateway}"
        )
    return f"SELECT {counts} FROM ({rows}) x"


def _probes(dialect: str, t: Names) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Statements of the real ones' shape that match no row: privileges are checked, nothing is written.
    Servers check privileges before they look for rows, so each fails at once where the real one would."""
    k = _key(dialect)
    insert = (
        f"INSERT INTO {t.tags} ({k}, value, experiment_id) SELECT s.{k}, s.value, s.experiment_id"
        f" FROM {t.tags} s JOIN {t.experiments} e ON e.experiment_id = s.experiment_id WHERE 1 = 0"
    )
    if dialect != "mysql":
        insert += f" ON CONFLICT ({k}, experiment_id) DO NOTHING"
    delete = (
        f"DELETE FROM {t.tags} WHERE 1 = 0 AND experiment_id IN (SELECT e.experiment_id FROM {t.experiments} e"
        " WHERE 1 = 0)"
    )
    return (insert,), (delete,)


def _probe_project(dialect: str, t: Names) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The probes of the project's tables: the runs table (a run record is written by both commands), the
    ledger (run upserts into it, revert deletes from it) and the lease (renewed by both)."""
    columns = "state, started_at_ns, updated_at_ns, passes, batches, inserted, host, pid"
    record = (
        f"INSERT INTO {t.runs} ({columns}) SELECT {columns} FROM {t.runs} WHERE 1 = 0",
        f"UPDATE {t.runs} SET state = state WHERE 1 = 0",
    )
    ledger = (
        f"{_ledger_insert(t)} SELECT experiment_id, experiment_created, run_id, inserted_at_ns FROM {t.ledger}"
        " WHERE 1 = 0"
        + (
            " ON DUPLICATE KEY UPDATE run_id = 0"
            if dialect == "mysql"
            else " ON CONFLICT (experiment_id) DO UPDATE SET run_id = 0"
        )
    )
    renew = (f"UPDATE {t.lease} SET renewals = renewals WHERE 1 = 0",)
    return {
        RUNS_TABLE: (record, record),
        LEDGER_TABLE: ((ledger,), (f"DELETE FROM {t.ledger} WHERE 1 = 0",)),
        LOCK_TABLE: (renew, renew),
    }


def statements(dialect: str, prefix: str = "") -> DialectSQL:
    """The statements for ``dialect`` (sqlite, postgresql or mysql) on tables named with ``prefix``
    (a quoted schema and a dot, or empty)."""
    t = Names.in_schema(prefix)
    k = _key(dialect)
    run_probe, revert_probe = _probes(dialect, t)
    return DialectSQL(
        name=dialect,
        begin_write={
            "postgresql": "BEGIN ISOLATION LEVEL READ COMMITTED",
            "mysql": "START TRANSACTION",  # READ COMMITTED is the session's level (connect.py)
            "sqlite": "BEGIN IMMEDIATE",
        }[dialect],
        batch=_batch(dialect, t, bounded=True),
        # ORDER BY ... LIMIT 1 stops at the first missing experiment, in primary-key order.
        first_missing=_missing(dialect, t, "s.experiment_id", bounded=False, anti_join=True)
        + " ORDER BY s.experiment_id LIMIT 1",
        # Keyset: the upper end (and count) of the next n rows of the (key, experiment_id) primary key. No OFFSET.
        next_bound=(
            f"SELECT MAX(experiment_id), COUNT(*) FROM (SELECT experiment_id FROM {t.tags}"
            f" WHERE {k} = :src AND experiment_id >= :lo ORDER BY experiment_id LIMIT :n) b"
        ),
        count_from=f"SELECT COUNT(*) FROM {t.tags} WHERE {k} = :src AND experiment_id >= :lo",
        missing=_missing(dialect, t, "COUNT(*)", bounded=False, anti_join=True),
        whole_table_setup=("SET LOCAL enable_nestloop = off",) if dialect == "postgresql" else (),
        status=_status(dialect, t),
        revert_bound=(
            f"SELECT MAX(experiment_id) FROM (SELECT experiment_id FROM {t.ledger}"
            " WHERE experiment_id >= :lo ORDER BY experiment_id LIMIT :n) b"
        ),
        revert=_revert(dialect, t, bounded=True),
        probe_run=run_probe,
        probe_revert=revert_probe,
        probe_project=_probe_project(dialect, t),
        sequence_check=(
            "SELECT has_sequence_privilege(x.s, 'USAGE') OR has_sequence_privilege(x.s, 'UPDATE') FROM"
            f" (SELECT pg_get_serial_sequence({_quoted_literal(t.runs)}, 'id') AS s) x"
            if dialect == "postgresql"
            else None
        ),
    )


def pg_lock_key(schema: str) -> int:
    """pg_advisory_xact_lock takes a bigint: a stable 63-bit number from the lock's name and the schema
    (advisory locks are per database already; two MLflow schemas in one database are two locks). It only
    serializes the creation of the lease table (lock.py); the lease itself is a row."""
    return int.from_bytes(hashlib.sha256(f"{LOCK_NAME}.{schema}".encode()).digest()[:8], "big") >> 1


def offline_backfill(dialect: str) -> tuple[str, ...]:
    """The backfill as one unbounded batch in one transaction, for Alembic's ``--sql`` script (idempotent)."""
    t = Names.in_schema()
    statements_ = _batch(dialect, t, bounded=False)
    if dialect == "mysql":
        # Lock the candidate experiments for the whole script: a tag insert takes a shared lock on its
        # experiment through the foreign key, so nobody can add an isGateway row to them meanwhile.
        lock = (
            f"SELECT COUNT(*) FROM {t.experiments} x WHERE x.experiment_id IN"
            f" ({_missing(dialect, t, 's.experiment_id', False)}) FOR UPDATE"
        )
        return ("START TRANSACTION", lock, *statements_, "COMMIT")
    return statements_


def offline_revert(dialect: str) -> tuple[str, str]:
    """Undo everything in the ledger, for ``alembic downgrade --sql``."""
    return _revert(dialect, Names.in_schema(), bounded=False)
