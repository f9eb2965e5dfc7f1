"""The command line: exit codes, one-line errors, no tracebacks, no passwords, nothing written on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from backfill.cli import cli
from backfill.sql import IS_GATEWAY_KEY as ISGW
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import REPO, Db, start_cli


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env=env)
    assert "Traceback" not in result.output
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def gw(db: Db) -> Db:
    db.add_experiments([(1001, "active", [(SRC, "GATEWAY")]), (1002, "deleted", [(SRC, "GATEWAY")])])
    return db


def test_verify_run_verify_status(gw: Db) -> None:
    code, out, _ = invoke("verify", "--database-url", gw.url)
    assert code == 1 and "missing: 2 gateway experiments lack isGateway" in out
    code, out, _ = invoke("run", "--database-url", gw.url, "--dry-run")
    assert code == 0 and "would insert 2" in out
    code, out, _ = invoke("run", "--database-url", gw.url, "--json")
    assert code == 0 and json.loads(out)["inserted"] == 2
    code, out, _ = invoke("run", "--database-url", gw.url)
    assert code == 0 and "nothing to do" in out
    code, out, _ = invoke("verify", "--database-url", gw.url, "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "missing": 0}
    code, out, _ = invoke("status", "--database-url", gw.url, "--json")
    assert json.loads(out)["inserted_by_backfill"] == 2
    code, out, _ = invoke("revert", "--database-url", gw.url, "--yes")
    assert code == 0 and "removed 2" in out
    assert ISGW not in {k for _, k, _ in gw.tags()}


def test_no_password_in_any_output(gw: Db) -> None:
    password = sa.make_url(gw.url).password
    for command in (["status"], ["run", "--dry-run"], ["run"], ["verify"]):
        code, out, err = invoke(*command, "--database-url", gw.url)
        assert code in (0, 1)
        if password:
            assert password not in out + err


@pytest.mark.backends("postgresql", "mysql")
def test_wrong_password_is_one_line_exit_3(server) -> None:  # type: ignore[no-untyped-def]
    url = sa.make_url(server.admin_url).set(password="definitely-Wrong-pw")
    code, out, err = invoke("status", "--database-url", url.render_as_string(hide_password=False))
    assert code == 3
    assert err.startswith("Error: cannot connect") and err.count("\n") == 1
    assert "definitely-Wrong-pw" not in out + err


@pytest.mark.parametrize(
    ("url", "code", "message"),
    [
        ("postgresql://user:hunter2@127.0.0.1:1/db", 3, "cannot connect"),
        ("mysql://user:hunter2@127.0.0.1:1/db", 3, "cannot connect"),
        ("oracle://user:hunter2@host/db", 2, "unsupported database"),
        ("not a url at all", 2, "malformed database URL"),
        ("postgresql://user:hunter2@host:notaport/db", 2, "malformed database URL"),
    ],
)
def test_bad_urls(url: str, code: int, message: str) -> None:
    got, out, err = invoke("status", "--database-url", url)
    assert got == code
    assert message in err and err.count("\n") == 1
    assert "hunter2" not in out + err


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    target = tmp_path / "nope.db"
    code, _, err = invoke("run", "--database-url", f"sqlite:///{target}")
    assert code == 4 and "no SQLite database" in err
    assert not target.exists()


def test_non_mlflow_database_is_refused_and_untouched(tmp_path: Path) -> None:
    target = tmp_path / "other.db"
    engine = sa.create_engine(f"sqlite:///{target}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    code, _, err = invoke("run", "--database-url", f"sqlite:///{target}")
    assert code == 4 and "not an MLflow tracking database" in err
    assert sa.inspect(engine).get_table_names() == ["t"]


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    target = tmp_path / "notes.db"
    target.write_text("just some text, not SQLite\n" * 100)
    code, _, err = invoke("status", "--database-url", f"sqlite:///{target}")
    assert code == 4 and err.count("\n") == 1 and "not an MLflow tracking database" in err


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"])
def test_postgres_uris_use_psycopg3(scheme: str) -> None:
    from backfill.urls import parse_url

    assert parse_url(f"{scheme}://u:p@h/db").drivername == "postgresql+psycopg"


@pytest.mark.parametrize("scheme", ["mysql", "mysql+mysqldb", "mysql+pymysql", "mariadb"])
def test_mysql_uris_use_pymysql(scheme: str) -> None:
    from backfill.urls import parse_url

    assert parse_url(f"{scheme}://u:p@h/db").drivername == "mysql+pymysql"


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--batch-size", "0"],
        ["run", "--sleep", "-1"],
        ["run", "--lock-timeout", "abc"],
        ["run", "--min-batch-size", "100", "--max-batch-size", "10"],
        ["run", "--no-such-option"],
        ["frobnicate"],
    ],
)
def test_invalid_options_exit_2(args: list[str], tmp_path: Path) -> None:
    code, _, err = invoke(*args, "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 2
    assert "Error" in err
    assert not (tmp_path / "x.db").exists()


def test_url_resolution_order(gw: Db, tmp_path: Path) -> None:
    """--database-url, $DATABASE_URL, $MLFLOW_BACKEND_STORE_URI, $MLFLOW_TRACKING_URI (a database URI only),
    sqlite:///mlflow.db: each wins over everything after it."""
    clean = {"DATABASE_URL": "", "MLFLOW_BACKEND_STORE_URI": "", "MLFLOW_TRACKING_URI": ""}
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"  # does not exist: using it would exit 4
    cases = [
        {"DATABASE_URL": gw.url, "MLFLOW_BACKEND_STORE_URI": elsewhere, "MLFLOW_TRACKING_URI": elsewhere},
        {"MLFLOW_BACKEND_STORE_URI": gw.url, "MLFLOW_TRACKING_URI": elsewhere},
        {"MLFLOW_TRACKING_URI": gw.url},
    ]
    for env in cases:
        code, out, err = invoke("verify", "--json", env={**clean, **env})
        assert code == 1 and json.loads(out)["missing"] == 2, (env, err)
    code, out, _ = invoke("verify", "--json", "--database-url", gw.url, env={**clean, "DATABASE_URL": elsewhere})
    assert code == 1 and json.loads(out)["missing"] == 2
    # a file store is not a database: said so, rather than falling through to another database
    code, _, err = invoke("verify", env={**clean, "MLFLOW_BACKEND_STORE_URI": "./mlruns"})
    assert code == 2 and "MLFLOW_BACKEND_STORE_URI is not a database URI" in err
    # an http tracking URI is not a database: fall through to sqlite:///mlflow.db in the working directory
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, _, err = invoke("verify", env={**clean, "MLFLOW_TRACKING_URI": "http://localhost:5000"})
    finally:
        os.chdir(cwd)
    assert code == 4 and "mlflow.db'" in err


def test_python_dash_m_and_help_teach() -> None:
    for command in ("run", "status", "verify", "revert"):
        result = subprocess.run(
            [sys.executable, "-m", "backfill", command, "--help"], capture_output=True, text=True, cwd=REPO, check=True
        )
        assert "Example" in result.stdout
    top = subprocess.run([sys.executable, "-m", "backfill", "--help"], capture_output=True, text=True, check=True)
    assert "Exit codes" in top.stdout


def test_sigterm_stops_after_the_batch_in_flight_and_resumes(gw: Db) -> None:
    gw.add_experiments([(5000 + i, "active", [(SRC, "GATEWAY")]) for i in range(400)])
    proc = start_cli("run", "--database-url", gw.url, "--batch-size", "1", "--fixed", "--sleep", "0.05")
    import time

    deadline = time.monotonic() + 60
    engine = sa.create_engine(gw.url)
    while time.monotonic() < deadline:  # wait until some batches have committed
        with engine.connect() as conn:
            if (
                sa.inspect(conn).has_table("gateway_backfill_rows")
                and conn.execute(sa.text("SELECT COUNT(*) FROM gateway_backfill_rows")).scalar_one() >= 3
            ):
                break
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err
    assert "run again" in err.lower() or "resume" in err.lower()
    assert "Traceback" not in err
    code, out, _ = invoke("run", "--database-url", gw.url, "--json")
    assert code == 0 and json.loads(out)["resumed"] is True
    code, _, _ = invoke("verify", "--database-url", gw.url)
    assert code == 0
    engine.dispose()
