"""``python -m bench``: the backfill against the single-statement floor, on the data users really have.

Starts the server containers (tests/backends.py), seeds MLflow-schema databases of two shapes with
set-based SQL, measures every figure side by side on databases in the seeded state, prints a table and
writes JSON plus two plots. Containers are removed and bench databases dropped on the way out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import report
from bench.load import LoadSpec
from bench.servers import BACKENDS, servers, stop
from bench.suite import Plan, bench_backend

HERE = Path(__file__).resolve().parent
SWEEP = "500,2000,5000,20000"


def _ints(text: str) -> list[int]:
    return [int(v.replace("_", "")) for v in text.split(",") if v.strip()]


def _backends(text: str) -> list[str]:
    chosen = [b.strip() for b in text.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BACKENDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    return chosen


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark the backfill on every backend and on two shapes of data (3.10.0: no isGateway row; "
            "mixed: the newer half tagged): the batched run at its defaults (a) against one INSERT ... SELECT "
            "(b) and the --sql script (b'); the no-op rerun (d), verify (e) and status against one anti-join "
            "count (R1, and the old R0); the run beside an MLflow-like load; peak RSS and every batch's "
            "seconds; a fixed-batch-size sweep; MLflow's client loop on a sample, extrapolated (c). Prints a "
            "table, writes JSON and two PNG plots."
        ),
        epilog="`make bench` runs the defaults (about 14 min on 2 cores), `make bench-light` runs --light (about "
        "10 min; fewer --backends take less), `make bench-quick` runs --quick (about 2 min). Timings are noisy: "
        "compare the ratios, measured side by side, as their median and range over the pairs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backends", type=_backends, default=",".join(BACKENDS), help="comma-separated subset of backends")
    p.add_argument("--experiments", type=int, default=1_000_000, help="experiments per database")
    p.add_argument(
        "--pairs",
        type=int,
        default=3,
        help="side-by-side (a)/(b) pairs per shape, each from the seeded state, the order alternating; every "
        "ratio is reported as the median and range of the pairs",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds of (d), (e), R0, R1 on each pair's finished database"
    )
    p.add_argument("--no-offline", action="store_true", help="skip the --sql script's statements (b')")
    p.add_argument("--sweep-batch-sizes", type=_ints, default=SWEEP, help="fixed batch sizes of the sweep ('': none)")
    p.add_argument("--client-sample", type=int, default=50, help="experiments the MLflow client loop tags (0: skip)")
    p.add_argument("--load-writers", type=int, default=LoadSpec.writers, help="load: experiment creators")
    p.add_argument("--load-readers", type=int, default=LoadSpec.readers, help="load: UI list readers (0 and 0: none)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="development run: 20,000 experiments, no --sql script, a 2-point sweep, client sample 10, 1 s of "
        "load alone, output under bench/work/",
    )
    p.add_argument(
        "--light",
        action="store_true",
        help="only what the goals are judged on, at full size and with every pair: no --sql script (b'), no "
        "sweep, no MLflow client loop (c); output under bench/work/",
    )
    p.add_argument("--variant", help="apply a bench.variants prototype to the batched runs (see bench/variants.py)")
    p.add_argument("--output", type=Path, help="results JSON (default bench/results.json; --quick: bench/work/)")
    p.add_argument("--workdir", type=Path, default=HERE / "work", help="where SQLite databases and --quick output go")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.experiments, args.client_sample = 20_000, 10
        args.sweep_batch_sizes, args.no_offline = [500, 5000], True
    if args.light:
        args.sweep_batch_sizes, args.client_sample, args.no_offline = [], 0, True
    mode = "quick" if args.quick else "light" if args.light else args.variant
    out_dir = args.workdir if mode else HERE
    suffix = f"-{mode}" if mode else ""
    output = args.output or out_dir / f"results{suffix}.json"
    plots = {
        kind: output.parent / f"{name}{suffix}.png" for kind, name in (("sweep", "throughput"), ("batches", "batches"))
    }
    load = LoadSpec(writers=args.load_writers, readers=args.load_readers)
    plan = Plan(
        args.experiments,
        pairs=args.pairs,
        rounds=args.rounds,
        offline=not args.no_offline,
        sweep_batch_sizes=tuple(args.sweep_batch_sizes),
        client_sample=args.client_sample,
        load=load if load.writers or load.readers else None,
        load_alone_seconds=1.0 if args.quick else 5.0,
        variant=args.variant,
    )
    plan.log = lambda line: print(line, file=sys.stderr, flush=True)
    started = time.monotonic()
    results: dict[str, dict] = {}
    versions: dict[str, str] = {}

    def save(complete: bool) -> None:
        """The results so far, written whole (after every shape: a later crash keeps them)."""
        elapsed = time.monotonic() - started
        report.write_json(
            output,
            results,
            {
                "complete": complete,
                "machine": report.machine(versions),
                "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "load": plan.load.describe() if plan.load else None,
                "elapsed_seconds": round(elapsed, 1),
                "phase_seconds": {k: round(v, 1) for k, v in plan.phases.items()},
            },
        )

    with servers(args.backends, args.workdir) as started_servers:
        plan.phases["servers started"] = time.monotonic() - started
        plan.log(f"servers started in {plan.phases['servers started']:.0f}s")
        for name, server in started_servers.items():
            versions[name] = server.describe()
            results[name] = report.summarize(versions[name], {}, plan)
            for shape, figures in bench_backend(server, plan):
                results[name]["shapes"][shape] = report.judge(figures)
                save(complete=False)
            stop(server)
            plan.log(f"[{name}] done at {(time.monotonic() - started) / 60:.1f} min")
    save(complete=True)
    elapsed = time.monotonic() - started
    written = [output, plots["batches"]]
    report.plot_batches(plots["batches"], results, args.experiments)
    if report.plot_sweep(plots["sweep"], results, args.experiments):
        written.append(plots["sweep"])
    print(report.table(results))
    print(f"\n{', '.join(map(str, written))} written; {elapsed / 60:.1f} min")
    failed = [f"{b} {s}" for b, r in results.items() for s, figures in r["shapes"].items() if "error" in figures]
    if failed:
        print(f"failed (see 'error' in {output}): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
