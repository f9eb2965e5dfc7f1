"""The benchmark's plan: which measurement runs on which fresh database, per backend and shape.

Per shape (``3.10.0``, then ``mixed``, made from it), on databases in the seeded state (``Server.fresh``):

1. ``pairs`` side-by-side pairs of the batched run at its defaults (a) and the single-statement floor (b),
   with the ``--sql`` script's statements (b') in each pair when asked for; each pair mirrors the one before
   (a b b', b' b a, ...: a drift in the machine's speed weighs on both sides alike), and each measurement
   starts from the seeded state (a copy, or on the MySQL family the source reset);
2. on each pair's finished database (right after its run), interleaved rounds of the no-op rerun (d),
   ``verify`` (e) and ``status``, first with the statistics as the run left them, then freshly analyzed and
   interleaved with the reference counts R0 and R1; the rounds' order alternates from one pair to the next;
3. the run again while an MLflow-like load (bench.load) reads and writes the same tables, the load's
   latencies taken alone first and then during the run (once; should it give up, once more as
   under_load_tries says);
4. on the 3.10.0 shape: the fixed-batch-size sweep and the MLflow client loop (c).

Every ratio is a spread (bench.spread) over the pairs. A run that gives up (exits non-zero: a lock it could
not get within its retries) is recorded, with its exit code, the rows it inserted, the lock timeout it had
and its message, and the bench goes on; so does it after any other failure of one shape (recorded as
``error``).
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from backfill.retry import Timeouts
from bench import measure, seed
from bench.load import Load, LoadSpec
from bench.servers import Server
from bench.spread import spread


@dataclass(frozen=True)
class Try:
    """How the run beside the load is tried: the tool's options, and on SQLite the database's journal mode
    (None: as MLflow left it, the rollback journal)."""

    options: tuple[str, ...] = ()
    journal_mode: str | None = None


def under_load_tries(family: str) -> tuple[Try, ...]:
    """At the defaults first; should that give up, the next try. SQLite: the database in WAL mode (in MLflow's
    rollback-journal mode a busy UI's readers keep every writer waiting, and no lock timeout, sleep or
    batch target got `run` through: bench/sqlite-load.json); the servers: a longer lock timeout."""
    return (Try(), Try(journal_mode="wal")) if family == "sqlite" else (Try(), Try(("--lock-timeout", "10")))


@dataclass
class Plan:
    experiments: int
    shapes: tuple[str, ...] = seed.SHAPES
    pairs: int = 3  # side-by-side (a)/(b) pairs per shape
    rounds: int = 1  # interleaved rounds on each pair's finished database, per statistics state
    offline: bool = True  # measure (b') in each pair
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


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def lock_timeout(options: tuple[str, ...] | list[str]) -> float:
    """The ``--lock-timeout`` a run was given (the tool's default when none)."""
    options = list(options)
    return float(options[options.index("--lock-timeout") + 1]) if "--lock-timeout" in options else Timeouts.lock


def gave_up(
    exc: measure.RunFailed, url: str, options: tuple[str, ...], missing: int, journal_mode: str | None = None
) -> dict[str, Any]:
    """What a run that gave up leaves in the results: call it once no one else writes (after the load)."""
    return {
        "exit": exc.code,
        "rows_done": missing - measure.missing_rows(url),
        "rows_to_insert": missing,
        "lock_timeout": lock_timeout(options),
        "options": list(options),
        **({"journal_mode": journal_mode} if journal_mode else {}),
        "message": exc.message,
        "seconds": round(exc.seconds, 2),
    }


def describe_gave_up(record: dict[str, Any]) -> str:
    """``gave up (exit 7) at --lock-timeout 10, 41,000 of 50,000 rows``."""
    mode = f" in {record['journal_mode'].upper()} mode" if record.get("journal_mode") else ""
    return (
        f"gave up (exit {record['exit']}) at --lock-timeout {record['lock_timeout']:g}{mode}, "
        f"{record['rows_done']:,} of {record['rows_to_insert']:,} rows"
    )


def _batch_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the goals are judged on, each a spread over the runs (None where a run gave up)."""

    def each(get: Callable[[dict[str, Any]], float | None], digits: int = 3) -> dict[str, Any]:
        return spread([None if "gave_up" in r else get(r) for r in runs], digits)

    keys = ("seconds", "batches", "batch_seconds_p50", "batch_seconds_p99", "batch_seconds_max", "peak_rss_mb")
    figures: dict[str, Any] = {k: each(lambda r, k=k: r[k]) for k in keys}
    for k in ("rss_mb_after_first_batch", "rss_mb_after_last_batch"):
        figures[k] = each(lambda r, k=k: r[k], 1)
    # Flat: the RSS after the last batch over the RSS after the first one, per run.
    figures["rss_growth"] = each(lambda r: _ratio(r["rss_mb_after_last_batch"], r["rss_mb_after_first_batch"]))
    return figures


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "batch_trace"}


def bench_backend(server: Server, plan: Plan) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every measurement on one backend, shape after shape: yields each shape's figures as soon as they are
    there (the caller writes them out), or its ``error`` when it failed (the bench goes on)."""
    previous: str | None = None
    for shape in plan.shapes:
        source: str | None = None
        try:
            if previous is None and shape != plan.shapes[0]:
                raise RuntimeError(f"no source: seeding the {plan.shapes[0]} shape failed")
            with plan.phase(f"{server.backend} seed"):
                source, seconds = server.seeded(plan.experiments, shape, previous)
            plan.log(f"[{server.backend} {shape}] source ready in {seconds:.1f}s")
            result = bench_shape(server, source, shape, plan)
            result["seed_seconds"] = round(seconds, 1)
        except Exception as exc:  # noqa: BLE001 - recorded; the other shapes and backends go on
            plan.log(f"[{server.backend} {shape}] failed: {type(exc).__name__}: {exc}")
            result = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        previous = source or previous
        yield shape, result


def attempt(url: str, options: tuple[str, ...], missing: int, variant: str | None) -> dict[str, Any]:
    """The batched run; a RunFailed propagates (the caller records it once nothing else writes)."""
    run = measure.backfill_subprocess(url, *options, variant=variant)
    if run["inserted"] != missing:
        raise RuntimeError(f"the run inserted {run['inserted']} rows, expected {missing}")
    return run


def bench_shape(server: Server, source: str, shape: str, plan: Plan) -> dict[str, Any]:
    b, n = server.backend, plan.experiments
    expect = seed.expected(n, shape)
    tag = f"[{b} {shape}]"
    pairs: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []  # per pair: the run's report, or {"gave_up": ...}
    finished: list[dict[str, dict[str, float]] | None] = []  # per pair: medians per state and operation

    def floor(pair: dict[str, Any], offline: bool) -> None:
        db = server.fresh(source, "offline" if offline else "single")
        try:
            timed = measure.single_statement(server.url_for(db), offline)
        finally:
            server.release(db)
        if timed.rows != expect.missing:
            raise RuntimeError(f"{'--sql script' if offline else 'single'} inserted {timed.rows}, not {expect.missing}")
        pair["offline_sql_seconds" if offline else "single_statement_seconds"] = round(timed.seconds, 4)

    def run(pair: dict[str, Any], i: int) -> None:
        db = server.fresh(source, "run")
        url = server.url_for(db)
        try:
            try:
                report = attempt(url, (), expect.missing, plan.variant)
            except measure.RunFailed as exc:
                runs.append({"gave_up": gave_up(exc, url, (), expect.missing)})
                finished.append(None)
                pair["run_seconds"] = None
                return
            runs.append(report)
            pair["run_seconds"] = report["seconds"]
            with plan.phase(f"{b} (d)+(e)"):
                finished.append(_finished(server, db, plan, i))
        finally:
            server.release(db)

    with plan.phase(f"{b} (a)+(b)"):
        for i in range(plan.pairs):
            pair: dict[str, Any] = {}
            steps = ["run", "single", *(["offline"] if plan.offline else [])]
            pair["order"] = steps if i % 2 == 0 else steps[::-1]
            for step in pair["order"]:
                if step == "run":
                    run(pair, i)
                else:
                    floor(pair, offline=step == "offline")
            pairs.append(pair)
            last = runs[-1]
            plan.log(
                f"{tag} pair {i + 1}/{plan.pairs} ({' '.join(pair['order'])}): "
                + (f"run {last['seconds']:.2f}s" if "gave_up" not in last else describe_gave_up(last["gave_up"]))
                + f", single {pair['single_statement_seconds']:.2f}s"
                + (f", --sql script {pair['offline_sql_seconds']:.2f}s" if plan.offline else "")
            )
    done = [r for r in runs if "gave_up" not in r]
    result: dict[str, Any] = {
        "experiments": n,
        "tag_rows": expect.tag_rows,
        "gateway_experiments": expect.gateway,
        "rows_to_insert": expect.missing,
        "pairs": pairs,
        "run": _batch_figures(runs),
        "runs": [_brief(r) for r in runs],
        "batch_trace": done[0]["batch_trace"] if done else [],
        "single_statement": {"rows": expect.missing, "seconds": [p["single_statement_seconds"] for p in pairs]},
        # Throughput ratio (same rows inserted): one per side-by-side pair.
        "batched_vs_single_statement": spread([_ratio(p["single_statement_seconds"], p["run_seconds"]) for p in pairs]),
        "finished_database": finished,
        **_yardstick_ratios(finished),
    }
    if len(done) < len(runs):
        result["gave_up"] = [r["gave_up"] for r in runs if "gave_up" in r]
    if plan.offline:
        result["offline_sql"] = {"rows": expect.missing, "seconds": [p["offline_sql_seconds"] for p in pairs]}
        result["batched_vs_offline_sql"] = spread([_ratio(p["offline_sql_seconds"], p["run_seconds"]) for p in pairs])
        result["offline_sql_vs_single_statement"] = spread(
            [_ratio(p["single_statement_seconds"], p["offline_sql_seconds"]) for p in pairs]
        )
    plan.log(
        f"{tag} batched/single {_brief_spread(result['batched_vs_single_statement'])},"
        f" rerun/R1 {_brief_spread(result['rerun_vs_R1'])}, verify/R1 {_brief_spread(result['verify_vs_R1'])}"
    )
    if plan.load:
        with plan.phase(f"{b} load"):
            result["under_load"] = _under_load(server, source, expect.missing, plan)
        load_run = result["under_load"].get("run")
        plan.log(
            f"{tag} under load: "
            + (
                f"batch max {load_run['batch_seconds_max']['median']}s"
                if load_run
                else describe_gave_up(result["under_load"]["gave_up"])
            )
        )
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
        median_run = result["run"]["seconds"]["median"]
        result["speedup_vs_mlflow_client"] = spread([_ratio(total, median_run)], 1)
    return result


def _brief_spread(figure: dict[str, Any]) -> str:
    return f"{figure['median']} ({figure['min']}-{figure['max']})" if figure["n"] > 1 else str(figure["median"])


def _finished(server: Server, db: str, plan: Plan, pair: int) -> dict[str, dict[str, float]]:
    """(d), (e) and status on a pair's finished database with the statistics the run left, then all of them
    with R0 and R1 on freshly analyzed statistics; medians per state and operation. SQLite keeps no
    statistics (MLflow never runs ANALYZE there, and without sqlite_stat1 the planner's choices never
    change): one state, with R0 and R1. The rounds' order alternates across pairs."""
    url = server.url_for(db)
    first = pair * plan.rounds
    states = {}
    if server.family != "sqlite":
        states["as_left"] = measure.finished_database(url, plan.rounds, analyze_first=False, first=first)
    states["analyzed"] = measure.finished_database(url, plan.rounds, analyze_first=True, first=first)
    return {
        state: {op: round(statistics.median(times), 4) for op, times in ops.items()} for state, ops in states.items()
    }


def _yardstick_ratios(finished: list[dict[str, dict[str, float]] | None]) -> dict[str, Any]:
    """The rerun, verify and status against R1 on freshly analyzed statistics (the yardstick) and against R0,
    per pair; each pair's in the worse of the two states (the run's statistics, or analyzed), with both
    states kept. Each a spread over the pairs."""

    def per_pair(f: dict[str, dict[str, float]]) -> dict[str, Any]:
        fresh = f["analyzed"]
        out: dict[str, Any] = {"R1_vs_R0": _ratio(fresh["R1"], fresh["R0"])}
        for op in ("rerun", "verify", "status"):
            for ref in ("R1", "R0"):
                by_state = {state: _ratio(medians[op], fresh[ref]) for state, medians in f.items()}
                out[f"{op}_vs_{ref}"] = max(v for v in by_state.values() if v is not None)
                out[f"{op}_vs_{ref}_by_state"] = by_state
        return out

    ratios = [per_pair(f) if f else None for f in finished]
    states = next((list(f) for f in finished if f), ["analyzed"])
    result: dict[str, Any] = {"R1_vs_R0": spread([r["R1_vs_R0"] if r else None for r in ratios])}
    for op in ("rerun", "verify", "status"):
        for ref in ("R1", "R0"):
            key = f"{op}_vs_{ref}"
            result[key] = spread([r[key] if r else None for r in ratios])
            result[f"{key}_by_state"] = {
                state: spread([r[f"{key}_by_state"][state] if r else None for r in ratios]) for state in states
            }
    return result


def _under_load(server: Server, source: str, missing: int, plan: Plan) -> dict[str, Any]:
    """The run at its defaults beside the load; should it give up, the next of under_load_tries. Each try
    that gave up is recorded (``tries``: every one; ``gave_up``: the last, when none finished)."""
    assert plan.load is not None
    result: dict[str, Any] = {"load": plan.load.describe(), "tries": []}
    for how in under_load_tries(server.family):
        outcome = _loaded_run(server, source, missing, plan, how)
        if "gave_up" not in outcome:
            return {**result, **outcome}
        record = outcome["gave_up"]
        result["tries"].append(record)
        plan.log(f"[{server.backend}] under load: {describe_gave_up(record)}: {record['message']}")
        result.update(outcome)
    return result


def _loaded_run(server: Server, source: str, missing: int, plan: Plan, how: Try) -> dict[str, Any]:
    assert plan.load is not None
    db = server.fresh(source, "load")
    url = server.url_for(db)
    failed: measure.RunFailed | None = None
    try:
        if how.journal_mode:
            measure.journal_mode(url, how.journal_mode)
        with Load(url, plan.load) as load:
            with load.window() as alone:
                time.sleep(plan.load_alone_seconds)
            with load.window() as during:
                try:
                    run = attempt(url, how.options, missing, plan.variant)
                except measure.RunFailed as exc:
                    failed = exc
        figures: dict[str, Any] = {"options": list(how.options), "load_alone": alone, "load_during_run": during}
        if how.journal_mode:
            figures["journal_mode"] = how.journal_mode
        if failed is not None:  # counted once the load has stopped
            return {**figures, "gave_up": gave_up(failed, url, how.options, missing, how.journal_mode)}
    finally:
        server.release(db)
    return {**figures, "run": _batch_figures([run]), "batch_trace": run["batch_trace"]}


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
