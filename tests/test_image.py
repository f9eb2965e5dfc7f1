"""The container image, run as users run it: ``docker run --rm -e MLFLOW_BACKEND_STORE_URI=... IMAGE run``.

The image is built (``make image``, idempotent) once per session; an image that cannot be built fails these
tests, it is never skipped. The containers use the host's network, so the URLs of the test servers
(published on localhost) work unchanged inside them.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from backfill import __version__
from backfill.sql import IS_GATEWAY_KEY
from tests.conftest import REPO, Db
from tests.mlflow_data import MlflowData, populate

IMAGE = f"mlflow-gateway-backfill:{__version__}"


pytestmark = pytest.mark.image


def build_image() -> str:
    """``make image``: builds the image when it is missing or out of date (else a no-op); fails the test when it
    cannot, never skips it."""
    build = subprocess.run(["make", "image"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if build.returncode != 0:
        pytest.fail(f"make image failed ({build.returncode}):\n{build.stdout}\n{build.stderr}", pytrace=False)
    return IMAGE


@pytest.fixture(scope="session")
def image() -> str:
    return build_image()


def docker_run(
    image: str,
    *args: str,
    env: dict[str, str] | None = None,
    entrypoint: str | None = None,
    user: str | None = None,
    mounts: dict[Path, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``docker run --rm --read-only --network host [--user U] [-e K=V ...] [-v HOST:PATH:ro ...] IMAGE ARGS`` to
    the end; the container is removed in any case. ``--read-only``: the tool writes nothing to its own file
    system (Kubernetes' readOnlyRootFilesystem in deploy/ relies on it)."""
    name = f"mgb-pkg-image-{secrets.token_hex(6)}"
    command = ["docker", "run", "--rm", "--read-only", "--name", name, "--network", "host"]
    if user:
        command += ["--user", user]
    for key, value in (env or {}).items():
        command += ["-e", f"{key}={value}"]
    for host, inside in (mounts or {}).items():
        command += ["-v", f"{host}:{inside}:ro"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    try:
        return subprocess.run([*command, image, *args], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def gateway_data(db: Db) -> MlflowData:
    """Real gateway experiments, as MLflow 3.10.0 left them (one of them deleted), and ordinary ones."""
    return populate(db.url, gateway=3, ordinary=2, deleted_gateway=1)


def tagged(db: Db) -> set[int]:
    return {e for e, key, value in db.tags() if key == IS_GATEWAY_KEY and value == "true"}


def test_image_metadata(image: str) -> None:
    """Entry point, non-root numeric user, working directory with alembic.ini, both tags on one image."""
    inspect = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True, check=True)
    config = json.loads(inspect.stdout)[0]["Config"]
    assert config["Entrypoint"] == ["mlflow-gateway-backfill"]
    assert config["User"] == "10001:10001"
    assert config["WorkingDir"] == "/app"
    latest = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", image, "mlflow-gateway-backfill:latest"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(set(latest.stdout.split())) == 1
    listing = docker_run(image, "-c", "id -u; ls /app; alembic heads", entrypoint="sh")
    assert listing.returncode == 0, listing.stderr
    uid, *rest = listing.stdout.split()
    assert uid == "10001"
    assert {"alembic.ini", "migrations"} <= set(rest)
    assert "(head)" in listing.stdout


def test_image_version(image: str) -> None:
    result = docker_run(image, "--version")
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (["verify", "--database-url", "bogus://x"], {}, 2),  # unsupported URL
        (["run", "--no-such-option"], {}, 2),  # click's usage error
        (["status"], {}, 4),  # nothing configured: sqlite:///mlflow.db, which does not exist
        (["status"], {"MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@127.0.0.1:1/x"}, 3),  # nothing listens
    ],
    ids=["bad-url", "bad-option", "no-database", "cannot-connect"],
)
def test_image_exit_codes_pass_through(image: str, args: list[str], env: dict[str, str], code: int) -> None:
    result = docker_run(image, *args, env=env)
    assert result.returncode == code, result.stdout + result.stderr


@pytest.mark.backends("postgresql", "mysql")
def test_image_run_verify_revert(image: str, db: Db) -> None:
    """The whole cycle through ``docker run``, the URL in MLFLOW_BACKEND_STORE_URI, as on a tracking server."""
    data = gateway_data(db)
    gateway = set(data.gateway + data.deleted_gateway)
    before = db.tags()
    env = {"MLFLOW_BACKEND_STORE_URI": db.url}

    missing = docker_run(image, "verify", env=env)
    assert missing.returncode == 1, missing.stdout + missing.stderr

    run = docker_run(image, "run", "--json", env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["inserted"] == len(gateway)
    assert tagged(db) == gateway
    assert db.tags() - before == {(e, IS_GATEWAY_KEY, "true") for e in gateway}

    done = docker_run(image, "verify", env=env)
    assert done.returncode == 0, done.stdout + done.stderr

    again = docker_run(image, "run", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["inserted"] == 0

    revert = docker_run(image, "revert", "--yes", env=env)
    assert revert.returncode == 0, revert.stderr
    assert db.tags() == before
    assert docker_run(image, "verify", env=env).returncode == 1


@pytest.mark.backends("postgresql", "mysql")
def test_image_alembic_upgrade_head(image: str, db: Db) -> None:
    """``--entrypoint alembic ... upgrade head``: alembic.ini found in the working directory, database from the env."""
    data = gateway_data(db)
    env = {"MLFLOW_BACKEND_STORE_URI": db.url}
    upgrade = docker_run(image, "upgrade", "head", env=env, entrypoint="alembic")
    assert upgrade.returncode == 0, upgrade.stderr
    assert tagged(db) == set(data.gateway + data.deleted_gateway)
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version_gateway_backfill")).scalar_one()
    current = docker_run(image, "current", env=env, entrypoint="alembic")
    assert current.returncode == 0, current.stderr
    assert "(head)" in current.stdout
    assert docker_run(image, "verify", env=env).returncode == 0


@pytest.mark.backends("postgresql", "mysql")
def test_image_wrong_password(image: str, db: Db) -> None:
    """A login failure exits 3 and prints neither the wrong password nor the right one."""
    gateway_data(db)
    url = sa.make_url(db.url)
    wrong = secrets.token_hex(8)
    env = {"MLFLOW_BACKEND_STORE_URI": url.set(password=wrong).render_as_string(hide_password=False)}
    for command in (["run"], ["verify"], ["status", "--json"]):
        result = docker_run(image, *command, env=env)
        assert result.returncode == 3, f"{command}: {result.stdout}{result.stderr}"
        output = result.stdout + result.stderr
        assert wrong not in output
        assert (url.password or "") not in output
        assert output.startswith("Error: ")


@pytest.mark.backends("postgresql")
def test_image_stops_on_sigterm_with_exit_7(image: str, db: Db) -> None:
    """``docker stop`` (SIGTERM to PID 1, as a pod's deletion sends) stops the run between batches: exit 7,
    nothing half-written, and a second run completes it."""
    data = gateway_data(db)
    gateway = set(data.gateway + data.deleted_gateway)
    name = f"mgb-pkg-image-{secrets.token_hex(6)}"
    args = ["run", "--batch-size", "1", "--min-batch-size", "1", "--fixed", "--sleep", "30"]
    start = ["docker", "run", "-d", "--read-only", "--name", name, "--network", "host"]
    subprocess.run([*start, "-e", f"MLFLOW_BACKEND_STORE_URI={db.url}", image, *args], check=True, timeout=60)
    try:
        deadline = time.monotonic() + 120
        while not tagged(db) and time.monotonic() < deadline:  # the first batch is in: it now sleeps 30 s
            time.sleep(0.2)
        assert tagged(db), "the first batch never committed"
        subprocess.run(["docker", "stop", "-t", "60", name], check=True, capture_output=True, timeout=120)
        state = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True, text=True, check=True
        )
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, check=True)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    assert int(state.stdout) == 7, logs.stderr
    assert "SIGTERM" in logs.stderr
    assert tagged(db) < gateway
    resumed = docker_run(image, "run", env={"MLFLOW_BACKEND_STORE_URI": db.url})
    assert resumed.returncode == 0, resumed.stderr
    assert tagged(db) == gateway


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize("variable", ["DATABASE_URL", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_TRACKING_URI"])
def test_image_reads_each_documented_variable(image: str, db: Db, variable: str) -> None:
    data = gateway_data(db)
    result = docker_run(image, "status", "--json", env={variable: db.url})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["missing"] == len(data.gateway + data.deleted_gateway)
