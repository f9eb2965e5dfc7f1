"""Passwords from a file, from a command, and from libpq's variables, through the CLI, Alembic and the engine.

Every test runs against a real server with a login of its own (tests/logins.py), whose password holds
``@``, ``/``, ``:`` and ``%``; no output of any command may contain a password (the right one or a wrong one).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from backfill import credentials
from backfill.connect import close, connect, create_engine
from backfill.errors import BackfillError, ExitCode
from backfill.retry import Timeouts
from backfill.sql import SOURCE_TYPE_KEY
from backfill.urls import parse_url
from tests.conftest import Db, alembic, run_cli
from tests.logins import Login, create_login, new_password

SERVERS = pytest.mark.backends("postgresql", "mysql")
# Without these in the environment of the commands the tests start, each test controls its own.
CLEAN = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("PG", "DATABASE_", "MLFLOW_BACKEND", "MLFLOW_TRACKING", "MLFLOW_MYSQL"))
}


@pytest.fixture
def login(db: Db) -> Login:
    db.add_experiments(
        [(1001, "active", [(SOURCE_TYPE_KEY, "GATEWAY")]), (1002, "deleted", [(SOURCE_TYPE_KEY, "GATEWAY")])]
    )
    return create_login(db)


@pytest.fixture(autouse=True)
def _forget_given_sources() -> None:
    credentials.reset()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def counting_command(tmp_path: Path, password_file: Path, exit_status: int = 0) -> tuple[str, Path]:
    """A command that appends a line to a counter file at each run and prints the password file's content
    (then exits with ``exit_status``); returns the command line and the counter file."""
    counter = tmp_path / "runs"
    script = write(
        tmp_path / "password-command.sh",
        f'#!/bin/sh\necho run >> "{counter}"\ncat "{password_file}"\nexit {exit_status}\n',
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    # Quoted and with an argument, as operators write it: split like a shell line, run without a shell.
    return f"'{script}' --profile 'my profile'", counter


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = run_cli(*args, env={**CLEAN, **(env or {})})
    return result.returncode, result.stdout + result.stderr


def assert_no_password(output: str, *passwords: str) -> None:
    for password in passwords:
        assert password not in output
    assert "Traceback" not in output


@SERVERS
def test_password_file_overrides_a_wrong_password_in_the_url(login: Login, tmp_path: Path) -> None:
    """A wrong password in the URL plus the right one in the file: every command works, as the option and as
    $DATABASE_PASSWORD_FILE; a trailing newline (as in a Kubernetes secret file) is not part of it."""
    wrong = new_password()
    url = login.url_with(wrong)
    secret = write(tmp_path / "password", login.password + "\n")
    code, out = cli("verify", "--database-url", url, "--password-file", str(secret))
    assert code == 1, out  # reached the database: two gateway experiments lack the tag
    code, out = cli("run", "--json", "--database-url", url, env={"DATABASE_PASSWORD_FILE": str(secret)})
    assert code == 0, out
    assert json.loads(out.splitlines()[-1])["inserted"] == 2
    code, out2 = cli("status", "--database-url", url, "--password-file", str(secret))
    assert code == 0, out2
    assert_no_password(out + out2, login.password, wrong)
    # Without the file, the URL's wrong password is used: refused.
    code, out = cli("status", "--database-url", url)
    assert code == ExitCode.CONNECT, out
    assert_no_password(out, login.password, wrong)


@SERVERS
def test_password_file_is_read_again_for_every_new_connection(login: Login, tmp_path: Path) -> None:
    """A rotated secret file is picked up by the next connection of the same engine, in the same process."""
    secret = write(tmp_path / "password", login.password)
    credentials.configure(str(secret), None)
    engine = create_engine(parse_url(login.url_with("not-this-one")), Timeouts(retries=0))
    first = connect(engine)
    try:
        login.set_password(new_password())  # the secret rotates: server first, then the file
        write(secret, login.password + "\r\n")
        second = connect(engine)  # the first is still checked out: this is a new connection
        assert second.exec_driver_sql("SELECT 1").scalar() == 1
        write(secret, "stale")
        with pytest.raises(BackfillError) as refused:
            close(connect(engine))  # both others still checked out: a third connection, refused
        assert refused.value.code == ExitCode.CONNECT
        assert_no_password(str(refused.value), login.password, "stale")
        close(second)
    finally:
        close(first)
        engine.dispose()


@SERVERS
def test_password_command_runs_for_every_new_connection(login: Login, tmp_path: Path) -> None:
    """The command runs once per new connection, so a short-lived token is fetched again when it is needed;
    its output is the password, and a rotated one works from the next connection on."""
    current = write(tmp_path / "current", login.password + "\n")
    command, counter = counting_command(tmp_path, current)
    credentials.configure(None, command)
    engine = create_engine(parse_url(login.url_with(None)), Timeouts(retries=0))
    try:
        connections = [connect(engine) for _ in range(3)]
        assert runs(counter) == 3
        login.set_password(new_password())
        write(current, login.password)
        connections.append(connect(engine))
        assert runs(counter) == 4
        for conn in connections:
            close(conn)
    finally:
        engine.dispose()

    before = runs(counter)
    code, out = cli("run", "--database-url", login.url_with("wrong"), "--password-command", command)
    assert code == 0, out
    assert "inserted 2 isGateway tags" in out
    assert runs(counter) > before  # at least once per connection the run opened
    code, out2 = cli("verify", "--database-url", login.url_with(None), env={"DATABASE_PASSWORD_COMMAND": command})
    assert code == 0, out2
    assert_no_password(out + out2, login.password)


@SERVERS
@pytest.mark.parametrize(
    ("script", "code", "says"),
    [
        ("exit 1", ExitCode.CONNECT, "failed (exit status 1); its output is not shown"),
        ("exec sleep 60", ExitCode.CONNECT, "did not finish within 1 s"),
        ("exit 0", ExitCode.CONNECT, "printed no password"),
    ],
    ids=["non-zero", "timeout", "no-output"],
)
def test_failing_password_command_is_one_line(login: Login, tmp_path: Path, script: str, code: int, says: str) -> None:
    """A command that fails, hangs or prints nothing: one line naming the program, exit 3, and the part of
    the password it printed before failing is never shown."""
    command = write(tmp_path / "token.sh", f"#!/bin/sh\nprintf '%s' '{login.password}'\n{script}\n")
    command.chmod(0o755)
    if script == "exit 0":
        write(command, "#!/bin/sh\nexit 0\n")
    code_, out = cli(
        "status", "--database-url", login.url_with(None), "--password-command", str(command), "--connect-timeout", "1"
    )
    assert code_ == code, out
    assert out.startswith("Error: ") and out.count("\n") == 1, out
    assert says in out and "token.sh" in out
    assert_no_password(out, login.password)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--password-file", "/nonexistent/password"], {}, "cannot read the password file '/nonexistent/password'"),
        ([], {"DATABASE_PASSWORD_FILE": "/nonexistent/pw"}, "($DATABASE_PASSWORD_FILE): No such file"),
        (["--password-file", "{empty}"], {}, "is empty"),
        (["--password-command", "no-such-program-mgb --x"], {}, "'no-such-program-mgb' (--password-command) cannot"),
        (["--password-command", "'unbalanced"], {}, "cannot be parsed"),
        (["--password-file", "{empty}", "--password-command", "true"], {}, "both a password file"),
        (
            ["--password-file", "{empty}"],
            {"DATABASE_PASSWORD_COMMAND": "true"},
            "($DATABASE_PASSWORD_COMMAND) are given",
        ),
    ],
    ids=["missing-file", "missing-file-env", "empty-file", "not-found", "unparseable", "both", "both-env"],
)
def test_password_source_mistakes_are_usage_errors(tmp_path: Path, args: list[str], env: dict, says: str) -> None:
    """Exit 2 before anything is sent to a server (nothing listens on this URL's port): the configuration is
    wrong, and a retry cannot help."""
    empty = write(tmp_path / "empty", "\n")
    args = [a.replace("{empty}", str(empty)) for a in args]
    code, out = cli("status", "--database-url", "postgresql://u@127.0.0.1:1/x", *args, env=env)
    assert code == ExitCode.USAGE, out
    assert says in out and out.startswith("Error: ") and out.count("\n") == 1, out


@pytest.mark.backends("sqlite")
def test_sqlite_refuses_a_password_source(db: Db, tmp_path: Path) -> None:
    """A SQLite database is a file with no password: a password source is a mistake (exit 2), from the CLI
    and from Alembic, and nothing is written."""
    secret = write(tmp_path / "password", "x")
    before = db.table_names()
    for args, env in (
        (["--password-file", str(secret)], {}),
        (["--password-command", "echo x"], {}),
        ([], {"DATABASE_PASSWORD_FILE": str(secret)}),
    ):
        code, out = cli("run", "--database-url", db.url, *args, env=env)
        assert code == ExitCode.USAGE, out
        assert "has no use with SQLite" in out
    result = alembic(db.url, "-x", f"password-file={secret}", "upgrade", "head", env=CLEAN)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "(-x password-file) has no use with SQLite" in result.stderr
    assert db.table_names() == before


@SERVERS
def test_alembic_takes_a_password_file_or_command(login: Login, tmp_path: Path) -> None:
    """``-x password-file=`` and ``-x password-command=`` override a wrong URL password, like the CLI's options;
    so does $DATABASE_PASSWORD_FILE."""
    secret = write(tmp_path / "password", login.password + "\n")
    command, counter = counting_command(tmp_path, secret)
    wrong = login.url_with("wrong-pw")
    upgrade = alembic(wrong, "-x", f"password-command={command}", "upgrade", "head", env=CLEAN)
    assert upgrade.returncode == 0, upgrade.stderr
    assert runs(counter) >= 1
    current = alembic(wrong, "-x", f"password-file={secret}", "current", env=CLEAN)
    assert current.returncode == 0, current.stderr
    assert "(head)" in current.stdout
    down = alembic(wrong, "downgrade", "base", env={**CLEAN, "DATABASE_PASSWORD_FILE": str(secret)})
    assert down.returncode == 0, down.stderr
    refused = alembic(wrong, "current", env=CLEAN)
    assert refused.returncode == ExitCode.CONNECT
    for result in (upgrade, current, down, refused):
        assert_no_password(result.stdout + result.stderr, login.password, "wrong-pw")


@pytest.mark.backends("postgresql")
def test_postgresql_url_alone_takes_libpq_variables(login: Login, tmp_path: Path) -> None:
    """``postgresql://`` with PGHOST, PGPORT, PGDATABASE, PGUSER and PGPASSWORD (community-charts/mlflow's
    layout), or a .pgpass file instead of PGPASSWORD: libpq fills in what the URL leaves out, and the messages
    name where the connection goes and where that came from."""
    libpq = {"PGHOST": login.host, "PGPORT": str(login.port), "PGDATABASE": login.database, "PGUSER": login.user}
    shown = f"postgresql+psycopg://{login.user}@{login.host}:{login.port}/{login.database}"
    code, out = cli("run", env={**libpq, "PGPASSWORD": login.password, "MLFLOW_BACKEND_STORE_URI": "postgresql://"})
    assert code == 0, out
    assert f"on {shown} ($PGHOST, $PGPORT, $PGDATABASE, $PGUSER from the environment)" in out

    escaped = login.password.replace("\\", "\\\\").replace(":", "\\:")  # .pgpass escapes ':' and '\'
    pgpass = write(tmp_path / "pgpass", f"{login.host}:{login.port}:{login.database}:{login.user}:{escaped}\n")
    pgpass.chmod(0o600)  # libpq ignores a password file that others may read
    code, out2 = cli("verify", "--database-url", "postgresql://", env={**libpq, "PGPASSFILE": str(pgpass)})
    assert code == 0, out2

    code, out3 = cli("status", "--database-url", "postgresql://", env={**libpq, "PGPASSWORD": "wrong-pw"})
    assert code == ExitCode.CONNECT, out3
    assert out3.startswith(f"Error: cannot connect to {shown} ($PGHOST") and out3.count("\n") == 1
    assert_no_password(out + out2 + out3, login.password, "wrong-pw")

    # A password file given explicitly wins over PGPASSWORD.
    secret = write(tmp_path / "password", login.password)
    code, out4 = cli(
        "verify", "--database-url", "postgresql://", "--password-file", str(secret), env={**libpq, "PGPASSWORD": "x"}
    )
    assert code == 0, out4


def test_driver_messages_holding_an_obtained_password_are_withheld(tmp_path: Path) -> None:
    """The password read from a file joins the secrets a driver message is checked for (errors.driver_text);
    a message without it is shown as it is."""
    from backfill.errors import driver_text
    from backfill.urls import secrets

    secret = write(tmp_path / "password", "s3cr3t-from-file\n")
    credentials.configure(str(secret), None)
    source = credentials.password_source()
    assert source is not None and source.origin == "--password-file"
    assert source.obtain(5) == "s3cr3t-from-file"
    url = sa.make_url("postgresql://u@h/d")
    assert "withheld" in driver_text(RuntimeError("auth failed for s3cr3t-from-file"), secrets(url))
    assert driver_text(RuntimeError("auth failed for user u"), secrets(url)) == "auth failed for user u"


def test_help_names_the_sources_and_shows_no_value(tmp_path: Path) -> None:
    """``--help`` documents the options and the variables, and never shows their values (the command line
    may hold a secret)."""
    env = {"DATABASE_PASSWORD_COMMAND": "echo s3cr3t-cmd", "DATABASE_PASSWORD_FILE": str(tmp_path / "f")}
    for command in ("run", "status", "verify", "revert"):
        code, out = cli(command, "--help", env=env)
        assert code == 0
        for name in ("--password-file", "--password-command", "$DATABASE_PASSWORD_FILE", "$PGPASSWORD"):
            assert name in out, (command, name)
        assert "s3cr3t-cmd" not in out and str(tmp_path) not in out


def test_the_command_gets_no_shell(tmp_path: Path) -> None:
    """The command line is split like a shell's but no shell runs it: ``$VAR`` and ``;`` are literal."""
    credentials.configure(None, f"{sys.executable} -c 'import sys; print(sys.argv[1:])' $HOME ';' x")
    source = credentials.password_source()
    assert source is not None
    assert source.obtain(10) == "['$HOME', ';', 'x']"


def test_unencoded_at_in_a_url_password_is_refused_without_showing_it() -> None:
    """A password with '@' and '/' pasted into a URL unencoded (as bitnami/mlflow builds its URL) is refused
    with exit 2 and the percent-encoding to use; no part of it is shown (SQLAlchemy alone would take 'ss' for
    the host and the rest for the database name, and the message would show them)."""
    for url in ("postgresql://u:p@ss/w:rd@localhost:1/db", "mysql://u:p@ss@localhost:1/db", "postgresql://u@x@h/d"):
        code, out = cli("status", "--database-url", url)
        assert code == ExitCode.USAGE, out
        assert (
            "unencoded character" in out and "%40" in out and "ss" not in out.replace("address", "").replace("pass", "")
        ), out
