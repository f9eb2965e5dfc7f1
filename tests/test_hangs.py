"""A server that stops answering cannot hang any command: every statement, commit, lock and log-in has a
client-side deadline. The server is real; between it and the tool sits a TCP peer that goes silent at a
chosen moment (tests/proxy.py), as a paused container or a hung host would.

The subprocess timeouts below only catch a hang: each is several times what the command's own limits
allow (--statement-timeout 1 --lock-timeout 0.5: a deadline of 6.5 s), never a speed expectation.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa

from backfill.errors import ExitCode
from backfill.sql import SOURCE_TYPE_KEY as SRC
from tests.conftest import REPO, Db
from tests.proxy import FreezingProxy

pytestmark = pytest.mark.backends("postgresql", "mysql")
LIMITS = ("--statement-timeout", "1", "--lock-timeout", "0.5", "--connect-timeout", "2")
HANG = 60  # seconds: far beyond every limit above, far below the kernel's own TCP give-up (15 min)


def _through(proxy: FreezingProxy, db: Db) -> str:
    """``db``'s URL through the proxy. Without TLS on the MySQL family (PyMySQL uses it by default where the
    server offers it), so that the proxy can see which statement goes by; the freeze is the same either way."""
    url = proxy.url(db.url)
    if db.dialect == "mysql":
        url = sa.make_url(url).update_query_dict({"ssl_disabled": "true"}).render_as_string(hide_password=False)
    return url


def _upstream(db: Db) -> tuple[str, int]:
    url = sa.make_url(db.url)
    return url.host or "127.0.0.1", int(url.port or 0)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backfill", *args], cwd=REPO, capture_output=True, text=True, timeout=HANG
    )


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "-x", f"database-url={url}"]
    command += [f"-x{option[2:]}={value}" for option, value in zip(LIMITS[::2], LIMITS[1::2], strict=True)]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=HANG)


def _one_line(result: subprocess.CompletedProcess[str]) -> None:
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def _trigger(db: Db, postgresql: bytes, mysql: bytes) -> bytes:
    return postgresql if db.dialect == "postgresql" else mysql


@pytest.mark.parametrize(
    ("command", "pg_trigger", "my_trigger"),
    [
        (["status"], b"COUNT(x.experiment_id)", b"COUNT(x.experiment_id)"),
        (["verify"], b"COUNT(*)", b"COUNT(*)"),
        (["run", "--dry-run"], b"COUNT(*)", b"COUNT(*)"),
        (["run"], b"pg_class", b"SELECT DATABASE()"),  # the schema check
        (["run"], b"gateway_backfill_lock", b"gateway_backfill_lock"),  # the runner lock (its lease)
        (["run"], b"INSERT INTO", b"INSERT INTO"),  # a batch (or the privilege probe)
        (["revert", "--yes"], b"DELETE FROM", b"DELETE FROM"),
    ],
    ids=["status", "verify", "dry-run", "schema-check", "lock", "batch", "revert"],
)
def test_a_server_that_stops_answering_mid_command(
    db: Db, command: list[str], pg_trigger: bytes, my_trigger: bytes
) -> None:
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 6)])
    if command[0] == "revert":
        assert _cli("run", "--database-url", db.url, "-q").returncode == 0
    writes = command[0] in ("run", "revert") and "--dry-run" not in command
    retries = ("--retries", "1") if writes else ()
    with FreezingProxy(_upstream(db), trigger=_trigger(db, pg_trigger, my_trigger)) as proxy:
        result = _cli(*command, "--database-url", _through(proxy, db), *LIMITS, *retries)
        assert proxy.frozen.is_set(), "the proxy never saw the statement it waits for"
    assert result.returncode in (ExitCode.CONNECT, ExitCode.STOPPED), result.stderr
    _one_line(result)
    assert "did not answer" in result.stderr or "resume" in result.stderr or "again" in result.stderr


@pytest.mark.parametrize("command", [["run"], ["revert", "--yes"], ["status"]])
def test_a_server_that_stops_answering_before_any_write_is_given_up_at_once(db: Db, command: list[str]) -> None:
    """Before anything is under way (the schema check), a server that stopped answering is exit 3 after one
    deadline: it is not tried again on new connections at the default --retries 5, each of which would cost
    a connect timeout (and, with the default limits, a run could wait minutes)."""
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 6)])
    assert _cli("run", "--database-url", db.url, "-q").returncode == 0
    # MySQL: the inspection's SHOW FULL TABLES (SELECT DATABASE() is also the dialect's first statement on a
    # new connection, whose freeze is a failure to connect, tried again like one).
    with FreezingProxy(_upstream(db), trigger=_trigger(db, b"pg_class", b"SHOW FULL TABLES")) as proxy:
        result = _cli(*command, "--database-url", _through(proxy, db), *LIMITS)
        assert proxy.frozen.is_set(), "the proxy never saw the statement it waits for"
    assert result.returncode == ExitCode.CONNECT, result.stderr
    _one_line(result)
    assert "did not answer within" in result.stderr
    assert proxy.accepted == 1, f"{proxy.accepted} connections: the frozen server was tried again"


def test_alembic_on_a_server_that_stops_answering(db: Db) -> None:
    """Alembic's own steps (its version table) are under the same deadline as the batches."""
    db.add_experiments([(e, "active", [(SRC, "GATEWAY")]) for e in range(1, 6)])
    with FreezingProxy(_upstream(db), trigger=b"alembic_version_gateway_backfill") as proxy:
        result = _alembic(_through(proxy, db), "upgrade", "head")
        assert proxy.frozen.is_set()
    assert result.returncode in (ExitCode.CONNECT, ExitCode.STOPPED), result.stderr
    assert "Traceback" not in result.stderr


def test_a_server_that_never_sends_its_handshake(db: Db) -> None:
    """TCP accepted, then silence: the connect timeout bounds the log-in (not the statement timeout)."""
    with FreezingProxy(None) as proxy:
        result = _cli(
            "status", "--database-url", proxy.url(db.url), "--connect-timeout", "2", "--statement-timeout", "3000"
        )
    assert result.returncode == ExitCode.CONNECT, result.stderr
    _one_line(result)
