"""MLFLOW_VERSIONS, the matrix it makes, and how each release is installed (tests/mlflow_versions.py).

No venv is built here: building and running the releases is the migration check's part
(tests/test_migration_check.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.mlflow_versions import (
    AUTO,
    DRIVERS,
    EXCLUDE_NEWER,
    MATRIX,
    NEWEST,
    RELEASES,
    SKINNY,
    _other_requirements,
    _spec,
    matrix,
    newest,
    release,
    requested_versions,
)


@pytest.mark.parametrize("raw", [None, "", " ", " , ,"])
def test_unset_or_empty_means_the_table(raw: str | None) -> None:
    versions = requested_versions(raw)
    assert versions is None
    assert matrix(versions) == MATRIX
    assert newest(versions) == NEWEST == "3.18.0"


def test_releases_are_read_in_order_once_each() -> None:
    assert requested_versions(" 3.18.0, 3.19.0,3.18.0 ,") == ["3.18.0", "3.19.0"]
    assert requested_versions("3.19.0rc0") == ["3.19.0rc0"]


@pytest.mark.parametrize("raw", ["latest", "mlflow==3.19.0", "3.19.0 3.20.0", "3.18.00", "v3.19.0"])
def test_anything_but_release_numbers_is_refused_in_one_line(raw: str) -> None:
    with pytest.raises(ValueError) as refused:
        requested_versions(f"3.18.0,{raw}")
    assert str(refused.value).startswith("MLFLOW_VERSIONS: ") and "\n" not in str(refused.value)


def test_each_release_alone_and_written_over_3_10_0s_untagged_experiments() -> None:
    assert matrix(["3.18.0", "3.19.0"]) == {
        "3.18.0": ("3.18.0",),
        "3.10.0+3.18.0": ("3.10.0", "3.18.0"),
        "3.19.0": ("3.19.0",),
        "3.10.0+3.19.0": ("3.10.0", "3.19.0"),
    }
    # Up to 3.10.0 there is nothing for 3.10.0 to be upgraded to.
    assert matrix(["2.22.5", "3.10.0"]) == {"2.22.5": ("2.22.5",), "3.10.0": ("3.10.0",)}
    # The default matrix is a choice among what its releases make (it leaves out 3.10.0+3.17.2).
    assert MATRIX.items() <= matrix(list(RELEASES)).items()


def test_the_ui_check_runs_on_the_newest_release() -> None:
    assert newest(["3.19.0", "3.18.0"]) == "3.19.0"
    assert newest(["3.18.0rc1"]) == "3.18.0"  # a pre-release comes before its release
    assert newest(["2.22.5"]) == NEWEST  # never an MLflow older than the table's newest


def test_how_a_release_is_installed() -> None:
    assert release("3.18.0").route == SKINNY  # mlflow-tracing==3.18.0 is not on the index
    assert release("3.17.2").route == "pip"
    outside = release("3.19.0")
    assert outside.route == AUTO and outside.exclude_newer is None  # a release after the table's date resolves


def test_a_pip_release_keeps_the_spec_its_shared_venv_was_built_with() -> None:
    """Checkouts share the venvs: a spec that changed shape would make them rebuild each other's."""
    python = ".".join(map(str, sys.version_info[:3]))
    assert _spec(RELEASES["3.10.0"]) == {
        "requirements": ["mlflow==3.10.0", *DRIVERS],
        "python": python,
        "exclude_newer": EXCLUDE_NEWER,
        "compile_bytecode": True,
    }
    assert _spec(RELEASES["2.22.5"])["requirements"] == ["mlflow==2.22.5", "SQLAlchemy>=2.0,<2.1", *DRIVERS]
    assert _spec(RELEASES["3.18.0"])["route"] == SKINNY


def test_the_skinny_route_installs_what_mlflow_declares_but_its_companions_and_extras() -> None:
    declared = [  # from mlflow 3.18.0's METADATA, abridged
        "mlflow-skinny==3.18.0",
        "mlflow-tracing==3.18.0",
        "Flask<4",
        "alembic!=1.10.0,<2",
        'gunicorn<27; platform_system != "Windows"',
        'waitress<4; platform_system == "Windows"',
        "sqlalchemy<3,>=1.4.0",
        'PyMySQL; extra == "db"',
        'fastapi<1; extra == "gateway"',
    ]
    assert _other_requirements(declared) == [
        "Flask<4",
        "alembic!=1.10.0,<2",
        'gunicorn<27; platform_system != "Windows"',
        "sqlalchemy<3,>=1.4.0",
    ]


def test_pytest_takes_the_matrix_from_mlflow_versions() -> None:
    """The variable as `make migration-check MLFLOW_VERSIONS=...` passes it: the entries pytest collects."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "migration_check",
    ]
    command.append("tests/test_migration_check.py")
    env = {**os.environ, "MGB_TEST_BACKENDS": "sqlite", "MLFLOW_VERSIONS": "3.18.0,3.19.0"}
    env.pop("MGB_MIGRATION_CHECK_URL", None)
    collected = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-3000:]
    ids = [
        line.split("[", 1)[1].rstrip("]") for line in collected.stdout.splitlines() if "::test_migration_check[" in line
    ]
    assert ids == ["sqlite-3.18.0", "sqlite-3.10.0+3.18.0", "sqlite-3.19.0", "sqlite-3.10.0+3.19.0"]

    bad = subprocess.run(
        command, cwd=REPO, env={**env, "MLFLOW_VERSIONS": "3.18.0,latest"}, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0
    assert "MLFLOW_VERSIONS: 'latest' is not an MLflow release number (e.g. 3.18.0)" in bad.stdout
