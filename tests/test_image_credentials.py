"""The image under any user id, and with credentials as deployments hand them over: libpq's variables,
.pgpass, a secret file mounted read-only.

OpenShift runs a pod under a random user id in group 0; bitnami's charts under 1001: neither has a passwd
entry in the image. ``MGB_IMAGE_NAME`` names the image to build and run (default mlflow-gateway-backfill),
so that work trees building their own image side by side do not run each other's.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from backfill import __version__
from backfill.errors import ExitCode
from tests.conftest import Db
from tests.logins import Login, create_login
from tests.test_image import build_image, docker_run, gateway_data, tagged

pytestmark = pytest.mark.image
LOCAL_IMAGE = f"{os.environ.get('MGB_IMAGE_NAME') or 'mlflow-gateway-backfill'}:{__version__}"


@pytest.fixture(scope="session")
def image() -> str:
    build_image()  # `make image`, which honours MGB_IMAGE_NAME
    return LOCAL_IMAGE


docker = docker_run  # tests/test_image.py's: --read-only, as a pod runs it, with a user and mounts


def container_url(login: Login, password: str | None = None) -> str:
    """The login's URL as seen from a container on the host network (localhost works there too)."""
    return login.url_with(password)


def libpq_env(login: Login) -> dict[str, str]:
    return {"PGHOST": login.host, "PGPORT": str(login.port), "PGDATABASE": login.database, "PGUSER": login.user}


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize("user", ["random-uid:0", "1001"], ids=["openshift-random-uid", "bitnami-1001"])
def test_image_runs_under_any_user_id(image: str, db: Db, user: str) -> None:
    """``--user <random>:0`` (OpenShift) and ``--user 1001`` (bitnami), read-only root: run, verify and
    ``alembic upgrade head`` work, with no passwd entry and HOME=/."""
    if user.startswith("random-uid"):
        user = f"{secrets.randbelow(10**9) + 100_000}:0"
    data = gateway_data(db)
    env = {"MLFLOW_BACKEND_STORE_URI": db.url}
    who = docker(image, "-c", "id -u; id -g", env=env, user=user, entrypoint="sh")
    assert who.returncode == 0, who.stderr
    assert who.stdout.split() == [user.split(":")[0], "0"]
    run = docker(image, "run", "--json", env=env, user=user)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["inserted"] == len(data.gateway + data.deleted_gateway)
    verify = docker(image, "verify", env=env, user=user)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    revert = docker(image, "revert", "--yes", env=env, user=user)
    assert revert.returncode == 0, revert.stderr
    upgrade = docker(image, "upgrade", "head", env=env, user=user, entrypoint="alembic")
    assert upgrade.returncode == 0, upgrade.stderr
    assert tagged(db) == set(data.gateway + data.deleted_gateway)


@pytest.mark.backends("postgresql")
def test_image_postgresql_url_alone_with_libpq_variables(image: str, db: Db, tmp_path: Path) -> None:
    """``MLFLOW_BACKEND_STORE_URI=postgresql://`` and PGHOST/PGPORT/PGDATABASE/PGUSER with PGPASSWORD, or with
    a .pgpass file (PGPASSFILE, mode 0600, owned by the container's user)."""
    data = gateway_data(db)
    login = create_login(db)
    env = {"MLFLOW_BACKEND_STORE_URI": "postgresql://", **libpq_env(login)}
    run = docker(image, "run", env={**env, "PGPASSWORD": login.password})
    assert run.returncode == 0, run.stderr
    assert f"inserted {len(data.gateway + data.deleted_gateway)} isGateway tags on postgresql+psycopg://" in run.stdout
    escaped = login.password.replace("\\", "\\\\").replace(":", "\\:")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"*:*:{login.database}:{login.user}:{escaped}\n")
    pgpass.chmod(0o600)
    verify = docker(
        image,
        "verify",
        env={**env, "PGPASSFILE": "/secrets/pgpass"},
        user=f"{os.getuid()}:0",  # libpq reads a .pgpass only its owner may read
        mounts={tmp_path: "/secrets"},
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    wrong = docker(image, "status", env={**env, "PGPASSWORD": "wrong-pw"})
    assert wrong.returncode == ExitCode.CONNECT
    assert wrong.stderr.startswith("Error: cannot connect to postgresql+psycopg://") and "$PGHOST" in wrong.stderr
    for result in (run, verify, wrong):
        assert login.password not in result.stdout + result.stderr


@pytest.mark.backends("postgresql", "mysql")
def test_image_password_file_as_a_mounted_secret(image: str, db: Db, tmp_path: Path) -> None:
    """A Kubernetes-style secret file (mode 0644, root's, a trailing newline), mounted read-only, named by
    $DATABASE_PASSWORD_FILE: it overrides the URL's wrong password, for the tool and for Alembic, under an
    arbitrary user id."""
    data = gateway_data(db)
    login = create_login(db)
    (tmp_path / "password").write_text(login.password + "\n")
    (tmp_path / "password").chmod(0o644)
    tmp_path.chmod(0o755)  # as a Kubernetes secret volume: anyone may look up the file
    env = {"DATABASE_URL": container_url(login, "wrong-pw"), "DATABASE_PASSWORD_FILE": "/secrets/password"}
    user = f"{secrets.randbelow(10**9) + 100_000}:0"
    run = docker(image, "run", env=env, user=user, mounts={tmp_path: "/secrets"})
    assert run.returncode == 0, run.stderr
    upgrade = docker(image, "upgrade", "head", env=env, user=user, mounts={tmp_path: "/secrets"}, entrypoint="alembic")
    assert upgrade.returncode == 0, upgrade.stderr
    assert tagged(db) == set(data.gateway + data.deleted_gateway)
    missing = docker(image, "status", env={**env, "DATABASE_PASSWORD_FILE": "/secrets/nope"}, user=user)
    assert missing.returncode == ExitCode.USAGE
    assert "cannot read the password file '/secrets/nope' ($DATABASE_PASSWORD_FILE)" in missing.stderr
    for result in (run, upgrade, missing):
        assert login.password not in result.stdout + result.stderr
