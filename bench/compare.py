"""``python -m bench.compare REF``: this checkout's `run` against the same command of an earlier commit.

What a change costs on a direct connection, measured side by side: one seeded database per backend (the
benchmark's, :mod:`bench.servers`), then ``--pairs`` pairs of ``run --json -q`` at the defaults, one by
this checkout's package and one by REF's (exported with ``git archive``), each on a fresh copy of the seed,
the order alternating from one pair to the next. Each pair gives the ratio *this / REF* of the run's own
seconds (the walk, from its ``--json`` report) and of the whole process (start-up, connection, set-up
checks, lock, walk); the table shows their median and range. A ratio whose range straddles 1 is noise.

Both sides run in this interpreter (the same driver and SQLAlchemy versions); only the package differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from bench.measure import REPO as _REPO
from bench.servers import BACKENDS, servers, stop
from bench.spread import fmt, spread

REPO = Path(_REPO)


def export(ref: str, workdir: Path) -> tuple[str, Path]:
    """REF's ``backfill`` package in ``workdir``; returns (its full commit id, the directory to import from)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    root = workdir / f"baseline-{commit[:12]}"
    if not (root / "backfill").is_dir():
        archive = subprocess.run(["git", "archive", commit, "backfill"], cwd=REPO, capture_output=True, check=True)
        with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
            tar.extractall(root, filter="data")
    return commit, root


def timed_run(url: str, root: Path) -> dict[str, float]:
    """``python -m backfill run`` with ``root``'s package; the walk's seconds and the process's."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "backfill", "run", "--database-url", url, "--json", "-q"]
    t0 = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{root}: exit {result.returncode}: {result.stderr.strip()[-500:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"walk": float(report["seconds"]), "process": wall, "inserted": report["inserted"]}


def compare(backend: str, server: Any, base: Path, n: int, shape: str, pairs: int) -> dict[str, Any]:
    source, _ = server.seeded(n, shape)
    sides = [("head", REPO), ("base", base)]
    runs: list[dict[str, dict[str, float]]] = []
    for i in range(pairs):
        pair: dict[str, dict[str, float]] = {}
        for label, root in sides if i % 2 == 0 else sides[::-1]:
            name = server.fresh(source, label)
            try:
                pair[label] = timed_run(server.url_for(name), root)
            finally:
                server.release(name)
        assert pair["head"]["inserted"] == pair["base"]["inserted"], pair
        runs.append(pair)
        print(f"{backend} pair {i + 1}: {json.dumps(pair)}", file=sys.stderr)
    return {
        "inserted": runs[0]["head"]["inserted"],
        "walk": spread([p["head"]["walk"] / p["base"]["walk"] for p in runs]),
        "process": spread([p["head"]["process"] / p["base"]["process"] for p in runs]),
        "pairs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ref", help="the commit (or tag, or branch) to compare this checkout with")
    parser.add_argument("--backends", default="sqlite,postgresql,mysql,mariadb", help="(default: %(default)s)")
    parser.add_argument("--experiments", type=int, default=1_000_000, help="per database (default: %(default)s)")
    parser.add_argument("--shape", default="3.10.0", choices=("3.10.0", "mixed"), help="(default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=5, help="side-by-side pairs per backend (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "compare.json", help="(default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "work", help="(default: %(default)s)")
    args = parser.parse_args()
    backends = args.backends.split(",")
    if unknown := sorted(set(backends) - set(BACKENDS)):
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    if args.pairs < 3:
        parser.error("--pairs must be at least 3: a ratio is a median and range of pairs")
    args.workdir.mkdir(parents=True, exist_ok=True)
    commit, base = export(args.ref, args.workdir)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {}
    with servers(backends, args.workdir) as started:
        for backend, server in started.items():
            results[backend] = compare(backend, server, base, args.experiments, args.shape, args.pairs)
            stop(server)
    options = {"experiments": args.experiments, "shape": args.shape, "pairs": args.pairs}
    args.output.write_text(json.dumps({"head": head, "base": commit, **options, "backends": results}, indent=1) + "\n")
    title = f"this checkout / {commit[:7]}, {args.experiments:,} experiments, shape {args.shape}"
    print(f"| {title} | run's walk | whole process |")
    print("|---|---|---|")
    for backend, r in results.items():
        print(f"| {backend} ({r['inserted']:,} rows) | {fmt(r['walk'])} | {fmt(r['process'])} |")


if __name__ == "__main__":
    main()
