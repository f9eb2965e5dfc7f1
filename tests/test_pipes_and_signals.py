"""Closed pipes and signals at any moment (issue 17, items 7 and 8), with real pipes and real processes.

A reader that goes away (``| head -1``, ``| true``, a ``tee`` killed by the same Ctrl-C) neither stops the
work nor changes its exit code; a SIGINT or SIGTERM from the first line of the entry point on ends the
command with exit 7 and nothing half-written; and on SQLite a second Ctrl-C ends a wait for the database's
lock at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from backfill.errors import ExitCode
from backfill.lock import LOCK_SUFFIX
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, RUNS_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import REPO, Db, run_cli, wait_for

CONSOLE_SCRIPT = Path(sys.executable).parent / "mlflow-gateway-backfill"


def gateway(db: Db, ids: range) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in ids])


def tagged(db: Db) -> set[int]:
    return {e for e, k, v in db.tags() if k == ISGW and v == "true"}


def ledger(db: Db) -> set[int]:
    if LEDGER_TABLE not in db.table_names():
        return set()
    return {row[0] for row in db.table(LEDGER_TABLE)}


def run_states(db: Db) -> list[str]:
    return [row[1] for row in db.table(RUNS_TABLE)] if RUNS_TABLE in db.table_names() else []


def cli(*args: str, **popen: object) -> subprocess.Popen[str]:
    """``python -m backfill ARGS`` (stdin is no terminal: `revert` asks nothing)."""
    command = [sys.executable, "-m", "backfill", *args]
    return subprocess.Popen(command, cwd=REPO, text=True, stdin=subprocess.DEVNULL, **popen)  # type: ignore[call-overload]


# ---------------------------------------------------------------- 7. a reader that goes away


@pytest.mark.backends("sqlite", "postgresql")
def test_a_reader_that_goes_away_does_not_stop_the_run(db: Db) -> None:
    """`run 2>&1 | head -1`: after the first progress line nobody reads; the run goes on to the end, exit 0.
    (It once ended mid-way with exit 1 at the next progress line.)"""
    gateway(db, range(1000, 1120))
    # About 24 s at 5 experiments a second: progress lines at 10 s and 20 s, then the report.
    proc = cli(
        *("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--max-rows-per-second", "5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    assert proc.wait(timeout=300) == 0, first
    assert first.startswith("progress: ")
    assert tagged(db) == ledger(db) == set(range(1000, 1120))
    assert run_states(db) == ["done"]


@pytest.mark.backends("sqlite", "postgresql")
def test_a_report_to_a_closed_pipe_changes_no_exit_code(db: Db) -> None:
    """`run --json | true`, `verify | true`, `revert --json | true`: the result stands, exit code and all,
    and the interpreter's exit prints nothing about the pipe. (`run` once ended with exit 7, "unexpected
    BrokenPipeError", after it had finished.)"""
    gateway(db, range(2000, 2010))
    for args, code in (
        (["verify"], ExitCode.MISSING),
        (["run", "--json"], ExitCode.OK),
        (["status", "--json"], ExitCode.OK),
        (["verify", "--json"], ExitCode.OK),
        (["revert", "--json"], ExitCode.OK),
    ):
        proc = cli(*args, "--database-url", db.url, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # `| true`: the reader is gone before the first byte
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == code, (args, err)
        assert err == "", (args, err)  # no "Exception ignored ... BrokenPipeError", no error line
        if args[0] == "run":
            assert tagged(db) == set(range(2000, 2010)) and run_states(db) == ["done"]
    assert tagged(db) == set() and ledger(db) == set()  # the revert did its work too


@pytest.mark.backends("sqlite", "postgresql")
def test_descriptors_closed_from_the_start_change_nothing(db: Db) -> None:
    """`run >&- 2>&-` and the like: Python starts with no sys.stdout or sys.stderr at all; the commands
    still do their work and exit as they would. (`run 2>&-` once exited 7, "unexpected AttributeError".)"""
    gateway(db, range(2500, 2510))

    def closed(command: str, redirections: str) -> int:
        line = f'exec "$0" -m backfill {command} --database-url "$1" {redirections}'
        return subprocess.run(["sh", "-c", line, sys.executable, db.url], cwd=REPO, timeout=120).returncode

    assert closed("verify", ">&- 2>&-") == ExitCode.MISSING
    assert closed("run", "2>&-") == ExitCode.OK
    assert tagged(db) == set(range(2500, 2510)) and run_states(db) == ["done"]
    assert closed("status --json", ">&-") == ExitCode.OK
    assert closed("revert --json", ">&- 2>&- <&-") == ExitCode.OK
    assert tagged(db) == set()


@pytest.mark.backends("sqlite", "postgresql")
def test_ctrl_c_on_a_pipeline_into_tee_stops_resumably(db: Db, tmp_path: Path) -> None:
    """`run 2>&1 | tee log` and Ctrl-C: the terminal sends SIGINT to the whole pipeline, tee dies, and the
    run's stderr becomes a broken pipe. The run still stops after its batch, records the stop and exits 7
    (the resume hint is written, though nobody may read it). (It once exited 1, the stop unrecorded.)"""
    gateway(db, range(3000, 3400))
    log = tmp_path / "log"
    read, write = os.pipe()
    run = cli(
        *("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "0.05"),
        stdout=write,
        stderr=subprocess.STDOUT,
        process_group=0,  # the pipeline's own process group, as a shell makes it
    )
    with log.open("w") as sink:
        # SIGINT at its default, as in a terminal's pipeline: a shell's background job (CI under `nohup … &`)
        # starts with SIGINT ignored, and every child inherits that.
        tee = subprocess.Popen(
            ["tee", str(log)],
            stdin=read,
            stdout=sink,
            process_group=run.pid,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    os.close(read)
    os.close(write)
    wait_for(lambda: len(ledger(db)) >= 3)
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
    assert tee.wait(timeout=60) == -signal.SIGINT
    assert run.wait(timeout=120) == ExitCode.STOPPED
    assert run_states(db) == ["stopped"]
    assert tagged(db) == ledger(db) and 3 <= len(ledger(db)) < 400
    again = run_cli("run", "--database-url", db.url, "-q")
    assert again.returncode == 0, again.stderr
    assert tagged(db) == ledger(db) == set(range(3000, 3400))


# ---------------------------------------------------------------- 8. signals from the first line on


def _handles_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (Python installs none of its own: ours is there)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _started(proc: subprocess.Popen[str]) -> None:
    """Wait until the command handles signals, and check that it did so before loading the CLI's libraries
    (SQLAlchemy's compiled modules are not mapped yet): a signal during those imports, a second or more on
    a busy machine, once ended the process by SIGINT."""
    deadline = time.monotonic() + 60
    while not _handles_sigterm(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "no signal handler installed"
        time.sleep(0.001)
    assert "sqlalchemy" not in Path(f"/proc/{proc.pid}/maps").read_text(), "signals handled only after the imports"


@pytest.mark.backends("sqlite", "postgresql")
def test_two_signals_at_any_moment_end_in_exit_7(db: Db) -> None:
    """Two SIGINTs at many offsets from the start (imports, connecting, the lock, the set-up, batches, the
    clean-up), by both entry points: exit 7 every time, one error line, and nothing half-written."""
    gateway(db, range(4000, 5000))
    offsets = [0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.4, 1.8, 2.4, 3.0, 4.0]
    for i, offset in enumerate(offsets):
        entry = [sys.executable, "-m", "backfill"] if i % 2 else [str(CONSOLE_SCRIPT)]
        args = ["run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--max-rows-per-second", "20", "-q"]
        proc = subprocess.Popen([*entry, *args], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _started(proc)
        time.sleep(offset)
        proc.send_signal(signal.SIGINT)
        time.sleep((0.1, 0.0, 0.01)[i % 3])
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == ExitCode.STOPPED, (offset, proc.returncode, err)
        assert "Traceback" not in err and err.count("Error: ") == 1 and "SIGINT" in err.splitlines()[-1], err
        assert tagged(db) == ledger(db), offset  # whole batches only
    result = run_cli("run", "--database-url", db.url, "-q")
    assert result.returncode == 0, result.stderr
    assert tagged(db) == ledger(db) == set(range(4000, 5000))


def _hold_write_lock(db: Db) -> sqlite3.Connection:
    """Another writer holding SQLite's write lock (as MLflow does during a write)."""
    holder = sqlite3.connect(sa.make_url(db.url).database or "", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def _runner_lock_taken(db: Db) -> bool:
    path = (sa.make_url(db.url).database or "") + LOCK_SUFFIX
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@pytest.mark.backends("sqlite")
def test_a_second_ctrl_c_ends_a_wait_for_sqlites_lock_at_once(db: Db) -> None:
    """Another writer holds SQLite's lock; `run --lock-timeout 30` waits for it (its first write, right after
    it took the runner lock). Two Ctrl-C: exit 7 with the stop message, not 30 s later with "database is
    locked" (SQLite's busy handler sleeps in C, where Python cannot run a signal handler)."""
    gateway(db, range(6000, 6010))
    holder = _hold_write_lock(db)
    try:
        proc = cli(
            *("run", "--database-url", db.url, "--lock-timeout", "30", "--retries", "0", "-q"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_for(lambda: _runner_lock_taken(db))
        time.sleep(0.3)
        err = _ctrl_c_twice(proc, 0.3)
    finally:
        holder.rollback()
        holder.close()
    assert proc.returncode == ExitCode.STOPPED, err
    last = err.splitlines()[-1]
    assert last.startswith("Error: stopped by SIGINT, at once") and "`run` again" in last, err
    assert "database is locked" not in err
    assert tagged(db) == set()


def _ctrl_c_twice(proc: subprocess.Popen[str], pause: float) -> str:
    """Two SIGINTs ``pause`` seconds apart, as a user presses Ctrl-C twice; returns the command's stderr."""
    proc.send_signal(signal.SIGINT)
    time.sleep(pause)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=25)  # a hang: every test here gives a lock timeout of 30 s
    return err


@pytest.mark.backends("sqlite")
def test_a_second_ctrl_c_ends_the_wait_to_record_the_stop(db: Db) -> None:
    """The first Ctrl-C stops the run after its batch; recording the stop then waits for SQLite's lock, which
    another writer holds. The second Ctrl-C ends that wait at once: exit 7, the stop message, whole batches."""
    gateway(db, range(7000, 7100))
    proc = cli(
        *("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "0.5", "--lock-timeout", "30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: len(ledger(db)) >= 2)
    holder = _hold_write_lock(db)
    try:
        err = _ctrl_c_twice(proc, 0.5)
    finally:
        holder.rollback()
        holder.close()
    assert proc.returncode == ExitCode.STOPPED, err
    assert err.splitlines()[-1].startswith("Error: stopped by SIGINT") and "database is locked" not in err, err
    assert tagged(db) == ledger(db)
    result = run_cli("run", "--database-url", db.url, "-q", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["resumed"] is True, result.stderr
    assert tagged(db) == set(range(7000, 7100))
