"""What a person sees: one line, a documented exit code, never a password, never a traceback; the same
from the CLI and from Alembic; signals end every command the same documented way."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from backfill.errors import ExitCode
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import LEDGER_TABLE, RUNS_TABLE
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import REPO, Db, alembic, run_cli, snapshot, start_cli


def one_line(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for secret in secrets:
        assert secret not in result.stdout + result.stderr


def gateway(db: Db, ids: range | list[int]) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in ids])


# ---------------------------------------------------------------- 12. passwords


@pytest.mark.parametrize(
    "url",
    [
        "postgresql:/user:Hunter2pw@host/db",  # one slash: unparseable
        "postgresql//user:Hunter2pw@host/db",
        "mysql:user:Hunter2pw@host/db",
        "postgresql://user:Hunter2pw@ho st:x/db",
    ],
)
def test_a_malformed_url_is_never_echoed(url: str) -> None:
    result = run_cli("status", "--database-url", url)
    assert result.returncode == ExitCode.USAGE
    one_line(result, "Hunter2pw")


def test_an_unencoded_at_sign_in_the_password_is_refused_not_half_parsed() -> None:
    result = run_cli("status", "--database-url", "postgresql://user:pa@ss-word@db.example/mlflow")
    assert result.returncode == ExitCode.USAGE
    one_line(result, "ss-word", "pa@ss")
    assert "%40" in result.stderr


@pytest.mark.backends("postgresql", "mysql")
def test_a_password_in_the_query_string_is_never_printed(db: Db) -> None:
    gateway(db, [1])
    url = sa.make_url(db.url)
    secret = url.password or ""
    key = "password" if db.dialect == "postgresql" else "passwd"
    in_query = url._replace(password=None).update_query_dict({key: secret}).render_as_string(hide_password=False)
    for command in (["run"], ["status"], ["verify"], ["run", "--dry-run"], ["revert", "--yes"]):
        result = run_cli(*command, "--database-url", in_query)
        assert result.returncode in (0, 1), result.stderr
        assert secret not in result.stdout + result.stderr
    wrong = url._replace(password=None).update_query_dict({key: "Wrong-Secret-77"}).render_as_string(False)
    result = run_cli("status", "--database-url", wrong)
    assert result.returncode == ExitCode.CONNECT
    one_line(result, "Wrong-Secret-77")


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize("password", ["a", "pass", "e", "in"])
def test_a_short_wrong_password_is_neither_shown_nor_garbling_the_message(server, password: str) -> None:  # type: ignore[no-untyped-def]
    url = sa.make_url(server.admin_url).set(password=password).render_as_string(hide_password=False)
    result = run_cli("status", "--database-url", url)
    assert result.returncode == ExitCode.CONNECT
    one_line(result)
    shown = sa.make_url(url).set(query={}).render_as_string(hide_password=True)
    assert "***" not in result.stderr.replace(shown, "")  # no blanked-out letters in the message itself
    assert "cannot connect to" in result.stderr
    assert "password" in result.stderr.lower() or "login refused" in result.stderr


@pytest.mark.backends("mysql")
@pytest.mark.parametrize("password", ["pässwörd", "пароль✓"])
def test_a_mysql_password_beyond_ascii_logs_in(db: Db, password: str) -> None:
    """The server stores the password as UTF-8 and MySQL's own client sends UTF-8; so does the tool now
    (PyMySQL sent latin-1: "pässwörd" was refused, exit 3, and "пароль✓" could not be sent at all, exit 2)."""
    from urllib.parse import quote

    gateway(db, [500])
    name = "utf8_" + os.urandom(4).hex()
    database = sa.make_url(db.url).database
    admin = sa.create_engine(db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # over utf8mb4, as the mysql client would send it
        conn.execute(sa.text(f"CREATE USER '{name}'@'%' IDENTIFIED BY :pw"), {"pw": password})
        conn.execute(sa.text(f"GRANT SELECT ON `{database}`.* TO '{name}'@'%'"))
    admin.dispose()
    url = sa.make_url(db.url)
    encoded = f"mysql://{name}:{quote(password, safe='')}@{url.host}:{url.port}/{database}"
    assert "%" in encoded and password not in encoded  # percent-encoded in the URL, as a user writes it
    result = run_cli("status", "--database-url", encoded)
    assert result.returncode == 0, result.stderr
    assert "missing isGateway:       1" in result.stdout
    assert run_cli("verify", "--database-url", encoded).returncode == ExitCode.MISSING
    almost = encoded.replace(quote(password, safe=""), quote(password[:-1], safe=""))
    wrong = run_cli("status", "--database-url", almost)
    assert wrong.returncode == ExitCode.CONNECT  # the right password, not just any, is accepted
    one_line(wrong, password, password[:-1])


# ---------------------------------------------------------------- 13. no driver exception escapes


@pytest.mark.parametrize(
    ("query", "code"),
    [("ssl_mode=DISABLED", ExitCode.USAGE), ("charset=bogus", ExitCode.USAGE), ("bogus_option=1", ExitCode.USAGE)],
)
def test_mysql_url_parameters_the_driver_rejects(query: str, code: int) -> None:
    result = run_cli("status", "--database-url", f"mysql://u:Secret-pw-1@127.0.0.1:9/db?{query}")
    assert result.returncode == code, result.stderr
    one_line(result, "Secret-pw-1")


def test_urls_the_drivers_cannot_use() -> None:
    cases = [
        ("mysql://u:pw@127.0.0.1:9", ExitCode.USAGE),  # no database
        ("postgresql://u:pw@127.0.0.1:9/db?sslmode=bogus", ExitCode.USAGE),
        ("postgresql://u:pw@127.0.0.1:9/db?bogus=1", ExitCode.USAGE),
    ]
    for url, code in cases:
        result = run_cli("status", "--database-url", url)
        assert result.returncode == code, (url, result.stderr)
        one_line(result)


@pytest.mark.parametrize(
    "args",
    [
        ["--statement-timeout", "nan"],
        ["--statement-timeout", "inf"],
        ["--statement-timeout", "1e10"],
        ["--lock-timeout", "-inf"],
        ["--connect-timeout", "nan"],
        ["--sleep", "inf"],
        ["--batch-size", "99999999999999999999"],
        ["--max-batch-size", "10000000000"],
        ["--max-rows-per-second", "nan"],
        ["--target-batch-seconds", "0"],
        ["--retries", "1000000"],
    ],
)
def test_numeric_options_out_of_range_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    result = run_cli("run", *args, "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "Traceback" not in result.stderr and "Error" in result.stderr
    assert not (tmp_path / "x.db").exists()


# ---------------------------------------------------------------- 14. Alembic's exit codes are the CLI's


@pytest.mark.backends("postgresql", "mysql")
def test_alembic_exit_codes_match_the_cli(server) -> None:  # type: ignore[no-untyped-def]
    admin = sa.make_url(server.admin_url)
    wrong_password = admin.set(password="Definitely-Wrong-9").render_as_string(hide_password=False)
    no_database = admin.set(database="no_such_db_here").render_as_string(hide_password=False)
    for url in (wrong_password, no_database):
        cli = run_cli("status", "--database-url", url)
        up = alembic(url, "upgrade", "head")
        assert cli.returncode == up.returncode == ExitCode.CONNECT, (cli.stderr, up.stderr)
        one_line(up, "Definitely-Wrong-9", admin.password or "\0")


def test_a_sqlite_path_that_is_a_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}"
    cli = run_cli("status", "--database-url", url)
    up = alembic(url, "upgrade", "head")
    assert cli.returncode == up.returncode == ExitCode.NOT_MLFLOW
    one_line(cli)
    one_line(up)


# ---------------------------------------------------------------- 15. signals


def _wait_for_ledger(db: Db, rows: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if sa.inspect(db.engine).has_table(LEDGER_TABLE) and len(db.table(LEDGER_TABLE)) >= rows:
                return
        except sa.exc.SQLAlchemyError:
            pass
        time.sleep(0.05)
    raise AssertionError("no progress")


def _slow_alembic(url: str) -> subprocess.Popen[str]:
    """`alembic upgrade head`, throttled with the CLI's tunables given as -x (small batches, pauses)."""
    command = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "-x", f"database-url={url}"]
    return subprocess.Popen(
        [*command, "-x", "batch-size=1", "-x", "sleep=0.2", "upgrade", "head"],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_alembic_upgrade_stops_it_resumably(db: Db, signum: int) -> None:
    gateway(db, range(100_000, 102_000))
    proc = _slow_alembic(db.url)
    _wait_for_ledger(db, 1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.STOPPED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"stopped by {signal.Signals(signum).name}" in err and "`alembic upgrade head` again" in err
    up = alembic(db.url, "upgrade", "head")  # resumes and completes
    assert up.returncode == 0, up.stderr
    assert len(db.table(LEDGER_TABLE)) == 2000


def test_a_second_ctrl_c_stops_run_at_once_with_exit_7(db: Db) -> None:
    gateway(db, range(1000, 1400))
    for _ in range(3):
        proc = start_cli("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "0.01", "-q")
        _wait_for_ledger(db, len(db.table(LEDGER_TABLE)) + 3 if sa.inspect(db.engine).has_table(LEDGER_TABLE) else 3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.STOPPED, (proc.returncode, err)
        assert "Traceback" not in err and "`run` again to resume" in err
    result = run_cli("run", "--database-url", db.url, "-q")
    assert result.returncode == 0, result.stderr
    assert {row[0] for row in db.table(LEDGER_TABLE)} == set(range(1000, 1400))


def test_sigterm_to_revert_says_how_to_go_on(db: Db) -> None:
    gateway(db, range(2000, 2400))
    assert run_cli("run", "--database-url", db.url, "-q").returncode == 0
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backfill",
            "revert",
            "--yes",
            "--batch-size",
            "1",
            "--sleep",
            "0.05",
            "--database-url",
            db.url,
        ],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while len(db.table(LEDGER_TABLE)) > 390 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.STOPPED, err
    assert "Traceback" not in err and "`revert` again" in err and "`run` again" not in err
    result = run_cli("revert", "--database-url", db.url, "--yes")
    assert result.returncode == 0 and db.table(LEDGER_TABLE) == []


def _revert_on_a_terminal(url: str) -> tuple[int, str, int]:
    """Start `revert` with a terminal as stdin; returns (pid, master fd) once its prompt is shown."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "backfill", "revert", "--database-url", url],
        cwd=REPO,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while b"[y/N]" not in seen and time.monotonic() < deadline:
        seen += os.read(master, 4096)
    return proc.pid, seen.decode(), master


def _finish(pid: int, master: int) -> tuple[int, str]:
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(master)
    return os.waitstatus_to_exitcode(status), out.decode()


@pytest.mark.backends("sqlite")
def test_revert_prompt_ctrl_d_declines_and_ctrl_c_interrupts(db: Db) -> None:
    gateway(db, [3000])
    assert run_cli("run", "--database-url", db.url, "-q").returncode == 0
    pid, prompt, master = _revert_on_a_terminal(db.url)
    assert "[y/N]" in prompt
    os.write(master, b"\x04")  # Ctrl-D: no answer is no
    code, out = _finish(pid, master)
    assert code == 0 and "nothing removed" in out and "Aborted" not in out
    pid, prompt, master = _revert_on_a_terminal(db.url)
    os.kill(pid, signal.SIGINT)  # Ctrl-C
    code, out = _finish(pid, master)
    assert code == ExitCode.STOPPED and "nothing removed" in out and "Traceback" not in out
    assert len(db.table(LEDGER_TABLE)) == 1


def _read_until(master: int, needle: bytes, seconds: float = 60) -> bytes:
    """What the terminal shows until ``needle`` appears (or a hang is given up on)."""
    import select

    seen = b""
    deadline = time.monotonic() + seconds
    while needle not in seen and time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:  # the process closed the terminal
                break
    return seen


@pytest.mark.backends("sqlite")
def test_revert_asks_on_the_terminal_and_keeps_stdout_for_the_report(db: Db, tmp_path: Path) -> None:
    """`revert --json > report.json` from a terminal: the question shows on the terminal (stderr), the file
    gets the JSON report and nothing else. (The question once went to stdout: nothing showed, and the file
    began with "…[y/N]: ".)"""
    gateway(db, [3100, 3101])
    assert run_cli("run", "--database-url", db.url, "-q").returncode == 0
    report = tmp_path / "report.json"
    master, slave = pty.openpty()
    with report.open("w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backfill", "revert", "--json", "--database-url", db.url],
            cwd=REPO,
            stdin=slave,
            stdout=stdout,
            stderr=slave,
        )
    os.close(slave)
    try:
        shown = _read_until(master, b"[y/N]")
        assert b"[y/N]" in shown, (shown, report.read_text())
        os.write(master, b"y\n")
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert json.loads(report.read_text())["removed"] == 2  # the whole file is the report
    assert db.table(LEDGER_TABLE) == []


# ---------------------------------------------------------------- 16. unknown -x keys


def test_an_unknown_alembic_x_key_is_refused(db: Db, tmp_path: Path) -> None:
    """`-x database_url=` (underscore) once fell back to ./mlflow.db silently."""
    gateway(db, [4000])
    before = snapshot(db.url)
    command = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini")]
    for x in (f"database_url={db.url}", "databaseurl", "batch-size=0", "sleep=nan"):
        result = subprocess.run([*command, "-x", x, "upgrade", "head"], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == ExitCode.USAGE, (x, result.stderr)
        assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no ./mlflow.db looked for, let alone made
    assert snapshot(db.url) == before


# ---------------------------------------------------------------- 17. the report's scope; a refused revert


def test_the_run_report_counts_this_invocation(db: Db) -> None:
    gateway(db, range(5000, 5010))
    proc = start_cli("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--sleep", "0.2", "-q")
    _wait_for_ledger(db, 3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    done_before = len(db.table(LEDGER_TABLE))
    result = run_cli("run", "--database-url", db.url, "--batch-size", "1", "--fixed", "--json", "-q")
    report = json.loads(result.stdout)
    assert report["resumed"] is True
    assert report["inserted"] == 10 - done_before
    assert report["batches"] == 10 - done_before  # this invocation's batches, like `inserted`
    assert report["passes"] == 1
    assert report["run_inserted"] == 10


@pytest.mark.backends("postgresql", "mysql")
def test_a_revert_refused_for_lack_of_delete_leaves_no_trace(db: Db) -> None:
    gateway(db, [6000, 6001])
    assert run_cli("run", "--database-url", db.url, "-q").returncode == 0
    name, password = "nodel_" + os.urandom(4).hex(), "pw-" + os.urandom(4).hex()
    database = sa.make_url(db.url).database
    admin = sa.create_engine(db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if db.dialect == "postgresql":
            conn.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
            conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {name}"))
            conn.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {name}"))
        else:
            conn.execute(sa.text(f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"))
            conn.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE ON `{database}`.* TO '{name}'@'%'"))
    admin.dispose()
    url = sa.make_url(db.url).set(username=name, password=password).render_as_string(hide_password=False)
    before = snapshot(db.url)
    result = run_cli("revert", "--database-url", url, "--yes")
    assert result.returncode == ExitCode.PERMISSION, result.stderr
    one_line(result, password)
    assert snapshot(db.url) == before  # no run row left `reverting`, nothing removed
    assert "reverting" not in {row[1] for row in db.table(RUNS_TABLE)}
    assert (6000, ISGW, "true") in db.tags()
