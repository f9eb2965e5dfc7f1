"""What the benchmark hands back: per backend and shape the ratios (median and range over the pairs) and the
goals' verdicts, a terminal table, JSON (written after every shape, atomically), plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.spread import GAVE_UP, MET, MIXED, NOT_MET, fmt, verdict
from bench.suite import Plan, describe_gave_up

# The goals (benchmark goals, not test assertions).
GOAL_RATIO = 0.8  # batched throughput / single-statement throughput, at default settings
GOAL_MAX_BATCH = 0.25  # seconds, the longest batch transaction, with and without the load
GOAL_RSS_MB = 100.0  # peak RSS of `run`
GOAL_RSS_FLAT = 1.05  # RSS after the last batch at most 5% above RSS after the first
GOAL_YARDSTICK = 2.0  # no-op rerun and verify / R1


def _under_load_at_defaults(shape: dict[str, Any]) -> dict[str, Any] | None:
    """The under-load run's longest batch when the run at the defaults finished; None when it gave up (a
    later try's figures are shown apart, never judged)."""
    load = shape["under_load"]
    return load["run"]["batch_seconds_max"] if not load["tries"] and "run" in load else None


# Each goal: its name, the figure it is judged on (a spread; None: the run gave up), and the test of a value.
GOALS: tuple[tuple[str, Callable[[dict[str, Any]], dict[str, Any] | None], Callable[[float], bool]], ...] = (
    (
        f"batched_vs_single_statement >= {GOAL_RATIO}",
        lambda s: s["batched_vs_single_statement"],
        lambda v: v >= GOAL_RATIO,
    ),
    (f"max batch seconds < {GOAL_MAX_BATCH}", lambda s: s["run"]["batch_seconds_max"], lambda v: v < GOAL_MAX_BATCH),
    (f"peak RSS < {GOAL_RSS_MB:g} MB", lambda s: s["run"]["peak_rss_mb"], lambda v: v < GOAL_RSS_MB),
    (
        f"RSS flat through the run (last batch <= first batch +{GOAL_RSS_FLAT - 1:.0%})",
        lambda s: s["run"]["rss_growth"],
        lambda v: v <= GOAL_RSS_FLAT,
    ),
    (f"rerun <= {GOAL_YARDSTICK:g}x R1", lambda s: s["rerun_vs_R1"], lambda v: v <= GOAL_YARDSTICK),
    (f"verify <= {GOAL_YARDSTICK:g}x R1", lambda s: s["verify_vs_R1"], lambda v: v <= GOAL_YARDSTICK),
    (f"max batch seconds under load < {GOAL_MAX_BATCH}", _under_load_at_defaults, lambda v: v < GOAL_MAX_BATCH),
)


def goals(shape: dict[str, Any]) -> dict[str, str]:
    """Each goal's verdict over every pair (bench.spread.verdict): met, not met, mixed, or gave up. The load's
    goal only when the load ran; it is judged at the defaults."""
    met = {}
    for name, figure_of, ok in GOALS:
        if "under load" in name and "under_load" not in shape:
            continue
        figure = figure_of(shape)
        met[name] = GAVE_UP if figure is None else verdict(figure, ok)
    return met


def goal_figure(shape: dict[str, Any], goal: str) -> str:
    """The figure a goal was judged on, as the table shows it."""
    figure = next(figure_of for name, figure_of, _ in GOALS if name == goal)(shape)
    digits = 3 if "seconds" in goal else 1 if "RSS <" in goal else 2
    return fmt(figure, digits) if figure is not None else ""


def judge(shape: dict[str, Any]) -> dict[str, Any]:
    """A shape's figures with its goals' verdicts (none for a shape that failed)."""
    if "error" not in shape:
        shape["goals"] = goals(shape)
    return shape


def summarize(server: str, shapes: dict[str, dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """One backend: its shapes' figures, each with its goals."""
    return {"server": server, "experiments": plan.experiments, "shapes": {k: judge(v) for k, v in shapes.items()}}


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
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "servers": servers,
        "git_commit": commit + ("+dirty backfill/" if dirty else ""),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def write_json(path: Path, backends: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write the results whole or not at all (a temporary file renamed over the old one): the bench calls it
    after every shape, so a crash or Ctrl-C later keeps what was measured before."""
    data = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra, "backends": backends}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def _rows(shapes: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The table's rows for one shape, one value per backend; a ratio reads ``median (min-max)``."""

    def each(get: Any) -> list[str]:
        values = []
        for s in shapes:
            try:
                values.append(get(s))
            except (KeyError, TypeError):
                values.append("-")
        return values

    def batches(run: dict[str, Any]) -> str:
        triple = " / ".join(fmt(run[f"batch_seconds_{k}"], 3) for k in ("p50", "p99", "max"))
        return f"{fmt(run['batches'], 0)}; {triple}"

    def under_load(s: dict[str, Any]) -> str:
        load = s["under_load"]
        if "run" not in load:
            return "-"
        how = " ".join(load["options"]) + (f" in {load['journal_mode'].upper()} mode" if "journal_mode" in load else "")
        return (f"{how.strip()}: " if how.strip() else "") + batches(load["run"])

    def latency(s: dict[str, Any], kind: str) -> str:
        load = s["under_load"]
        return f"{_fmt(load['load_alone'][kind]['p99'], 3)} / {_fmt(load['load_during_run'][kind]['p99'], 3)}"

    def ratio(key: str, digits: int = 2, suffix: str = "") -> list[str]:
        return each(lambda s: fmt(s[key], digits, suffix))

    def rss(s: dict[str, Any]) -> str:
        return f"{fmt(s['run']['rss_mb_after_first_batch'], 1)} / {fmt(s['run']['rss_mb_after_last_batch'], 1)}"

    def pairs_gave_up(s: dict[str, Any]) -> str:
        records = s.get("gave_up", [])
        return f"{len(records)} of {len(s['pairs'])}" + "".join(f"; {describe_gave_up(r)}" for r in records)

    def load_gave_up(s: dict[str, Any]) -> str:
        return "; ".join(describe_gave_up(r) for r in s["under_load"]["tries"]) or "-"

    def goals_met(s: dict[str, Any]) -> str:
        counts = [(v, sum(1 for g in s["goals"].values() if g == v)) for v in (MET, MIXED, NOT_MET, GAVE_UP)]
        return ", ".join(f"{n} {v}" for v, n in counts if n) + f" (of {len(s['goals'])})"

    rows = [
        ("rows to insert", each(lambda s: f"{s['rows_to_insert']:,}")),
        ("pairs (a run, a single statement, side by side)", each(lambda s: str(len(s["pairs"])))),
        ("(a)/(b) batched / single statement (>= 0.8)", ratio("batched_vs_single_statement")),
        ("(a)/(b') batched / --sql script (ledger included)", ratio("batched_vs_offline_sql")),
        ("(b')/(b) --sql script / single statement", ratio("offline_sql_vs_single_statement")),
        ("(a) vs (c) speedup over the MLflow client, extrapolated", ratio("speedup_vs_mlflow_client", 0, "x")),
        ("(d) no-op rerun / R1 (<= 2)", ratio("rerun_vs_R1")),
        ("(e) verify / R1 (<= 2)", ratio("verify_vs_R1")),
        ("status / R1", ratio("status_vs_R1")),
        ("(d) rerun / R0; (e) verify / R0", each(lambda s: f"{fmt(s['rerun_vs_R0'])}; {fmt(s['verify_vs_R0'])}")),
        ("R1 / R0 (the new definition's count / the old one)", ratio("R1_vs_R0")),
        ("batches; seconds per batch p50 / p99 / max (max < 0.25)", each(lambda s: batches(s["run"]))),
        ("under load: batches; p50 / p99 / max (max < 0.25)", each(under_load)),
        ("under load: runs that gave up", each(load_gave_up)),
        ("load: UI list p99 s, alone / during the run", each(lambda s: latency(s, "list"))),
        ("load: create experiment p99 s, alone / during the run", each(lambda s: latency(s, "create"))),
        ("peak RSS of `run`, MB (< 100)", each(lambda s: fmt(s["run"]["peak_rss_mb"], 1))),
        ("RSS after the first / last batch, MB (flat)", each(rss)),
        ("goals", each(goals_met)),
    ]
    if any(s.get("gave_up") for s in shapes):  # only when some run of a pair gave up
        rows.insert(3, ("(a) runs of the pairs that gave up", each(pairs_gave_up)))
    return rows


def table(backends: dict[str, Any], markdown: bool = False) -> str:
    """One table per shape, one column per backend; under each, the goals not met everywhere (mixed: met by
    some pairs only; gave up: the run gave up) and the shapes that failed."""
    names = list(backends)
    out: list[str] = []
    shapes = list(dict.fromkeys(shape for b in backends.values() for shape in b["shapes"]))
    experiments = next(iter(backends.values()))["experiments"] if backends else 0
    for shape in shapes:
        per_backend = [backends[b]["shapes"].get(shape, {"error": "not measured"}) for b in names]
        rows = _rows(per_backend)
        title = f"shape {shape}, {experiments:,} experiments"
        if markdown:
            out.append(f"| {title} | " + " | ".join(names) + " |")
            out.append("|---" * (len(names) + 1) + "|")
            out += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
        else:
            width = max(len(label) for label, _ in rows)
            cols = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
            out.append(title.ljust(width) + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True)))
            out += [
                label.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
                for label, values in rows
            ]
        out += [""] if markdown else []
        bullet = "-" if markdown else " "
        for name, s in zip(names, per_backend, strict=True):
            if "error" in s:
                out.append(f"{bullet} {name} {shape}: failed: {s['error'].splitlines()[0]}")
                continue
            out += [
                f"{bullet} {name} {shape}: {goal}: {v}" + (f": {goal_figure(s, goal)}" if v != GAVE_UP else "")
                for goal, v in s["goals"].items()
                if v != MET
            ]
        out.append("")
    return "\n".join(out)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(path: Path, backends: dict[str, Any], experiments: int) -> bool:
    """Throughput against fixed batch size (log x), one line per backend on the 3.10.0 shape; dashed: its
    single statement (no ledger); dotted: the --sql script (the same plus the ledger, one transaction).
    False (and no file) when no sweep was measured."""
    if not any(b["shapes"].get("3.10.0", {}).get("sweep") for b in backends.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6.5))
    for name, b in backends.items():
        shape = b["shapes"].get("3.10.0", {})
        points = shape.get("sweep") or []
        if not points:
            continue
        x = [p["batch_size"] for p in points]
        (line,) = ax.plot(x, [p["rows_per_second"] for p in points], marker="o", label=f"{name}: run, fixed batch")
        for key, style, label in (("single_statement", "--", "single statement"), ("offline_sql", ":", "--sql script")):
            if key in shape:
                rate = shape[key]["rows"] / statistics.median(shape[key]["seconds"])
                ax.axhline(rate, color=line.get_color(), linestyle=style, linewidth=1, label=f"{name}: {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sourceType rows per batch, fixed)")
    ax.set_ylabel("isGateway rows inserted per second")
    ax.set_title(f"Throughput against batch size (shape 3.10.0, {experiments:,} experiments)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_batches(path: Path, backends: dict[str, Any], experiments: int) -> None:
    """Seconds per batch through a whole default run: a row per shape, without and with the load; x is
    where the batch ended in the experiment ids, so a stall or a trend along the table shows at a glance."""
    plt = _pyplot()
    shapes = list(dict.fromkeys(shape for b in backends.values() for shape in b["shapes"]))
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4 * len(shapes)), sharex=True, squeeze=False)
    for row, shape in enumerate(shapes):
        panels = (
            ("alone", lambda s: s["batch_trace"]),
            ("beside the MLflow-like load", lambda s: s["under_load"]["batch_trace"]),
        )
        for col, (title, get) in enumerate(panels):
            ax = axes[row][col]
            for name, b in backends.items():
                try:
                    trace = get(b["shapes"][shape])
                except KeyError:
                    continue
                if not trace:
                    continue
                ax.plot([t[0] for t in trace], [t[3] for t in trace], marker=".", linewidth=1, label=name)
            ax.axhline(GOAL_MAX_BATCH, color="red", linestyle="--", linewidth=1, label="goal: < 0.25 s")
            ax.set_title(f"shape {shape}, {title}", fontsize=10)
            ax.set_ylabel("seconds per batch")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if row == len(shapes) - 1:
                ax.set_xlabel("experiment id at the batch's end")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Every batch of a default run, {experiments:,} experiments", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report [RESULTS.json]``: the tables of a results file, as Markdown (docs/benchmark.md's)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path, nargs="?", default=Path(__file__).parent / "results.json")
    args = parser.parse_args(argv)
    print(table(json.loads(args.results.read_text())["backends"], markdown=True))


if __name__ == "__main__":
    main()
