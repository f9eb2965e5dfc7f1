"""The command line: a thin click layer over :mod:`backfill.job`."""

from __future__ import annotations

import math
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click

from backfill import __version__, credentials, output, signals
from backfill.connect import create_engine
from backfill.errors import BackfillError, ExitCode
from backfill.job import Backfill
from backfill.replicas import DEFAULT_MAX_LAG, DEFAULT_TIMEOUT
from backfill.retry import MAX_SECONDS, Timeouts
from backfill.urls import display, parse_url, resolve_replicas, resolve_url
from backfill.walk import DEFAULT_BATCH_SIZE, RevertReport, Settings

MAX_BATCH = 1_000_000

EXIT_CODES = """\b
Exit codes:
  0  success (verify: nothing missing)
  1  verify: gateway experiments lack the isGateway tag
  2  bad option, malformed or unsupported database URL
  3  cannot connect or log in, or the server stopped answering
  4  not an MLflow database, or not the MLflow schema this tool knows
  5  the database user lacks a privilege the command needs
  6  another run, revert or alembic upgrade holds the lock
  7  stopped early (signal, timeouts, retries used up, database
     error): nothing is half-written; the same command again
     goes on where it stopped"""


class Seconds(click.ParamType):
    """A finite duration in seconds within bounds (``nan``, ``inf`` and ``1e10`` are refused)."""

    name = "SECONDS"

    def __init__(self, low: float, high: float = MAX_SECONDS) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or not self.low <= seconds <= self.high:
            self.fail(f"{value!r} is not between {self.low:g} and {self.high:g} seconds", param, ctx)
        return seconds


# The run's tunables: the CLI's options and Alembic's ``-x KEY=VALUE`` share names, ranges and defaults.
TUNABLES: dict[str, click.ParamType] = {
    "batch-size": click.IntRange(1, MAX_BATCH),
    "sleep": Seconds(0),
    "max-rows-per-second": Seconds(0.001, 1e9),
    "retries": click.IntRange(0, 100),
    "lock-timeout": Seconds(0.01),
    "statement-timeout": Seconds(0.1),
    "connect-timeout": Seconds(1, 3600),
    "max-replica-lag": Seconds(0.1),
    "replica-timeout": Seconds(1),
}


def settings_from(values: dict[str, Any], replicas: tuple[str, ...] = ()) -> Settings:
    """Settings (and their Timeouts) from tunables already converted, keyed by TUNABLES' names, and the
    replicas to wait for (given, else ``$MLFLOW_READ_REPLICA_BACKEND_STORE_URI``)."""
    timeouts = Timeouts(
        lock=values.get("lock-timeout", Timeouts.lock),
        statement=values.get("statement-timeout", Timeouts.statement),
        connect=values.get("connect-timeout", Timeouts.connect),
        retries=values.get("retries", Timeouts.retries),
    )
    return Settings(
        batch_size=values.get("batch-size", Settings.batch_size),
        sleep=values.get("sleep", Settings.sleep),
        max_rows_per_second=values.get("max-rows-per-second"),
        timeouts=timeouts,
        replicas=resolve_replicas(replicas),
        max_replica_lag=values.get("max-replica-lag", DEFAULT_MAX_LAG),
        replica_timeout=values.get("replica-timeout", DEFAULT_TIMEOUT),
    )


def replica_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--replica-timeout",
        type=TUNABLES["replica-timeout"],
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="Seconds a replica may stay behind (or out of reach) before the work stops, resumably (exit 7).",
    )(func)
    func = click.option(
        "--max-replica-lag",
        type=TUNABLES["max-replica-lag"],
        default=DEFAULT_MAX_LAG,
        show_default=True,
        help="Hold the next batch while a replica has not replayed a batch older than this (seconds).",
    )(func)
    return click.option(
        "--replica-url",
        "replica_urls",
        metavar="URL",
        multiple=True,
        help="A read replica to wait for (repeatable). Default: $MLFLOW_READ_REPLICA_BACKEND_STORE_URI, as "
        "`mlflow server` reads it. Before each batch the work holds while a replica lags; at the end it waits "
        "until every replica has replayed every batch.",
    )(func)


def database_option(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--schema",
        metavar="NAME",
        expose_value=False,
        callback=lambda ctx, _param, value: ctx.meta.__setitem__(SCHEMA, value),
        help="PostgreSQL: the schema of MLflow's tables (default: where experiment_tags resolves through the "
        "search_path). Works through any connection pooler, unlike ?options=-csearch_path.",
    )(func)
    return click.option(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL of the MLflow database. Default: $DATABASE_URL, else $MLFLOW_BACKEND_STORE_URI, "
        "else $MLFLOW_TRACKING_URI when it is a database URI, else sqlite:///mlflow.db.",
    )(func)


SCHEMA = "mgb_schema"


def _schema() -> str | None:
    """The --schema of the command being run."""
    return click.get_current_context().meta.get(SCHEMA)


def _password_given(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Hand --password-file / --password-command to backfill.credentials for this command's connections."""
    ctx.meta[param.name] = value
    credentials.configure(ctx.meta.get("password_file"), ctx.meta.get("password_command"))
    ctx.call_on_close(credentials.reset)


def credential_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--password-command",
        metavar="CMD",
        expose_value=False,
        callback=_password_given,
        help="Run CMD (split like a shell line, run without a shell) for every new connection; what it prints, "
        "stripped, is the password: e.g. `aws rds generate-db-auth-token ...`. Default: $DATABASE_PASSWORD_COMMAND. "
        "Exit 3 if it fails or times out (--connect-timeout).",
    )(func)
    return click.option(
        "--password-file",
        metavar="PATH",
        expose_value=False,
        callback=_password_given,
        help="Read the password from PATH (trailing newlines removed) for every new connection; it overrides the "
        "URL's. Default: $DATABASE_PASSWORD_FILE. Otherwise the URL's password; on PostgreSQL libpq also reads "
        "$PGHOST, $PGPORT, $PGDATABASE, $PGUSER, $PGPASSWORD, $PGPASSFILE, $PGSSLMODE, $PGSSLROOTCERT for what the "
        "URL leaves out (postgresql:// alone works); on MySQL, TLS as MLflow reads it: $MLFLOW_MYSQL_SSL_CA "
        "(verifies the server), $MLFLOW_MYSQL_SSL_CERT, $MLFLOW_MYSQL_SSL_KEY.",
    )(func)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")(func)


def retries_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--retries",
        type=TUNABLES["retries"],
        default=Timeouts.retries,
        show_default=True,
        help="Retries of a step that hit a timeout, deadlock or lost connection (a batch is halved each time).",
    )(func)


def timeout_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--connect-timeout",
        type=TUNABLES["connect-timeout"],
        default=Timeouts.connect,
        show_default=True,
        help="Seconds to wait for a connection (TCP, TLS and log-in).",
    )(func)
    func = click.option(
        "--statement-timeout",
        type=TUNABLES["statement-timeout"],
        default=Timeouts.statement,
        show_default=True,
        help="Seconds any one statement may run; the server is asked to enforce it and the client gives "
        "up on a server that stops answering shortly after.",
    )(func)
    return click.option(
        "--lock-timeout",
        type=TUNABLES["lock-timeout"],
        default=Timeouts.lock,
        show_default=True,
        help="Seconds a statement may wait for a lock held by MLflow before the batch is retried smaller.",
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


def _job(database_url: str | None, timeouts: Timeouts, read_only: bool = False) -> Backfill:
    url = parse_url(resolve_url(database_url).url)
    return Backfill(create_engine(url, timeouts, read_only=read_only), Settings(timeouts=timeouts, schema=_schema()))


@contextmanager
def _errors() -> Iterator[None]:
    """Every failure leaves as one line on stderr and a documented exit code, never a traceback."""
    try:
        yield
    except BackfillError as exc:
        output.error(str(exc))
        sys.exit(int(exc.code))
    except KeyboardInterrupt as exc:  # a signal while nothing was being written (see signals.py)
        output.error(f"{exc or 'interrupted'}; nothing was left half-written")
        sys.exit(int(ExitCode.STOPPED))
    except click.exceptions.Exit:
        raise
    except Exception as exc:
        if os.environ.get("MGB_TRACEBACK"):
            raise
        output.error(
            f"unexpected {type(exc).__name__} (a bug: please report it; MGB_TRACEBACK=1 shows where); "
            "nothing was left half-written"
        )
        sys.exit(int(ExitCode.STOPPED))


@contextmanager
def _read_only_command() -> Iterator[None]:
    """Errors as one line; any signal ends a read-only command at once (nothing to finish)."""
    with _errors(), signals.handled(immediate=True):
        yield


@cli.command()
@database_option
@credential_options
@click.option(
    "--batch-size",
    type=TUNABLES["batch-size"],
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Experiments per batch to start with (adapted to --target-batch-seconds).",
)
@click.option("--min-batch-size", type=click.IntRange(1, MAX_BATCH), default=Settings.min_batch_size, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(1, MAX_BATCH), default=Settings.max_batch_size, show_default=True)
@click.option(
    "--target-batch-seconds",
    type=Seconds(0.001, 3600),
    default=Settings.target_batch_seconds,
    show_default=True,
    help="Time each batch transaction aims at; batches grow or shrink toward it.",
)
@click.option("--fixed", is_flag=True, help="Keep --batch-size as given (no adapting); retries still halve it.")
@click.option(
    "--sleep", type=TUNABLES["sleep"], default=0.0, show_default=True, help="Seconds to pause between batches."
)
@click.option(
    "--max-rows-per-second",
    type=TUNABLES["max-rows-per-second"],
    default=None,
    help="Ceiling on experiments examined per second.",
)
@retries_option
@timeout_options
@replica_options
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
    replica_urls: tuple[str, ...],
    max_replica_lag: float,
    replica_timeout: float,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Insert the missing isGateway tags, in batches; resumes an interrupted run.

    Idempotent: a second run finds nothing to do and says so. Every inserted row is recorded in the
    table gateway_backfill_rows so that `revert` can remove exactly those rows. SIGINT or SIGTERM stops
    it after the batch in flight (exit 7); `run` again resumes.

    \b
    Examples:
      mlflow-gateway-backfill run --dry-run
      mlflow-gateway-backfill run --database-url postgresql://mlflow@db/mlflow --sleep 0.1
      mlflow-gateway-backfill run --max-rows-per-second 5000 --lock-timeout 0.5 --json
    """
    if dry_run:
        with _read_only_command():
            timeouts = Timeouts(lock=lock_timeout, statement=statement_timeout, connect=connect_timeout)
            job = _job(database_url, timeouts, read_only=True)
            report = job.run(dry_run=True)
            where = display(job.engine.url)
            text = f"dry run on {where}: would insert {report.would_insert} isGateway tags"
            output.emit(as_json, report.summary(), text)
        return
    with _errors(), signals.handled() as stop:
        if min_batch_size > max_batch_size:
            raise BackfillError("--min-batch-size is larger than --max-batch-size", ExitCode.USAGE)
        timeouts = Timeouts(lock=lock_timeout, statement=statement_timeout, connect=connect_timeout, retries=retries)
        job = _job(database_url, timeouts)
        job.settings = Settings(
            batch_size=min(max(batch_size, min_batch_size), max_batch_size) if not fixed else batch_size,
            min_batch_size=min(min_batch_size, batch_size),
            max_batch_size=max(max_batch_size, batch_size),
            target_batch_seconds=target_batch_seconds,
            sleep=sleep,
            max_rows_per_second=max_rows_per_second,
            adaptive=not fixed,
            timeouts=timeouts,
            schema=_schema(),
            replicas=resolve_replicas(replica_urls),
            max_replica_lag=max_replica_lag,
            replica_timeout=replica_timeout,
        )
        progress = not quiet and not (as_json and not output.terminal(sys.stderr))
        bar = output.Bar(progress=progress, waits=not quiet, as_json=as_json)
        report = job.run(progress=bar, should_stop=stop)
        where = display(job.engine.url)
        if report.inserted:
            text = (
                f"inserted {report.inserted} isGateway tags on {where} in {report.batches} batches "
                f"({report.seconds:.1f}s, run {report.run_id})"
            )
        else:
            text = f"nothing to do on {where}: every gateway experiment already has isGateway (run {report.run_id})"
        output.emit(as_json, report.summary(), text)


@cli.command()
@database_option
@credential_options
@timeout_options
@click.option(
    "--replica-url",
    "replica_urls",
    metavar="URL",
    multiple=True,
    help="Also report on this read replica (repeatable; default $MLFLOW_READ_REPLICA_BACKEND_STORE_URI): "
    "whether it has replayed everything the primary has, and how many gateway experiments it shows untagged.",
)
@json_option
def status(
    database_url: str | None,
    lock_timeout: float,
    statement_timeout: float,
    connect_timeout: float,
    replica_urls: tuple[str, ...],
    as_json: bool,
) -> None:
    """Count gateway experiments: tagged, missing, conflicting, inserted by this tool. Read-only.

    \b
    Examples:
      mlflow-gateway-backfill status --database-url mysql://mlflow@db/mlflow --json
      mlflow-gateway-backfill status --replica-url postgresql://mlflow@replica/mlflow
    """
    with _read_only_command():
        timeouts = Timeouts(lock=lock_timeout, statement=statement_timeout, connect=connect_timeout)
        job = _job(database_url, timeouts, read_only=True)
        st = job.status()
        replicas = job.replica_report(list(resolve_replicas(replica_urls)))
        last = st.last_run
        lines = [
            f"gateway experiments:       {st.gateway} ({st.deleted} deleted)",
            f"  tagged isGateway=true:   {st.tagged}",
            f"  missing isGateway:       {st.missing}",
            f"  isGateway not 'true':    {st.conflicts}  (left as they are)",
            f"rows inserted by this tool: {st.inserted_by_backfill}",
        ]
        if st.orphans:
            lines.append(f"orphan gateway tags:       {st.orphans}  (their experiment is gone; ignored)")
        if last:
            lines.append(
                f"last run: {last['id']} {last['state']}, {last['inserted']} inserted, cursor {last['last_id']}"
            )
        for r in replicas:
            state = "caught up" if r["caught_up"] else r["reason"] or f"lag {r['lag_seconds']} s"
            lines.append(f"replica {r['replica']}: {state}; missing isGateway: {r['missing']}")
        output.emit(as_json, {**asdict(st), "replicas": replicas}, "\n".join(lines))


@cli.command()
@database_option
@credential_options
@timeout_options
@click.option(
    "--replica-url",
    "replica_urls",
    metavar="URL",
    multiple=True,
    help="Check this read replica instead of the primary (repeatable): what a UI served from it shows.",
)
@json_option
def verify(
    database_url: str | None,
    lock_timeout: float,
    statement_timeout: float,
    connect_timeout: float,
    replica_urls: tuple[str, ...],
    as_json: bool,
) -> None:
    """Exit 0 when every gateway experiment has isGateway, 1 otherwise. Read-only; for CI and monitoring.

    With --replica-url it checks those replicas (and not the primary): exit 1 while one of them still
    shows a gateway experiment untagged.

    \b
    Examples:
      mlflow-gateway-backfill verify || mlflow-gateway-backfill run
      mlflow-gateway-backfill verify --replica-url postgresql://mlflow@replica/mlflow
    """
    with _read_only_command():
        timeouts = Timeouts(lock=lock_timeout, statement=statement_timeout, connect=connect_timeout)
        urls = list(replica_urls) or [None]
        counts = [(url, _job(url or database_url, timeouts, read_only=True)) for url in urls]
        results = [(display(job.engine.url), job.missing()) for _, job in counts]
        missing = sum(n for _, n in results)
        where = "" if replica_urls == () else " on " + ", ".join(shown for shown, _ in results)
        output.emit(
            as_json,
            {"ok": missing == 0, "missing": missing}
            | ({"replicas": [{"replica": shown, "missing": n} for shown, n in results]} if replica_urls else {}),
            f"ok: every gateway experiment carries isGateway{where}"
            if missing == 0
            else f"missing: {missing} gateway experiments lack isGateway{where}",
        )
    if missing:
        sys.exit(int(ExitCode.MISSING))


def _confirm(prompt: str) -> bool:
    """Ask on the terminal. Ctrl-D (or anything but yes) declines; Ctrl-C or SIGTERM interrupts (exit 7).

    The question goes to stderr, never into stdout, which may be a file or a pipe meant for the report
    (``revert --json > report.json``).

    The answer is awaited with select() on stdin and the signal wakeup pipe: a signal that arrives just as
    the read would begin still ends the wait (``input()`` could miss it and wait forever).
    """
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    with signals.handled(immediate=True):
        previous = signal.set_wakeup_fd(wake_w)
        try:
            output.ask(f"{prompt} [y/N]: ")
            while sys.stdin not in select.select([sys.stdin, wake_r], [], [])[0]:
                os.read(wake_r, 64)  # a signal: its handler runs (and raises) right here
            answer = sys.stdin.readline()
        finally:
            signal.set_wakeup_fd(previous)
            os.close(wake_r)
            os.close(wake_w)
    if not answer:  # Ctrl-D: no answer is no
        output.line("", err=True)
        return False
    return answer.strip().lower() in ("y", "yes")


@cli.command()
@database_option
@credential_options
@click.option(
    "--batch-size",
    type=TUNABLES["batch-size"],
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Ledger rows per batch.",
)
@click.option(
    "--sleep", type=TUNABLES["sleep"], default=0.0, show_default=True, help="Seconds to pause between batches."
)
@retries_option
@timeout_options
@replica_options
@json_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (implied when stdin is not a terminal).")
def revert(
    database_url: str | None,
    batch_size: int,
    sleep: float,
    retries: int,
    lock_timeout: float,
    statement_timeout: float,
    connect_timeout: float,
    replica_urls: tuple[str, ...],
    max_replica_lag: float,
    replica_timeout: float,
    as_json: bool,
    yes: bool,
) -> None:
    """Remove exactly the isGateway rows this tool inserted (per its ledger), in batches.

    Rows that MLflow or a user wrote are never touched, even identical ones; a row whose value was
    changed since it was inserted is left alone too. SIGINT or SIGTERM stops it after the batch in
    flight (exit 7); `revert` again removes the rest.

    \b
    Example:
      mlflow-gateway-backfill revert --database-url sqlite:///mlflow.db --yes
    """
    with _errors():
        timeouts = Timeouts(lock=lock_timeout, statement=statement_timeout, connect=connect_timeout, retries=retries)
        job = _job(database_url, timeouts)
        job.settings = Settings(
            batch_size=batch_size,
            sleep=sleep,
            timeouts=timeouts,
            schema=_schema(),
            replicas=resolve_replicas(replica_urls),
            max_replica_lag=max_replica_lag,
            replica_timeout=replica_timeout,
        )
        prompt = f"Remove the isGateway tags this tool inserted on {display(job.engine.url)}?"
        if not yes and output.terminal(sys.stdin):
            try:
                confirmed = _confirm(prompt)
            except KeyboardInterrupt:
                raise BackfillError("interrupted at the prompt: nothing removed", ExitCode.STOPPED) from None
            if not confirmed:
                output.emit(as_json, asdict(RevertReport(0, 0, 0.0)), "nothing removed")
                return
        with signals.handled() as stop:
            report = job.revert(should_stop=stop, progress=output.Bar(progress=False, waits=True, as_json=as_json))
        output.emit(as_json, asdict(report), f"removed {report.removed} isGateway tags inserted by this tool")


def main() -> None:
    cli(prog_name="mlflow-gateway-backfill")
