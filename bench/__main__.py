"""``python -m bench``: the backfill against the single-statement floor and MLflow's client loop.

Starts the PostgreSQL / MariaDB containers (tests/backends.py), seeds MLflow-schema databases with
set-based SQL, measures every figure side by side on identical fresh copies, prints a table and writes
JSON plus a throughput plot. Containers are stopped and bench databases dropped on the way out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import report
from bench.servers import BACKENDS, servers
from bench.suite import Plan, bench_size

HERE = Path(__file__).resolve().parent
SWEEP = "250,500,1000,2000,5000,10000,20000,50000"


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
            "Benchmark the backfill on SQLite, PostgreSQL and MariaDB: the batched run at default settings (a) "
            "against one INSERT ... SELECT (b) and the offline --sql script (b'), against MLflow's client loop "
            "on a sample, extrapolated (c); the no-op rerun (d) and verify (e) against one anti-join count; "
            "peak RSS and batch times; a fixed-batch-size sweep. Prints a table, writes JSON and a PNG plot."
        ),
        epilog="Headline ratios are taken at the largest size; `make bench` runs the defaults (about 12 min "
        "on 2 cores), `make bench-quick` runs --quick (about 2 min). Timings are noisy: compare ratios.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backends", type=_backends, default=",".join(BACKENDS), help="comma-separated subset of backends")
    p.add_argument("--sizes", type=_ints, default="100000,1000000", help="experiments per database, comma-separated")
    p.add_argument(
        "--sweep-size", type=int, default=1_000_000, help="experiments for the fixed-batch-size sweep (0: none)"
    )
    p.add_argument(
        "--sweep-batch-sizes", type=_ints, default=SWEEP, help="fixed batch sizes of the sweep, comma-separated"
    )
    p.add_argument("--client-sample", type=int, default=300, help="experiments the MLflow client loop tags (0: skip)")
    p.add_argument("--repeat", type=int, default=2, help="back-to-back (single statement, batched run) pairs per size")
    p.add_argument(
        "--quick",
        action="store_true",
        help="development run: sizes 2000,10000, sweep at 10000, client sample 100, repeat 1, output under bench/work/",
    )
    p.add_argument("--variant", help="apply a bench.variants prototype to the batched runs (see bench/variants.py)")
    p.add_argument("--output", type=Path, help="results JSON (default bench/results.json; --quick: bench/work/)")
    p.add_argument("--plot", type=Path, help="throughput plot PNG (default bench/throughput.png; --quick: bench/work/)")
    p.add_argument("--workdir", type=Path, default=HERE / "work", help="where SQLite databases are made")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.sizes, args.sweep_size, args.client_sample, args.repeat = [2_000, 10_000], 10_000, 100, 1
    out_dir = args.workdir if args.quick or args.variant else HERE
    suffix = "-quick" if args.quick else (f"-{args.variant}" if args.variant else "")
    output = args.output or out_dir / f"results{suffix}.json"
    plot = args.plot or out_dir / f"throughput{suffix}.png"
    sizes = sorted(set(args.sizes) | ({args.sweep_size} if args.sweep_size else set()))
    plan = Plan(sizes, args.sweep_size or None, args.sweep_batch_sizes, args.client_sample, args.repeat, args.variant)
    plan.log = lambda line: print(line, file=sys.stderr, flush=True)
    started = time.monotonic()
    results, versions = {}, {}
    with servers(args.backends, args.workdir) as started_servers:
        for name, server in started_servers.items():
            versions[name] = server.describe()
            by_size = {n: bench_size(server, n, plan) for n in sizes}
            results[name] = report.summarize(name, versions[name], by_size, args.client_sample)
    elapsed = time.monotonic() - started
    extra = {
        "machine": report.machine(versions),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "elapsed_seconds": round(elapsed, 1),
        "phase_seconds": {k: round(v, 1) for k, v in plan.phases.items()},
    }
    report.write_json(output, results, extra)
    report.plot(plot, results)
    print(report.table(results))
    print(f"\n{output} and {plot} written; {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
