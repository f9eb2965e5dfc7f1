"""The CI migration check (`make migration-check`): databases real MLflow releases wrote, on every backend.

A matrix of MLflow release x backend. Each release runs in its own cached venv (tests/mlflow_versions.py)
and writes a database as it really does (tests/mlflow_writer.py): 2.22.5, the last 2.x (no gateway
experiments: the backfill must be a no-op), 3.10.0 (gateway experiments without isGateway), 3.10.0 then
3.10.1 on the same database (what a user who upgraded has: old rows untagged, new ones tagged), 3.10.1,
3.17.2 and 3.18.0 (every gateway experiment already tagged), and 3.10.0 then 3.18.0. ``MLFLOW_VERSIONS``
(e.g. ``3.18.0,3.19.0``) replaces that list with ``X`` and ``3.10.0+X`` for each release X it names
(see tests/mlflow_versions.py). For each database:

1. ``alembic upgrade head``: the exact end state (below); ``alembic downgrade base``: exactly the original;
   ``alembic upgrade head`` again: the end state again. Where nothing is missing, ``run --json`` first
   says it inserted 0 and changes nothing but the project's own tables.
2. The ``--sql`` script, applied to a copy with the server's own client, reaches the same end state.
3. The newest MLflow (3.18.0, or a newer release in ``MLFLOW_VERSIONS``) upgrades the database (``mlflow db
   upgrade``), and its real ``mlflow server`` over it answers the UI's own experiment-list request, every
   page, with exactly the active experiments that have no isGateway row: no gateway experiment. Where the
   release left untagged ones, the same running server is shown them after ``alembic downgrade base`` (so
   the check can fail) and hides them again after ``alembic upgrade head``.

The exact end state: the added ``experiment_tags`` rows are exactly (isGateway, ``true``) for each
experiment that has a sourceType row exactly ``GATEWAY`` and had no isGateway row; every other row of
every MLflow table, MLflow's ``alembic_version`` included, is unchanged. Tables are compared by row count
and an order-independent hash of their rows, so the same code also checks a large production copy:
``MGB_MIGRATION_CHECK_URL=<copy> pytest -m migration_check -k own`` (docs/mlflow-versions.md). A copy is
served by the newest release that knows its MLflow schema revision (its ``alembic_version``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from backfill.connect import create_engine
from backfill.errors import describe
from backfill.sql import VERSION_TABLE
from backfill.urls import parse_url
from tests.conftest import OURS, REPO, alembic, run_cli
from tests.mlflow_server import UI_QUERY, MlflowServer, mlflow_url
from tests.mlflow_versions import (
    UNTAGGING_RELEASE,
    VERSIONS_VARIABLE,
    InstallError,
    candidates,
    ensure_all,
    matrix,
    newest,
    python_of,
    release_env,
    requested_versions,
    schema_of,
    serving_release,
)

pytestmark = pytest.mark.migration_check
# The rule, spelled out here rather than imported from the code under test.
SRC, GATEWAY = "mlflow.experiment.sourceType", "GATEWAY"
ISGW, TRUE = "mlflow.experiment.isGateway", "true"
WRITER = Path(__file__).with_name("mlflow_writer.py")
try:
    REQUESTED = requested_versions(os.environ.get(VERSIONS_VARIABLE))
except ValueError as exc:
    raise pytest.UsageError(str(exc)) from None
MATRIX = matrix(REQUESTED)  # entry -> the releases that write its database, in order
NEWEST = newest(REQUESTED)  # the UI check's MLflow
FIRST_GATEWAY_RELEASE = (3, 10)
Tag = tuple[int, str, "str | None"]
PARALLEL = int(os.environ.get("MGB_MIGRATION_CHECK_PARALLEL") or max(2, os.cpu_count() or 2))


@dataclass(frozen=True)
class State:
    """A database's MLflow content: each table's row count and row hash, and every experiment tag."""

    tables: dict[str, tuple[int, int]]  # experiment_tags excluded: its rows are in ``tags``
    tags: frozenset[Tag]
    active: frozenset[int]  # experiments in lifecycle_stage 'active'

    def to_tag(self) -> set[int]:
        """The rule: experiments with sourceType exactly GATEWAY and no isGateway row."""
        return {e for e, k, v in self.tags if k == SRC and v == GATEWAY} - {e for e, k, _ in self.tags if k == ISGW}

    def gateway(self) -> set[int]:
        return {e for e, k, v in self.tags if k == SRC and v == GATEWAY}

    def ui_list(self) -> set[int]:
        """What MLflow's UI lists: active experiments without an isGateway row."""
        return set(self.active) - {e for e, k, _ in self.tags if k == ISGW}


def _row_hash(row: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(tuple(row)).encode(), digest_size=16).digest(), "big")


def state(url: str, skip: tuple[str, ...] = OURS) -> State:
    """The database's State, streamed table by table (nothing but experiment_tags is held in memory)."""
    engine = sa.create_engine(parse_url(url))
    meta = sa.MetaData()
    meta.reflect(engine)
    tables: dict[str, tuple[int, int]] = {}
    try:
        with engine.connect() as conn:
            for name, table in meta.tables.items():
                if name in skip or name == "experiment_tags":
                    continue
                count, total = 0, 0
                rows = conn.execution_options(stream_results=True, yield_per=5000).execute(sa.select(table))
                for row in rows:
                    count, total = count + 1, (total + _row_hash(row)) % (1 << 128)
                tables[name] = (count, total)
            t = meta.tables["experiment_tags"].c
            tags = frozenset((int(e), k, v) for e, k, v in conn.execute(sa.select(t.experiment_id, t.key, t.value)))
            e = meta.tables["experiments"].c
            active = frozenset(
                int(i) for (i,) in conn.execute(sa.select(e.experiment_id).where(e.lifecycle_stage == "active"))
            )
    finally:
        engine.dispose()
    return State(tables, tags, active)


def assert_end_state(before: State, after: State, to_tag: set[int]) -> None:
    """Exactly the rule's rows added; every other row of every MLflow table as it was."""
    changed = sorted(
        n for n in before.tables.keys() | after.tables.keys() if before.tables.get(n) != after.tables.get(n)
    )
    assert not changed, f"MLflow tables changed: {changed}"
    assert before.tags <= after.tags, f"tag rows removed or changed: {sorted(before.tags - after.tags)}"
    assert after.tags - before.tags == {(e, ISGW, TRUE) for e in to_tag}


def release_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


def write(python: Path, url: str, label: str, cwd: Path) -> dict[str, Any]:
    """Run the writer with one release's interpreter; returns its report."""
    command = [str(python), str(WRITER), mlflow_url(url), label]
    result = ok(subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=release_env(), timeout=900))
    return json.loads(result.stdout)


def listed(ui: MlflowServer) -> set[int]:
    ids = [int(e["experiment_id"]) for e in ui.ui_experiments()]
    assert len(ids) == len(set(ids)), "an experiment appears on two pages"
    return set(ids)


def check_alembic_round_trip(url: str, before: State) -> None:
    """upgrade -> end state; downgrade -> exactly the original; upgrade again -> end state."""
    ok(alembic(url, "upgrade", "head"))
    assert_end_state(before, state(url), before.to_tag())
    ok(alembic(url, "downgrade", "base"))
    assert state(url, skip=(VERSION_TABLE,)) == before  # the project's other tables are gone too
    ok(alembic(url, "upgrade", "head"))
    assert_end_state(before, state(url), before.to_tag())


def check_newest_mlflow(url: str, newest: Path, workdir: Path, untagged: set[int]) -> set[int]:
    """`mlflow db upgrade` with the newest MLflow (``newest``: its interpreter), then its real server's UI list
    hides every gateway experiment.

    ``untagged``: the experiments the backfill tagged. Then the same running server must list them after
    ``alembic downgrade base`` (the list can show what the check looks for) and hide them again after
    ``alembic upgrade head``, run under the live server on the newest schema. One server start per database,
    in whose interpreter ``mlflow db upgrade`` runs first. Returns the ids the UI lists.
    """
    with MlflowServer(newest, url, workdir, upgrade_first=True) as ui:
        assert ui.upgraded()
        upgraded = state(url)
        assert not upgraded.to_tag()
        shown = listed(ui)
        assert shown == upgraded.ui_list()
        assert not shown & upgraded.gateway(), "the UI lists gateway experiments"
        if not untagged:
            return shown
        ok(alembic(url, "downgrade", "base"))
        original = state(url, skip=(VERSION_TABLE,))
        assert original.tables == upgraded.tables
        assert upgraded.tags - original.tags == {(e, ISGW, TRUE) for e in untagged}
        assert listed(ui) == shown | (untagged & upgraded.active), "without the backfill the UI lists them"
        ok(alembic(url, "upgrade", "head"))
        assert_end_state(original, state(url), untagged)
        assert listed(ui) == shown
    return shown


def check_entry(entry: str, server, venvs: dict[str, Path], workdir: Path) -> None:  # type: ignore[no-untyped-def]
    """The whole check of one matrix entry on one backend (see the module docstring)."""
    url = server.new_database()
    reports = [write(python_of(venvs[r]), url, "v" + r.replace(".", "_"), workdir) for r in MATRIX[entry]]
    copy = server.clone(url)  # the same data, for the --sql script

    def written(kind: str, release: str | None = None) -> set[int]:
        return {e for r in reports if release in (None, r["mlflow"]) for e in r[kind]}

    before = state(url, skip=())
    # What the releases wrote is what the check is about: the gateway experiments they reported are
    # exactly the sourceType=GATEWAY ones, and exactly 3.10.0's lack isGateway.
    assert before.gateway() == written("gateway")
    assert before.to_tag() == written("gateway", release=UNTAGGING_RELEASE)
    assert bool(before.gateway()) == any(release_tuple(r["mlflow"]) >= FIRST_GATEWAY_RELEASE for r in reports)
    assert written("gateway_deleted") <= before.gateway() - before.active

    if not before.to_tag():  # nothing missing: `run` is a fast no-op that writes nothing of MLflow's
        report = json.loads(ok(run_cli("run", "--json", "--database-url", url)).stdout)
        assert report["inserted"] == 0
        assert state(url) == before

    check_alembic_round_trip(url, before)

    script = ok(alembic(copy, "upgrade", "head", "--sql"))
    server.run_sql_script(copy, script.stdout)
    assert state(copy) == state(url)

    shown = check_newest_mlflow(url, python_of(venvs[NEWEST]), workdir, before.to_tag())
    assert len(shown) > int(UI_QUERY["max_results"]), "the list has more than one page"


@dataclass
class Outcome:
    error: BaseException | None
    seconds: float


@pytest.fixture(scope="session")
def checked(server, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:  # type: ignore[no-untyped-def]
    """The selected matrix entries' checks on this backend, run side by side; each test reports its own.

    One check is a chain of mostly single processes (writers, alembic, mlflow), so one at a time leaves
    the second core idle: two at once take about half the time on 2 cores.
    """
    selected = {
        item.callspec.params["entry"]
        for item in request.session.items
        if item.originalname == "test_migration_check" and item.callspec.params["backend"] == server.backend
    }
    entries = [e for e in MATRIX if e in selected]
    try:
        venvs = ensure_all(sorted({NEWEST, *(r for e in entries for r in MATRIX[e])}))
    except InstallError as exc:  # e.g. a release in MLFLOW_VERSIONS that the index does not serve (yet)
        not_installed = str(exc)
    else:
        not_installed = ""
    if not_installed:  # outside the except clause: pytest shows the message alone
        pytest.fail(not_installed, pytrace=False)

    def run(entry: str) -> Outcome:
        start = time.monotonic()
        try:
            check_entry(entry, server, venvs, tmp_path_factory.mktemp(entry))
        except Exception as exc:  # noqa: BLE001 - raised again by the entry's own test
            return Outcome(exc, time.monotonic() - start)
        return Outcome(None, time.monotonic() - start)

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return dict(zip(entries, pool.map(run, entries), strict=True))


@pytest.mark.parametrize("entry", MATRIX)
def test_migration_check(entry: str, checked: dict[str, Outcome], record_property) -> None:  # type: ignore[no-untyped-def]
    outcome = checked[entry]
    record_property("seconds", round(outcome.seconds, 1))
    if outcome.error is not None:
        raise outcome.error


def test_one_head() -> None:
    assert ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))).get_heads() == ["gateway_backfill_0001"]


def mlflow_revision(url: str) -> str | None:
    """The database's MLflow schema revision: its ``alembic_version`` row (None: no such table, or not one row).

    Read through the tool's own engine, so a wrong URL is one line (a missing SQLite file is not created).
    """
    parsed = parse_url(url)
    try:
        engine = create_engine(parsed, read_only=True)
        try:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table("alembic_version"):
                    return None
                rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - one line, as the tool says it
        pytest.fail(str(describe(exc, parsed, connecting=True)), pytrace=False)
    return str(rows[0]) if len(rows) == 1 else None


def unknown_revision(revision: str, releases: list[str]) -> str:
    """The one line for a copy that no release of the check can serve."""
    return (
        f"the copy's MLflow schema is at revision {revision!r}, which none of MLflow {', '.join(releases)} knows: "
        f"run the check with the release your MLflow server runs (`mlflow --version`), e.g. "
        f"{VERSIONS_VARIABLE}=3.19.0 pytest -m migration_check -k own (any release the package index serves)"
    )


OWN_URL = os.environ.get("MGB_MIGRATION_CHECK_URL")
if OWN_URL:  # defined only when asked for, so that CI neither runs nor skips it

    def test_own_database_copy(tmp_path: Path) -> None:
        """The same check on an operator's copy of a production database (it is modified: use a copy).

        Served by the newest release (of the table and ``MLFLOW_VERSIONS``) that knows the copy's MLflow
        schema revision; when none does, one line says so before anything is changed."""
        url = str(OWN_URL)
        revision = mlflow_revision(url)
        if revision is None:
            pytest.fail(
                "the copy has no MLflow schema revision (one alembic_version row): not an MLflow database",
                pytrace=False,
            )
        releases = candidates(REQUESTED)
        try:
            served = serving_release(revision, releases)
        except InstallError as exc:
            served, problem = None, str(exc)
        else:
            problem = unknown_revision(revision, releases)
        if served is None:  # outside the except clause: pytest shows the message alone
            pytest.fail(problem, pytrace=False)
        before = state(url, skip=())
        assert not set(OURS) & set(before.tables), "this copy already has the project's tables: use an older copy"
        check_alembic_round_trip(url, before)
        check_newest_mlflow(url, python_of(served[1]), tmp_path, before.to_tag())


# MLflow's schema heads, as each release's own migration scripts end (tests/mlflow_versions.py asks them).
HEADS = {"2.22.5": "0584bdc529eb", "3.10.0": "1b5f0d9ad7c1", "3.17.2": "dc11669786a5", "3.18.0": "f4a9b2c7d1e6"}


def test_each_release_reports_its_schema_head() -> None:
    venvs = ensure_all(sorted(HEADS))
    assert {v: schema_of(venvs[v]).head for v in HEADS} == HEADS
    newer, older = schema_of(venvs["3.18.0"]), schema_of(venvs["3.17.2"])
    assert older.revisions < newer.revisions and HEADS["3.18.0"] not in older.revisions


def own_check(url: str) -> subprocess.CompletedProcess[str]:
    """The own-copy check as docs/mlflow-versions.md tells a user to run it (no test server started)."""
    check = ["-m", "migration_check", "-k", "own", "-n", "0", "-p", "no:cacheprovider"]
    module = str(Path(__file__).relative_to(REPO))  # the only module with such tests: spares collecting the rest
    command = [sys.executable, "-m", "pytest", *check, module]
    env = {**os.environ, "MGB_MIGRATION_CHECK_URL": url, "MGB_TEST_BACKENDS": "sqlite"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


if not OWN_URL:  # it runs the check on a copy: never inside that check (and its name must not match `-k own`)

    @pytest.mark.backends("sqlite", "mariadb")
    def test_a_copy_on_a_newer_schema_is_served_by_the_newest_release_that_knows_it(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        """A copy an upgraded 3.18 user has (3.10.0's untagged gateway experiments, 3.18.0's schema): while its
        revision is one no release knows, one line says so and nothing changes; on 3.18.0's, the check passes."""
        url = server.new_database()
        venvs = ensure_all(["3.10.0", "3.18.0"])
        untagged = set(write(python_of(venvs["3.10.0"]), url, "old", tmp_path)["gateway"])
        write(python_of(venvs["3.18.0"]), url, "new", tmp_path)
        assert mlflow_revision(url) == HEADS["3.18.0"]

        set_revision(url, "f00dfeed0000")
        before = state(url, skip=())
        refused = own_check(url)
        assert refused.returncode == pytest.ExitCode.TESTS_FAILED, refused.stdout[-3000:]
        assert "1 failed" in refused.stdout, refused.stdout[-3000:]
        assert unknown_revision("f00dfeed0000", candidates(REQUESTED)) in refused.stdout.splitlines()
        assert "Traceback" not in refused.stdout + refused.stderr
        assert state(url, skip=()) == before

        set_revision(url, HEADS["3.18.0"])
        assert state(url, skip=()).to_tag() == untagged
        passed = own_check(url)
        assert passed.returncode == 0 and "1 passed" in passed.stdout, passed.stdout[-3000:]
        after = state(url)
        assert not after.to_tag() and {(e, ISGW, TRUE) for e in untagged} <= after.tags
        assert mlflow_revision(url) == schema_of(ensure_all([NEWEST])[NEWEST]).head  # served by the newest


def set_revision(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()
