"""The command line: a thin click layer over :mod:`backfill.job`."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click
from tqdm import tqdm

from backfill import __version__
from backfill.db import BackfillError, ExitCode, Timeouts, create_engine, display, parse_url, resolve_url
from backfill.job import DEFAULT_BATCH_SIZE, Backfill, Settings

EXIT_CODES = """\b
Exit codes:
  0  success (verify: nothing missing)
  1  verify: gateway experiments lack the isGateway tag
  2  bad option, malformed or unsupported database URL
  3  cannot connect or log in to the database
  4  not an MLflow database (no experiments / experiment_tags table)
  5  the database user lacks a privilege the command needs
  6  another run or revert holds the lock on this database
  7  stopped early (signal, timeouts, retries used up): nothing is
     half-written, run again to resume"""


def database_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL of the MLflow database. Default: $DATABASE_URL, else $MLFLOW_TRACKING_URI "
        "when it is a database URI, else sqlite:///mlflow.db.",
    )(func)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")(func)


def timeout_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--connect-timeout",
        type=click.FloatRange(min=1),
        default=Timeouts.connect,
        show_default=True,
        help="Seconds to wait for a connection to the database.",
    )(func)
    func = click.option(
        "--statement-timeout",
        type=click.FloatRange(min=0.1),
        default=Timeouts.statement,
        show_default=True,
        help="Seconds any one statement may run (PostgreSQL, MySQL family; SQLite has no such limit).",
    )(func)
    return click.option(
        "--lock-timeout",
        type=click.FloatRange(min=0.01),
        default=Timeouts.lock,
        show_default=True,
        help="Seconds a batch may wait for a row lock held by MLflow before it is retried smaller.",
    )(func)


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlflow-gateway-backfill")
def cli() -> None:
    """Tag MLflow 3.10.0 gateway experiments with mlflow.experiment.isGateway=true.

    MLflow 3.10.1+ hides experiments tagged isGateway from the experiment list; gateway experiments
    created by 3.10.0 lack the tag and reappear after an upgrade. This tool adds the missing tag rows,
    in small idempotent batches, and can undo exactly what it added.

    \b
    Examples:
      mlflow-gateway-backfill status --database-url sqlite:///mlflow.db
      mlflow-gateway-backfill run --dry-run
      mlflow-gateway-backfill run --database-url postgresql://mlflow@db/mlflow
      mlflow-gateway-backfill verify && echo all tagged
      mlflow-gateway-backfill revert
    """


def _engine(database_url: str | None, timeouts: Timeouts | None = None) -> Backfill:
    timeouts = timeouts or Timeouts()
    url = parse_url(resolve_url(database_url))
    return Backfill(create_engine(url, timeouts), Settings(timeouts=timeouts))


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data, default=str, sort_keys=True) if as_json else text)


@contextmanager
def _errors() -> Iterator[None]:
    """Every failure leaves as one line on stderr and a documented exit code, never a traceback."""
    try:
        yield
    except BackfillError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(int(exc.code))
    except KeyboardInterrupt:
        click.echo("Error: interrupted; nothing is half-written, run again to resume", err=True)
        sys.exit(int(ExitCode.STOPPED))


class _Stop:
    """SIGINT / SIGTERM ask the run to stop after the batch in flight; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        click.echo(f"\n{signal.Signals(signum).name}: stopping after the current batch", err=True)

    @contextmanager
    def installed(self) -> Iterator[_Stop]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class _Bar:
    """A tqdm bar (rate, ETA) on a terminal; a plain line every ``every`` seconds otherwise."""

    def __init__(self, enabled: bool, every: float = 10.0) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.every = every
        self.bar: tqdm | None = None
        self.done = self.total = self.inserted = 0
        self.t0 = self.last = time.monotonic()

    def start(self, total: int) -> None:
        self.close()
        self.done, self.total, self.t0 = 0, total, time.monotonic()
        if self.enabled and self.tty:
            self.bar = tqdm(total=total, unit="exp", desc="backfill", file=sys.stderr, dynamic_ncols=True)

    def advance(self, scanned: int, inserted: int) -> None:
        self.done += scanned
        self.inserted += inserted
        if self.bar is not None:
            self.bar.update(scanned)
            self.bar.set_postfix(inserted=self.inserted, refresh=False)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            rate = self.done / max(self.last - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0
            click.echo(
                f"progress: {self.done}/{self.total} tagged-source rows scanned, {self.inserted} inserted, "
                f"{rate:.0f}/s, eta {eta:.0f}s",
                err=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@cli.command()
@database_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Experiments per batch to start with (adapted to --target-batch-seconds).",
)
@click.option("--min-batch-size", type=click.IntRange(min=1), default=Settings.min_batch_size, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=Settings.max_batch_size, show_default=True)
@click.option(
    "--target-batch-seconds",
    type=click.FloatRange(min=0.001),
    default=Settings.target_batch_seconds,
    show_default=True,
    help="Time each batch transaction aims at; batches grow or shrink toward it.",
)
@click.option("--fixed", is_flag=True, help="Keep --batch-size as given (no adapting); retries still halve it.")
@click.option(
    "--sleep", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Seconds to pause between batches."
)
@click.option(
    "--max-rows-per-second",
    type=click.FloatRange(min=0.001),
    default=None,
    help="Ceiling on experiments examined per second.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=Settings.retries,
    show_default=True,
    help="Retries of a batch that hit a timeout, deadlock or lost connection (each one halves it).",
)
@timeout_options
@click.option("--dry-run", is_flag=True, help="Count what would be inserted; write nothing (read-only user is fine).")
@json_option
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def run(
    database_url: str | None,
    batch_size: int,
    min_batch_size: int,
    max_batch_size: int,
    target_batch_seconds: float,
    fixed: bool,
    sleep: float,
    max_rows_per_second: float | None,
    retries: int,
    lock_timeout: float,
    statement_timeout: float,
    connect_timeout: float,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Insert the missing isGateway tags, in batches; resumes an interrupted run.

    Idempotent: a second run finds nothing to do and says so. Every inserted row is recorded in the
    table gateway_backfill_rows so that `revert` can remove exactly those rows.

    \b
    Examples:
      mlflow-gateway-backfill run --dry-run
      mlflow-gateway-backfill run --database-url postgresql://mlflow@db/mlflow --sleep 0.1
      mlflow-gateway-backfill run --max-rows-per-second 5000 --lock-timeout 0.5 --json
    """
    with _errors():
        if min_batch_size > max_batch_size:
            raise BackfillError("--min-batch-size is larger than --max-batch-size", ExitCode.USAGE)
        timeouts = Timeouts(lock=lock_timeout, statement=statement_timeout, connect=connect_timeout)
        job = _engine(database_url, timeouts)
        job.settings = Settings(
            batch_size=min(max(batch_size, min_batch_size), max_batch_size) if not fixed else batch_size,
            min_batch_size=min(min_batch_size, batch_size),
            max_batch_size=max(max_batch_size, batch_size),
            target_batch_seconds=target_batch_seconds,
            sleep=sleep,
            max_rows_per_second=max_rows_per_second,
            retries=retries,
            adaptive=not fixed,
            timeouts=timeouts,
        )
        where = display(job.engine.url)
        if dry_run:
            report = job.run(dry_run=True)
            _emit(as_json, report.summary(), f"dry run on {where}: would insert {report.would_insert} isGateway tags")
            return
        bar = _Bar(enabled=not quiet and not (as_json and not sys.stderr.isatty()))
        with _Stop().installed() as stop:
            report = job.run(progress=bar, should_stop=stop)
        if report.inserted:
            text = (
                f"inserted {report.inserted} isGateway tags on {where} in {report.batches} batches "
                f"({report.seconds:.1f}s, run {report.run_id})"
            )
        else:
            text = f"nothing to do on {where}: every gateway experiment already has isGateway (run {report.run_id})"
        _emit(as_json, report.summary(), text)


@cli.command()
@database_option
@json_option
def status(database_url: str | None, as_json: bool) -> None:
    """Count gateway experiments: tagged, missing, conflicting, inserted by this tool. Read-only.

    \b
    Example:
      mlflow-gateway-backfill status --database-url mysql://mlflow@db/mlflow --json
    """
    with _errors():
        st = _engine(database_url).status()
        last = st.last_run
        lines = [
            f"gateway experiments:       {st.gateway} ({st.deleted} deleted)",
            f"  tagged isGateway=true:   {st.tagged}",
            f"  missing isGateway:       {st.missing}",
            f"  isGateway not 'true':    {st.conflicts}  (left as they are)",
            f"rows inserted by this tool: {st.inserted_by_backfill}",
        ]
        if last:
            lines.append(
                f"last run: {last['id']} {last['state']}, {last['inserted']} inserted, cursor {last['last_id']}"
            )
        _emit(as_json, asdict(st), "\n".join(lines))


@cli.command()
@database_option
@json_option
def verify(database_url: str | None, as_json: bool) -> None:
    """Exit 0 when every gateway experiment has isGateway, 1 otherwise. Read-only; for CI and monitoring.

    \b
    Example:
      mlflow-gateway-backfill verify || mlflow-gateway-backfill run
    """
    with _errors():
        st = _engine(database_url).status()
        ok = st.missing == 0
        _emit(
            as_json,
            {"ok": ok, "missing": st.missing, "gateway": st.gateway, "conflicts": st.conflicts},
            f"ok: all {st.gateway} gateway experiments carry isGateway"
            if ok
            else f"missing: {st.missing} of {st.gateway} gateway experiments lack isGateway",
        )
        if not ok:
            sys.exit(int(ExitCode.MISSING))


@cli.command()
@database_option
@timeout_options
@json_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (implied when stdin is not a terminal).")
def revert(
    database_url: str | None,
    lock_timeout: float,
    statement_timeout: float,
    connect_timeout: float,
    as_json: bool,
    yes: bool,
) -> None:
    """Remove exactly the isGateway rows this tool inserted (per its ledger), in batches.

    Rows that MLflow or a user wrote are never touched, even identical ones; a row whose value was
    changed since it was inserted is left alone too.

    \b
    Example:
      mlflow-gateway-backfill revert --database-url sqlite:///mlflow.db --yes
    """
    with _errors():
        job = _engine(database_url, Timeouts(lock=lock_timeout, statement=statement_timeout, connect=connect_timeout))
        prompt = f"Remove the isGateway tags this tool inserted on {display(job.engine.url)}?"
        if not yes and sys.stdin.isatty() and not click.confirm(prompt):
            click.echo("nothing removed")
            return
        removed = job.revert()
        _emit(as_json, {"removed": removed}, f"removed {removed} isGateway tags inserted by this tool")


def main() -> None:
    cli(prog_name="mlflow-gateway-backfill")
