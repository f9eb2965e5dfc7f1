"""A real ``mlflow server`` of one release over one database, and the experiment list its UI asks for.

``mlflow db upgrade`` can run first in the same interpreter (MLflow's own click commands, one after the
other): importing MLflow's CLI costs about 4.5 s of CPU, which a separate ``mlflow db upgrade`` process
would pay again for every database of the migration check.

The server runs in its own process group (session) on a free loopback port, with job execution off
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: from 3.17 its job workers would otherwise outlive the
server's pid). Stopping it signals that whole group, and only that group, and waits until no member is
left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa

from tests.mlflow_versions import release_env

UI_FILTER = "tags.`mlflow.experiment.isGateway` IS NULL"
UPGRADED = "mgb: mlflow db upgrade succeeded"
# argv: URL, then `mlflow server`'s arguments.
_UPGRADE_THEN_SERVE = f"""
import sys
from mlflow.cli import cli
cli.main(["db", "upgrade", sys.argv[1]], prog_name="mlflow", standalone_mode=False)
print({UPGRADED!r}, flush=True)
cli.main(sys.argv[2:], prog_name="mlflow")
"""
UI_QUERY = {"max_results": "25", "order_by": "last_update_time DESC", "filter": UI_FILTER}
START_TIMEOUT = 180.0


def mlflow_url(url: str) -> str:
    """``url`` as an MLflow user writes it, for the drivers the release venvs have.

    Plain ``postgresql://`` (psycopg2 under SQLAlchemy 2.0, psycopg 3 under 2.1) and ``mysql+pymysql://``
    (PyMySQL, also for MariaDB), whatever driver the tests' own URLs name.
    """
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql")
    elif backend in ("mysql", "mariadb"):
        parsed = parsed.set(drivername="mysql+pymysql")
    return parsed.render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may contain anything.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class _PortTaken(Exception):
    pass


class MlflowServer:
    """``with MlflowServer(python, url, workdir) as server:`` a running server; ``server.ui_experiments()``."""

    def __init__(
        self,
        python: Path,
        database_url: str,
        workdir: Path,
        upgrade_first: bool = False,
        read_replica: str | None = None,
    ) -> None:
        self.python = python
        self.upgrade_first = upgrade_first
        self.database_url = mlflow_url(database_url)
        # MLflow 3's --read-replica-backend-store-uri: every read, the UI's experiment list included, from there.
        self.read_replica = mlflow_url(read_replica) if read_replica else None
        self.workdir = workdir
        self.log = workdir / "mlflow-server.log"
        self.base = ""
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        # The port is free when picked but may be taken before the server binds it (another test's
        # server, started in parallel): then try another one.
        for _ in range(3):
            self._spawn(free_port())
            try:
                self._wait_until_ready()
                return
            except _PortTaken:
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"mlflow server found no free port:\n{self.log_tail()}")

    def _spawn(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        artifacts = self.workdir / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        if self.upgrade_first:
            command = [str(self.python), "-c", _UPGRADE_THEN_SERVE, self.database_url]
        else:
            command = [str(self.python), "-m", "mlflow"]
        command += [
            "server",
            "--backend-store-uri",
            self.database_url,
            "--default-artifact-root",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        if self.read_replica:
            command += ["--read-replica-backend-store-uri", self.read_replica]
        env = release_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "address already in use" in self.log_tail().lower():
                    raise _PortTaken
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"mlflow server did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def upgrade(self) -> None:
        """``mlflow db upgrade`` on the database alone (no server): for a read replica that must replay the
        new schema before the server starts, since the server checks the schema version where it reads."""
        command = [str(self.python), "-m", "mlflow", "db", "upgrade", self.database_url]
        done = subprocess.run(command, cwd=self.workdir, env=release_env(), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"mlflow db upgrade exited with {done.returncode}:\n{done.stderr[-4000:]}")

    def upgraded(self) -> bool:
        """Whether ``mlflow db upgrade`` ran first and succeeded."""
        return UPGRADED in self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after 20 s; wait until none is left."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group's id is the leader's pid
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.process.poll() is not None and not _group_members(pgid):
                    break
                time.sleep(0.1)
            else:
                continue
            break
        self.process.wait(timeout=10)
        left = _group_members(pgid)
        self.process = None
        if left:
            raise RuntimeError(f"processes {left} of the mlflow server's group survived SIGKILL")

    def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"GET {url}: {exc.code} {exc.read()[:2000]!r}\n{self.log_tail()}") from exc

    def ui_experiments(self) -> list[dict[str, Any]]:
        """The experiment list MLflow's UI shows: its own request, every page (``next_page_token``)."""
        experiments: list[dict[str, Any]] = []
        params = dict(UI_QUERY)
        while True:
            page = self.get("/ajax-api/2.0/mlflow/experiments/search", params)
            experiments += page.get("experiments", [])
            token = page.get("next_page_token")
            if not token:
                return experiments
            params["page_token"] = token
