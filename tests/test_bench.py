"""The benchmark's own bookkeeping (bench/): pairs from the seeded state in alternating order, ratios as a
median and range with a verdict over the whole range, a run that gives up recorded while the bench goes on,
and results written after every shape. Small databases: no timing is asserted, only what is recorded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bench import __main__ as bench_main
from bench import compare, report, suite
from bench.load import LoadSpec
from bench.servers import Server as BenchServer
from bench.spread import GAVE_UP, MET, MIXED, NOT_MET, fmt, spread, verdict
from bench.suite import Plan, bench_backend, bench_shape
from tests.conftest import Server


def test_a_ratio_is_its_median_and_range_and_a_goal_is_met_only_over_the_whole_range() -> None:
    figure = spread([0.94, 0.71, 0.83])
    assert (figure["median"], figure["min"], figure["max"], figure["n"]) == (0.83, 0.71, 0.94, 3)
    assert fmt(figure) == "0.83 (0.71\u20130.94)"
    assert fmt(spread([0.5])) == "0.50"
    assert verdict(figure, lambda v: v >= 0.7) == MET
    assert verdict(figure, lambda v: v >= 0.8) == MIXED
    assert verdict(figure, lambda v: v >= 0.95) == NOT_MET
    # A pair whose run gave up has no ratio: it meets nothing, and with no ratio at all the goal gave up.
    partly = spread([0.9, None, 0.85])
    assert (partly["median"], partly["n"], partly["values"]) == (0.875, 2, [0.9, None, 0.85])
    assert verdict(partly, lambda v: v >= 0.8) == MIXED
    assert verdict(spread([None, None]), lambda v: v >= 0.8) == GAVE_UP
    assert fmt(spread([None])) == "-"


@pytest.fixture
def bench_server(server: Server, tmp_path: Path) -> Iterator[BenchServer]:
    """The bench's view of the test session's server; it drops every bench database it made."""
    bench = BenchServer(server.backend, tmp_path, server.admin_url)
    try:
        yield bench
    finally:
        bench.drop_all()


def quiet_plan(experiments: int, **overrides: Any) -> Plan:
    return Plan(experiments, **{"load": None, "client_sample": 0, "log": lambda _line: None, **overrides})


@pytest.mark.backends("sqlite", "postgresql", "mariadb")  # one server of each family: the bench's own logic
def test_pairs_start_from_the_seeded_state_in_alternating_order(bench_server: BenchServer) -> None:
    plan = quiet_plan(2000, shapes=("3.10.0",), pairs=3, offline=True)
    source, _ = bench_server.seeded(2000, "3.10.0")
    result = bench_shape(bench_server, source, "3.10.0", plan)

    assert [p["order"] for p in result["pairs"]] == [
        ["run", "single", "offline"],
        ["offline", "single", "run"],
        ["run", "single", "offline"],
    ]
    # Every run inserted every missing row: each started from the seeded state, not from the one before.
    assert [r["inserted"] for r in result["runs"]] == [200, 200, 200]
    ratios = [p["single_statement_seconds"] / p["run_seconds"] for p in result["pairs"]]
    figure = result["batched_vs_single_statement"]
    assert figure["n"] == 3 and figure["values"] == [round(r, 3) for r in ratios]
    assert figure["min"] <= figure["median"] <= figure["max"]
    assert result["batched_vs_offline_sql"]["n"] == 3 and result["offline_sql_vs_single_statement"]["n"] == 3
    # The rerun and verify yardsticks: one per pair, each on that pair's finished database.
    assert len(result["finished_database"]) == 3
    for key in ("rerun_vs_R1", "verify_vs_R1", "status_vs_R1", "R1_vs_R0"):
        assert result[key]["n"] == 3, key
    shape = report.judge(result)
    assert set(shape["goals"].values()) <= {MET, NOT_MET, MIXED}
    assert fmt(figure) in report.table({"b": {"experiments": 2000, "shapes": {"3.10.0": shape}}})


@pytest.mark.backends("sqlite", "postgresql", "mariadb")
def test_compare_runs_both_packages_from_the_seeded_state_in_alternating_order(
    bench_server: BenchServer, tmp_path: Path
) -> None:
    """`python -m bench.compare REF`: REF's package exported alone, both sides inserting every missing row
    on their own fresh database, pair after pair, and one ratio per pair."""
    commit, base = compare.export("HEAD", tmp_path)
    assert len(commit) == 40 and (base / "backfill" / "cli.py").is_file() and not (base / "tests").exists()
    result = compare.compare(bench_server.backend, bench_server, base, 2000, "3.10.0", 3)
    assert [list(p) for p in result["pairs"]] == [["head", "base"], ["base", "head"], ["head", "base"]]
    assert result["inserted"] == 200
    assert all(side["inserted"] == 200 for pair in result["pairs"] for side in pair.values())
    for key in ("walk", "process"):
        assert result[key]["n"] == 3
        assert result[key]["values"] == [round(p["head"][key] / p["base"][key], 3) for p in result["pairs"]]


# A trigger that lets the tool's first batches through and fails the ones past experiment 30,000 (only
# once the tool's ledger exists: the single statement and the seed are not stopped; nor is the load,
# whose experiments come after the seeded ones).
_STOP = "bench test: stop here"
_TRIGGER = {
    "sqlite": [
        "CREATE TRIGGER bench_stop BEFORE INSERT ON experiment_tags WHEN NEW.experiment_id > 30000"
        " AND NEW.experiment_id <= 60000 AND EXISTS (SELECT 1 FROM sqlite_master WHERE name ="
        f" 'gateway_backfill_rows') BEGIN SELECT RAISE(ABORT, '{_STOP}'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION bench_stop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.experiment_id > 30000 AND NEW.experiment_id <= 60000"
        f" AND to_regclass('gateway_backfill_rows') IS NOT NULL THEN RAISE EXCEPTION '{_STOP}'; END IF;"
        " RETURN NEW; END $$",
        "CREATE TRIGGER bench_stop BEFORE INSERT ON experiment_tags FOR EACH ROW EXECUTE FUNCTION bench_stop()",
    ],
    "mysql": [
        "CREATE TRIGGER bench_stop BEFORE INSERT ON experiment_tags FOR EACH ROW BEGIN"
        " IF NEW.experiment_id > 30000 AND NEW.experiment_id <= 60000 AND EXISTS (SELECT 1 FROM"
        " information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'gateway_backfill_rows')"
        f" THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{_STOP}'; END IF; END"
    ],
}


@pytest.mark.backends("sqlite", "postgresql", "mariadb")
def test_a_run_that_gives_up_is_recorded_and_the_bench_goes_on(
    bench_server: BenchServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the first run that gave up raised RunFailed out of bench_shape, and nothing was recorded."""
    seeded = bench_server.seeded

    def seeded_with_trigger(n: int, shape: str, previous: str | None = None) -> tuple[str, float]:
        name, seconds = seeded(n, shape, previous)
        if previous is None:  # the mixed shape's source is made from this one, trigger included
            engine = sa.create_engine(bench_server.url_for(name), poolclass=sa.NullPool)
            with engine.begin() as conn:
                for statement in _TRIGGER[bench_server.family]:
                    conn.exec_driver_sql(statement)
            engine.dispose()
        return name, seconds

    monkeypatch.setattr(bench_server, "seeded", seeded_with_trigger)
    plan = quiet_plan(60_000, pairs=1, offline=False, load=LoadSpec(writers=1, readers=0), load_alone_seconds=0.2)
    shapes = dict(bench_backend(bench_server, plan))

    # 3.10.0: 6,000 rows to insert; the batches past experiment 30,000 fail: every run gives up part-way.
    first = shapes["3.10.0"]
    assert "error" not in first, first.get("traceback")
    assert len(first["gave_up"]) == 1 and "gave_up" in first["runs"][0]
    for record in first["gave_up"]:
        assert record["exit"] not in (0, None) and _STOP in record["message"]
        assert record["rows_to_insert"] == 6000 and 0 < record["rows_done"] <= 3000
        assert record["lock_timeout"] == 1.0 and record["options"] == []
    assert first["batched_vs_single_statement"]["values"] == [None]
    load = first["under_load"]
    # Beside the load: at the defaults, then SQLite in WAL mode, a server with a longer lock timeout.
    if bench_server.family == "sqlite":
        assert [(t["lock_timeout"], t.get("journal_mode")) for t in load["tries"]] == [(1.0, None), (1.0, "wal")]
    else:
        assert [(t["lock_timeout"], t["options"]) for t in load["tries"]] == [
            (1.0, []),
            (10.0, ["--lock-timeout", "10"]),
        ]
    assert "run" not in load and load["gave_up"] == load["tries"][-1]
    assert all(0 < t["rows_done"] <= 3000 and _STOP in t["message"] for t in load["tries"])
    judged = report.judge(first)
    assert judged["goals"]["batched_vs_single_statement >= 0.8"] == GAVE_UP
    assert judged["goals"]["max batch seconds under load < 0.25"] == GAVE_UP
    text = report.table({"b": {"experiments": 60_000, "shapes": {"3.10.0": judged}}}, markdown=True)
    assert "gave up (exit " in text and " of 6,000 rows" in text
    assert ("in WAL mode, " if bench_server.family == "sqlite" else "at --lock-timeout 10, ") in text

    # mixed (3,000 rows, all below experiment 30,000): measured all the same, and its runs finish.
    second = shapes["mixed"]
    assert "error" not in second, second.get("traceback")
    assert "gave_up" not in second and [r["inserted"] for r in second["runs"]] == [3000]
    assert second["under_load"]["tries"] == [] and second["under_load"]["run"]["batches"]["n"] == 1


def test_results_are_written_after_every_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash (here Ctrl-C) in the second shape keeps the first one's figures. Before: results.json was
    written once, at the very end, and a crash lost everything."""
    measured = suite.bench_shape

    def crash_on_mixed(server: BenchServer, source: str, shape: str, plan: Plan) -> dict[str, Any]:
        if shape == "mixed":
            raise KeyboardInterrupt
        return measured(server, source, shape, plan)

    monkeypatch.setattr(suite, "bench_shape", crash_on_mixed)
    output = tmp_path / "results.json"
    argv = ["--backends", "sqlite", "--experiments", "2000", "--pairs", "1", "--no-offline", "--client-sample", "0"]
    argv += ["--sweep-batch-sizes", "", "--load-writers", "0", "--load-readers", "0"]
    with pytest.raises(KeyboardInterrupt):
        bench_main.main([*argv, "--workdir", str(tmp_path), "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["complete"] is False
    assert list(saved["backends"]["sqlite"]["shapes"]) == ["3.10.0"]
    assert saved["backends"]["sqlite"]["shapes"]["3.10.0"]["runs"][0]["inserted"] == 200
    assert not list(tmp_path.glob(".*.partial"))
