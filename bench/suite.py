"""The benchmark's plan: which measurement runs on which fresh database, per backend and shape.

Per shape (``3.10.0``, then ``mixed``, made from it), on databases in the seeded state (``Server.fresh``):

1. ``repeat`` pairs of the batched run at its defaults (a) and the single-statement floor (b), each pair
   mirrored from the one before (a b, b a, ...: a drift in the machine's speed weighs on both alike),
   with the ``--sql`` script's statements (b') beside the first pair when asked for;
2. on the last run's finished database, interleaved rounds of the no-op rerun (d), ``verify`` (e) and
   ``status``, first with the statistics as the run left them, then freshly analyzed and interleaved with
   the reference counts R0 and R1;
3. the run again while an MLflow-like load (bench.load) reads and writes the same tables, the load's
   latencies taken alone first and then during the run;
4. on the 3.10.0 shape: the fixed-batch-size sweep and the MLflow client loop (c).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from backfill.errors import ExitCode
from bench import measure, seed
from bench.load import Load, LoadSpec
from bench.servers import Server


@dataclass
class Plan:
    experiments: int
    shapes: tuple[str, ...] = seed.SHAPES
    repeat: int = 1  # (a)/(b) pairs per shape
    rounds: int = 3  # interleaved rounds on the finished database, per statistics state
    offline: bool = True  # measure (b') beside each pair
    sweep_batch_sizes: tuple[int, ...] = ()
    sweep_min_batches: int = 3  # timed batches per sweep point (after its first)
    sweep_min_seconds: float = 0.5
    client_sample: int = 50  # experiments the MLflow client loop tags (0: skip)
    load: LoadSpec | None = field(default_factory=LoadSpec)
    load_alone_seconds: float = 5.0  # the load's own latencies, before the run starts beside it
    variant: str | None = None  # a bench.variants prototype applied to the batched runs
    log: Callable[[str], None] = print
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, to see what dominates

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - t0


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("nan")


def _batch_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the goals are judged on, over every repetition: median time, worst batch, largest RSS."""
    return {
        "seconds": round(statistics.median(r["seconds"] for r in runs), 3),
        "inserted": runs[0]["inserted"],
        "batches": max(r["batches"] for r in runs),
        **{f"batch_seconds_{k}": max(r[f"batch_seconds_{k}"] or 0 for r in runs) for k in ("p50", "p99", "max")},
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "rss_mb_after_first_batch": max(r["rss_mb_after_first_batch"] or 0 for r in runs),
        "rss_mb_after_last_batch": max(r["rss_mb_after_last_batch"] or 0 for r in runs),
    }


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "batch_trace"}


def bench_backend(server: Server, plan: Plan) -> dict[str, Any]:
    """Every measurement on one backend, shape after shape."""
    shapes: dict[str, Any] = {}
    previous: str | None = None
    for shape in plan.shapes:
        with plan.phase(f"{server.backend} seed"):
            source, seconds = server.seeded(plan.experiments, shape, previous)
        plan.log(f"[{server.backend} {shape}] source ready in {seconds:.1f}s")
        shapes[shape] = bench_shape(server, source, shape, plan)
        shapes[shape]["seed_seconds"] = round(seconds, 1)
        previous = source
    return shapes


def bench_shape(server: Server, source: str, shape: str, plan: Plan) -> dict[str, Any]:
    b, n = server.backend, plan.experiments
    expect = seed.expected(n, shape)
    tag = f"[{b} {shape}]"
    floors: list[measure.Timed] = []
    offlines: list[measure.Timed] = []
    runs: list[dict[str, Any]] = []
    finished: dict[str, dict[str, float]] = {}

    def floor(offline: bool) -> None:
        db = server.fresh(source, "offline" if offline else "single")
        (offlines if offline else floors).append(measure.single_statement(server.url_for(db), offline))
        server.release(db)

    def run(last: bool) -> None:
        db = server.fresh(source, "run")
        runs.append(measure.backfill_subprocess(server.url_for(db), variant=plan.variant))
        if last:
            with plan.phase(f"{b} (d)+(e)"):
                finished.update(_finished(server, db, plan))
        server.release(db)

    with plan.phase(f"{b} (a)+(b)"):
        for i in range(plan.repeat):
            steps = [lambda last=i == plan.repeat - 1: run(last), lambda: floor(False)]
            if plan.offline and i == 0:  # once, beside the first pair
                steps.append(lambda: floor(True))
            for step in steps if i % 2 == 0 else reversed(steps):
                step()
            plan.log(
                f"{tag} run {runs[-1]['seconds']:.2f}s, single {floors[-1].seconds:.2f}s"
                + (f", --sql script {offlines[-1].seconds:.2f}s" if i == 0 and offlines else "")
            )
    for what, rows in [("run", r["inserted"]) for r in runs] + [("single", f.rows) for f in floors + offlines]:
        if rows != expect.missing:
            raise RuntimeError(f"{b} {shape}: {what} inserted {rows} rows, expected {expect.missing}")
    result: dict[str, Any] = {
        "experiments": n,
        "tag_rows": expect.tag_rows,
        "gateway_experiments": expect.gateway,
        "rows_to_insert": expect.missing,
        "run": _batch_figures(runs),
        "runs": [_brief(r) for r in runs],
        "batch_trace": runs[0]["batch_trace"],
        "single_statement": {"rows": floors[0].rows, "seconds": [round(f.seconds, 4) for f in floors]},
        # Throughput ratio (same rows inserted): per side-by-side pair, then the median of the pairs.
        "batched_vs_single_statement_pairs": [
            _ratio(f.seconds, r["seconds"]) for f, r in zip(floors, runs, strict=True)
        ],
        "batched_vs_single_statement": round(
            statistics.median(f.seconds / r["seconds"] for f, r in zip(floors, runs, strict=True)), 3
        ),
        "finished_database": finished,
        **_yardstick_ratios(finished),
    }
    if offlines:
        result["offline_sql"] = {"rows": offlines[0].rows, "seconds": [round(f.seconds, 4) for f in offlines]}
        # Measured once, beside the first pair: against that pair's run and floor.
        result["batched_vs_offline_sql"] = _ratio(offlines[0].seconds, runs[0]["seconds"])
        result["offline_sql_vs_single_statement"] = _ratio(floors[0].seconds, offlines[0].seconds)
    plan.log(
        f"{tag} batched/single {result['batched_vs_single_statement']}, rerun/R1 {result['rerun_vs_R1']},"
        f" verify/R1 {result['verify_vs_R1']}"
    )
    if plan.load:
        with plan.phase(f"{b} load"):
            result["under_load"] = _under_load(server, source, expect.missing, plan)
        plan.log(f"{tag} under load: batch max {result['under_load']['run']['batch_seconds_max']}s")
    if shape == seed.SHAPES[0] and plan.sweep_batch_sizes:
        with plan.phase(f"{b} sweep"):
            result["sweep"] = _sweep(server, source, expect.missing, plan)
    if shape == seed.SHAPES[0] and plan.client_sample:
        with plan.phase(f"{b} (c)"):
            db = server.fresh(source, "client")
            client = measure.mlflow_client_loop(server.url_for(db), plan.client_sample)
            server.release(db)
        per_experiment = client["sample_seconds"] / client["sample_experiments"]
        total = per_experiment * (expect.gateway - expect.deleted_gateway)
        result["mlflow_client"] = {
            **client,
            "seconds_per_experiment": round(per_experiment, 5),
            "extrapolated_seconds": round(total, 1),
            "extrapolated_to": expect.gateway - expect.deleted_gateway,
            "note": "EXTRAPOLATED from the sample to every active gateway experiment; deleted ones cannot be "
            "tagged through MLflow's API at all, and deeper OFFSET pages would cost more than the sample's",
        }
        result["speedup_vs_mlflow_client"] = _ratio(total, result["run"]["seconds"])
    return result


def _finished(server: Server, db: str, plan: Plan) -> dict[str, dict[str, float]]:
    """(d), (e) and status on the finished database with the statistics the run left, then all of them with
    R0 and R1 on freshly analyzed statistics. SQLite keeps no statistics (MLflow never runs ANALYZE there,
    and without sqlite_stat1 the planner's choices never change): one state, with R0 and R1."""
    url = server.url_for(db)
    states = {}
    if server.family != "sqlite":
        states["as_left"] = measure.finished_database(url, plan.rounds, analyze_first=False)
    states["analyzed"] = measure.finished_database(url, plan.rounds, analyze_first=True)
    return {state: {k: round(v, 4) for k, v in medians.items()} for state, medians in states.items()}


def _yardstick_ratios(finished: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The rerun, verify and status against R1 on freshly analyzed statistics (the yardstick) and against R0;
    each in the worse of the two states (the run's statistics, or analyzed), with both states kept."""
    fresh = finished["analyzed"]
    out: dict[str, Any] = {"R1_vs_R0": _ratio(fresh["R1"], fresh["R0"])}
    for op in ("rerun", "verify", "status"):
        for ref in ("R1", "R0"):
            per_state = {state: _ratio(medians[op], fresh[ref]) for state, medians in finished.items()}
            out[f"{op}_vs_{ref}"] = max(per_state.values())
            out[f"{op}_vs_{ref}_by_state"] = per_state
    return out


def _under_load(server: Server, source: str, missing: int, plan: Plan) -> dict[str, Any]:
    """The run at its defaults beside the load; should it give up (exit 7: on SQLite a UI list holds the
    database's shared lock for longer than the default lock timeout), again with ``--lock-timeout 10``."""
    assert plan.load is not None
    result: dict[str, Any] = {"load": plan.load.describe()}
    try:
        return {**result, **_loaded_run(server, source, missing, plan, ())}
    except measure.RunFailed as exc:
        if exc.code != ExitCode.STOPPED:
            raise
        result["defaults_failed"] = exc.message
        plan.log(f"[{server.backend}] under load, at the defaults: {exc.message}")
    return {**result, **_loaded_run(server, source, missing, plan, ("--lock-timeout", "10"))}


def _loaded_run(server: Server, source: str, missing: int, plan: Plan, options: tuple[str, ...]) -> dict[str, Any]:
    assert plan.load is not None
    db = server.fresh(source, "load")
    url = server.url_for(db)
    try:
        with Load(url, plan.load) as load:
            with load.window() as alone:
                time.sleep(plan.load_alone_seconds)
            with load.window() as during:
                run = measure.backfill_subprocess(url, *options, variant=plan.variant)
    finally:
        server.release(db)
    if run["inserted"] != missing:
        raise RuntimeError(f"{server.backend} under load: the run inserted {run['inserted']}, expected {missing}")
    return {
        "options": list(options),
        "run": _batch_figures([run]),
        "batch_trace": run["batch_trace"],
        "load_alone": alone,
        "load_during_run": during,
    }


def _sweep(server: Server, source: str, missing: int, plan: Plan) -> list[dict[str, Any]]:
    """``run --fixed --batch-size N`` for each N, each over its own stretch of the walk (see
    measure.sweep_point); a fresh database whenever the one in use has too few rows left for the next N."""
    points = []
    db: str | None = None
    left = 0
    for size in plan.sweep_batch_sizes:
        need = min(missing, (plan.sweep_min_batches + 1) * size + 15_000)
        if db is None or left < need:
            if db is not None:
                server.release(db)
            db, left = server.fresh(source, f"sweep{size}"), missing
        point = measure.sweep_point(server.url_for(db), size, plan.sweep_min_batches, plan.sweep_min_seconds)
        if point is None:
            break
        left -= point["rows"] + size  # its first batch, not counted in the rate, took up to N more
        points.append(point)
        plan.log(f"[{server.backend} sweep] batch {size}: {point['rows_per_second']:,} rows/s")
    if db is not None:
        server.release(db)
    return points
