"""What the benchmark hands back: per-backend headline ratios and goals, a terminal table, JSON and a plot."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# The goals (benchmark goals, not test assertions).
GOAL_RATIO = 0.8  # batched throughput / single-statement throughput, at default settings
GOAL_MAX_BATCH = 0.25  # seconds, the longest batch transaction
GOAL_RSS_MB = 100.0  # peak RSS at the largest size
GOAL_RSS_FLAT = 1.10  # largest-size RSS at most 10% above smallest-size RSS
GOAL_RERUN = 2.0  # no-op rerun / one anti-join count


def summarize(backend: str, server: str, by_size: dict[int, dict[str, Any]], client_sample: int) -> dict[str, Any]:
    """The headline figures of one backend: ratios at the largest size, RSS at every size, goals."""
    sizes = sorted(by_size)
    top = by_size[sizes[-1]]
    rss = {str(n): by_size[n]["run"]["peak_rss_mb"] for n in sizes}
    sweep = next((by_size[n]["sweep"] for n in sizes if by_size[n]["sweep"]), None)
    run = top["run"]
    summary = {
        "server": server,
        "sizes": {"experiments": sizes, "client_sample": client_sample, "headline_at": sizes[-1]},
        "batched_vs_single_statement": top["batched_vs_single_statement"],
        "batched_vs_offline_sql": top["batched_vs_offline_sql"],
        "speedup_vs_mlflow_client": top["speedup_vs_mlflow_client"],
        "speedup_vs_mlflow_client_is_extrapolated": True,
        "rerun_seconds_vs_single_statement": top["rerun_seconds_vs_single_statement"],
        "verify_seconds_vs_single_statement": top["verify_seconds_vs_single_statement"],
        "peak_rss_mb": rss,
        "max_batch_seconds": run["batch_seconds_max"],
        "batch_seconds": {k: run[f"batch_seconds_{k}"] for k in ("p50", "p99", "max")},
        "batches": run["batches"],
        "by_size": {str(n): {k: v for k, v in by_size[n].items() if k != "sweep"} for n in sizes},
        "sweep": {"experiments": next((n for n in sizes if by_size[n]["sweep"]), None), "points": sweep},
    }
    smallest, largest = rss[str(sizes[0])], rss[str(sizes[-1])]
    summary["goals"] = {
        f"batched_vs_single_statement >= {GOAL_RATIO}": summary["batched_vs_single_statement"] >= GOAL_RATIO,
        f"max_batch_seconds < {GOAL_MAX_BATCH}": (run["batch_seconds_max"] or 0) < GOAL_MAX_BATCH,
        f"peak_rss_mb < {GOAL_RSS_MB:g} at {sizes[-1]}": largest < GOAL_RSS_MB,
        f"peak_rss flat from {sizes[0]} to {sizes[-1]} (<= +{GOAL_RSS_FLAT - 1:.0%})": largest
        <= smallest * GOAL_RSS_FLAT,
        f"rerun <= {GOAL_RERUN:g}x one anti-join count": summary["rerun_seconds_vs_single_statement"] <= GOAL_RERUN,
    }
    return summary


def machine(servers: dict[str, str]) -> dict[str, Any]:
    """Where the figures were measured."""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain", "backfill"], capture_output=True, text=True).stdout
        )
    except OSError:
        commit, dirty = "", False
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "servers": servers,
        "git_commit": commit + ("+dirty backfill/" if dirty else ""),
    }


def write_json(path: Path, backends: dict[str, Any], extra: dict[str, Any]) -> None:
    data = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra, "backends": backends}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table(backends: dict[str, Any]) -> str:
    """The headline ratios, one column per backend."""
    names = list(backends)
    rows: list[tuple[str, list[str]]] = [
        ("experiments (headline size)", [f"{b['sizes']['headline_at']:,}" for b in backends.values()]),
        ("batched / single statement (>= 0.8)", [_fmt(b["batched_vs_single_statement"]) for b in backends.values()]),
        ("batched / offline --sql script", [_fmt(b["batched_vs_offline_sql"]) for b in backends.values()]),
        (
            "speedup vs MLflow client (extrapolated)",
            [_fmt(b["speedup_vs_mlflow_client"], 0) for b in backends.values()],
        ),
        (
            "no-op rerun / anti-join count (<= 2)",
            [_fmt(b["rerun_seconds_vs_single_statement"]) for b in backends.values()],
        ),
        ("verify / anti-join count", [_fmt(b["verify_seconds_vs_single_statement"]) for b in backends.values()]),
        ("batches", [str(b["batches"]) for b in backends.values()]),
        (
            "batch s p50 / p99 / max (max < 0.25)",
            [" / ".join(_fmt(b["batch_seconds"][k], 3) for k in ("p50", "p99", "max")) for b in backends.values()],
        ),
    ]
    for size in next(iter(backends.values()))["peak_rss_mb"]:
        rows.append(
            (f"peak RSS MB at {int(size):,} (< 100)", [_fmt(b["peak_rss_mb"].get(size), 1) for b in backends.values()])
        )
    rows.append(("goals met", [f"{sum(b['goals'].values())}/{len(b['goals'])}" for b in backends.values()]))
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    lines = [" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True))]
    lines += [
        label.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
        for label, values in rows
    ]
    for name, b in backends.items():
        for goal, ok in b["goals"].items():
            if not ok:
                lines.append(f"  {name}: goal not met: {goal}")
    return "\n".join(lines)


def plot(path: Path, backends: dict[str, Any]) -> None:
    """Throughput against fixed batch size (log x), one line per backend; dashed: its single statement
    (no ledger); dotted: the offline --sql script (the same statement plus the ledger, one transaction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for name, b in backends.items():
        points = b["sweep"]["points"]
        if not points:
            continue
        x = [p["batch_size"] for p in points]
        (line,) = ax.plot(x, [p["rows_per_second"] for p in points], marker="o", label=f"{name}: run, fixed batch")
        at = b["by_size"][str(b["sweep"]["experiments"])]
        for key, style, label in (("single_statement", "--", "single statement"), ("offline_sql", ":", "--sql script")):
            rate = at[key]["rows"] / statistics.median(at[key]["seconds"])
            ax.axhline(rate, color=line.get_color(), linestyle=style, linewidth=1, label=f"{name}: {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sourceType rows per batch, fixed)")
    ax.set_ylabel("isGateway rows inserted per second")
    size = next((b["sweep"]["experiments"] for b in backends.values() if b["sweep"]["points"]), 0)
    ax.set_title(f"Backfill throughput against batch size ({size:,} experiments)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
