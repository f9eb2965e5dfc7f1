"""``python -m bench.sqlite_load``: which settings let `run` finish on SQLite beside a busy MLflow UI.

SQLite has one writer at a time, and in the rollback-journal mode that MLflow's databases are in (MLflow
sets no ``journal_mode``, and SQLite's default is ``delete``) a writer's COMMIT also waits until no reader
holds the database: the UI's experiment list on a 1M-experiment database reads for seconds. This runs
`run` on copies of one seeded database beside the MLflow-like load (bench.load), under each setting in
turn, ``--runs`` times each, the settings interleaved (run 1 of every setting, then run 2, ...) so that a
drift in the machine's speed weighs on all alike. A setting whose first two runs both gave up is not run
again (it clearly fails). Each run is bounded by ``--limit`` seconds (then stopped by SIGTERM, resumably).

Per run: exit code, seconds, rows inserted, the longest batch, and the load's latencies and errors during
the run; per setting: how many runs finished, and the median and range of each figure. Writes JSON and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import measure, seed
from bench.load import Load, LoadSpec
from bench.servers import Server
from bench.spread import fmt, spread
from bench.suite import describe_gave_up, gave_up, lock_timeout

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Setting:
    name: str
    options: tuple[str, ...] = ()
    journal_mode: str = "delete"  # the copy's journal mode before the load starts (MLflow's: delete)
    ui_readers: bool = True  # False: the load's writers only (nobody has the UI's experiment list open)


SETTINGS = {
    s.name: s
    for s in (
        Setting("defaults"),
        Setting("lock-timeout 10", ("--lock-timeout", "10")),
        Setting("lock-timeout 30", ("--lock-timeout", "30")),
        Setting("lock-timeout 10, sleep 1", ("--lock-timeout", "10", "--sleep", "1")),
        Setting("lock-timeout 10, target 0.05 s", ("--lock-timeout", "10", "--target-batch-seconds", "0.05")),
        Setting("WAL, defaults", (), "wal"),
        Setting("defaults, UI idle (the load's writers only)", ui_readers=False),
    )
}


def one_run(server: Server, source: str, setting: Setting, missing: int, spec: LoadSpec, limit: float) -> dict:
    """`run` under ``setting`` on a fresh copy beside the load (5 s of load alone first)."""
    db = server.fresh(source, "load")
    url = server.url_for(db)
    spec = spec if setting.ui_readers else replace(spec, readers=0)
    try:
        mode = measure.journal_mode(url, setting.journal_mode)
        failed: measure.RunFailed | None = None
        report: dict[str, Any] = {}
        with Load(url, spec) as load:
            with load.window() as alone:
                time.sleep(5)
            with load.window() as during:
                try:
                    report = measure.backfill_subprocess(url, *setting.options, limit=limit)
                except measure.RunFailed as exc:
                    failed = exc
        out: dict[str, Any] = {
            "journal_mode": mode,
            "load": spec.describe(),
            "load_alone": alone,
            "load_during_run": during,
        }
        if failed is not None:
            return {**out, "finished": False, "gave_up": gave_up(failed, url, setting.options, missing)}
        return {
            **out,
            "finished": True,
            "exit": 0,
            "seconds": report["process_seconds"],  # the whole process: its set-up waits for the lock too
            "rows_done": report["inserted"],
            "batches": report["batches"],
            "batch_seconds_max": report["batch_seconds_max"],
        }
    finally:
        server.release(db)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A setting's runs: how many finished, and each figure's spread (bench.spread)."""
    done = [r for r in runs if r["finished"]]

    def load(window: str, kind: str) -> dict[str, Any]:
        return spread([r[window][kind]["p99"] for r in runs])

    def creates_per_second(window: str) -> dict[str, Any]:
        return spread([r[window]["create"]["count"] / r[window]["seconds"] for r in runs], 1)

    return {
        "runs": len(runs),
        "finished": len(done),
        "seconds": spread([r["seconds"] for r in done], 1),
        "batch_seconds_max": spread([r["batch_seconds_max"] for r in done]),
        "rows_done_when_gave_up": spread([r["gave_up"]["rows_done"] for r in runs if not r["finished"]], 0),
        "list_p99_alone": load("load_alone", "list"),
        "list_p99_during": load("load_during_run", "list"),
        "create_p99_alone": load("load_alone", "create"),
        "create_p99_during": load("load_during_run", "create"),
        "creates_per_second_alone": creates_per_second("load_alone"),
        "creates_per_second_during": creates_per_second("load_during_run"),
        "load_errors_during": spread([len(r["load_during_run"]["errors"]) for r in runs], 0),
    }


def table(settings: dict[str, dict[str, Any]], missing: int) -> str:
    """Markdown: one row per setting; each figure ``median (min-max)`` over its runs."""
    rows = [
        "| setting | finished | `run` seconds (whole process) | longest batch, s | runs that gave up"
        " | UI list p99 s, alone / during | create experiment p99 s, alone / during"
        " | experiments created per s, alone / during |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in settings.items():
        summary = s["summary"]
        gave = [describe_gave_up(r["gave_up"]) for r in s["runs"] if not r["finished"]]

        def pair(key: str, digits: int = 1, summary: dict[str, Any] = summary) -> str:
            return f"{fmt(summary[key + '_alone'], digits)} / {fmt(summary[key + '_during'], digits)}"

        rows.append(
            f"| {name} | {summary['finished']} of {summary['runs']} | {fmt(summary['seconds'], 1)}"
            f" | {fmt(summary['batch_seconds_max'], 2)} | {'; '.join(gave) or '-'}"
            f" | {pair('list_p99')} | {pair('create_p99', 2)} | {pair('creates_per_second')} |"
        )
    return "\n".join(rows) + f"\n\n{missing:,} rows to insert per run."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sqlite_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", type=int, default=1_000_000)
    p.add_argument("--shape", choices=seed.SHAPES, default="mixed")
    p.add_argument("--runs", type=int, default=3, help="runs per setting")
    p.add_argument("--limit", type=float, default=150.0, help="seconds a run may take before it is stopped")
    p.add_argument("--setting", action="append", choices=list(SETTINGS), help="repeatable; default: all")
    p.add_argument("--workdir", type=Path, default=HERE / "work")
    p.add_argument("--output", type=Path, default=HERE / "work" / "sqlite-load.json")
    args = p.parse_args(argv)
    chosen = [SETTINGS[name] for name in args.setting or SETTINGS]
    spec = LoadSpec()
    server = Server("sqlite", args.workdir)
    expect = seed.expected(args.experiments, args.shape)
    results: dict[str, dict[str, Any]] = {s.name: {"options": list(s.options), "runs": []} for s in chosen}
    started = time.monotonic()
    try:
        source, _ = server.seeded(args.experiments, seed.SHAPES[0])
        if args.shape != seed.SHAPES[0]:
            source, _ = server.seeded(args.experiments, args.shape, source)
        for i in range(args.runs):
            for setting in chosen:
                runs = results[setting.name]["runs"]
                if i >= 2 and not any(r["finished"] for r in runs):
                    continue  # its first two runs both gave up
                run = one_run(server, source, setting, expect.missing, spec, args.limit)
                runs.append(run)
                outcome = (
                    f"{run['seconds']:.1f}s, longest batch {run['batch_seconds_max']:.2f}s"
                    if run["finished"]
                    else f"{describe_gave_up(run['gave_up'])}: {run['gave_up']['message']}"
                )
                print(f"[{setting.name}] run {i + 1}: {outcome}", file=sys.stderr, flush=True)
                results[setting.name]["summary"] = summarize(runs)
                results[setting.name]["lock_timeout"] = lock_timeout(setting.options)
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(
                    json.dumps(
                        {
                            "experiments": args.experiments,
                            "shape": args.shape,
                            "rows_to_insert": expect.missing,
                            "load": spec.describe(),
                            "sqlite": server.describe(),
                            "elapsed_seconds": round(time.monotonic() - started, 1),
                            "settings": results,
                        },
                        indent=1,
                    )
                    + "\n"
                )
    finally:
        server.drop_all()
    print(table(results, expect.missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
