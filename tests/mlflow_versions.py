"""Real MLflow releases for the migration check, each in its own cached virtualenv.

The venvs live outside the repository, so fresh clones and CI runs on the same machine reuse them:
``$MGB_MLFLOW_VENVS/<version>`` (default ``/var/cache/mgb-mlflow-venvs``, or ``~/.cache/mgb-mlflow-venvs``
where that cannot be written). uv builds them (``uv venv`` + ``uv pip install``) with its own cache beside
them (``<root>/.uv-cache``, on the same file system so uv can hard-link). Every release gets the drivers
MLflow uses for each backend: psycopg2 and psycopg 3 (``postgresql://`` means either, depending on the
SQLAlchemy the release resolves to), PyMySQL (``mysql+pymysql://``).

Transitive dependencies are resolved as the package index stood on ``EXCLUDE_NEWER``, so a venv built
later (on a new machine, after a cache wipe) gets the same versions; moving that date rebuilds them all.

Safe when several processes ask for the same venv at once (pytest workers, two checkouts): an exclusive
lock per release, a build in a temporary directory next to the target, then an atomic rename. A venv
is reused only when its recorded spec (requirements, Python, date) is the one asked for.

    python -m tests.mlflow_versions                       # build (or reuse) all of them, print the seconds
    python -m tests.mlflow_versions --root /tmp/v --uv-cache /tmp/c 3.10.0   # e.g. measure a cold build
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

# Plain postgresql:// means psycopg2 to SQLAlchemy 2.0 (2.22.5's) and psycopg 3 to SQLAlchemy 2.1 (3.10+'s).
DRIVERS = ("psycopg2-binary", "psycopg[binary]", "PyMySQL")
RELEASES: dict[str, tuple[str, ...]] = {
    # The last 2.x. It declares sqlalchemy<3 but fails to import on SQLAlchemy 2.1 (its store imports
    # sqlalchemy.pool.FallbackAsyncAdaptedQueuePool, which 2.1 removed), so its users have 2.0.
    "2.22.5": ("mlflow==2.22.5", "SQLAlchemy>=2.0,<2.1", *DRIVERS),
    "3.10.0": ("mlflow==3.10.0", *DRIVERS),  # the first with gateway experiments, without isGateway
    "3.10.1": ("mlflow==3.10.1", *DRIVERS),  # tags new gateway experiments isGateway=true
    "3.17.2": ("mlflow==3.17.2", *DRIVERS),  # the newest that installs (3.18.0's mlflow-skinny is not served)
}
NEWEST = "3.17.2"
EXCLUDE_NEWER = "2026-11-26T00:00:00Z"
SPEC_FILE = ".mgb-spec.json"
UV_REQUIREMENT = "uv>=0.9,<1"


def venv_root() -> Path:
    """Where the venvs live: ``$MGB_MLFLOW_VENVS``, else /var/cache/mgb-mlflow-venvs when writable."""
    configured = os.environ.get("MGB_MLFLOW_VENVS")
    if configured:
        return Path(configured)
    system = Path("/var/cache/mgb-mlflow-venvs")
    try:
        system.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path.home() / ".cache" / "mgb-mlflow-venvs"
    return system if os.access(system, os.W_OK) else Path.home() / ".cache" / "mgb-mlflow-venvs"


def _base_python() -> str:
    """The interpreter the venvs are made from: the one running this code, outside any venv."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _spec(version: str) -> dict[str, object]:
    return {
        "requirements": list(RELEASES[version]),
        "python": ".".join(map(str, sys.version_info[:3])),
        "exclude_newer": EXCLUDE_NEWER,
        "compile_bytecode": True,
    }


def _uv(root: Path) -> str:
    """uv: the project environment's ``uv`` package, else one bootstrapped with pip beside the venvs.

    The bootstrap keeps the check working in an environment made before uv was a test dependency.
    """
    try:
        from uv import find_uv_bin
    except ImportError:
        tool = _ensure(root, "uv-tool", {"requirements": [UV_REQUIREMENT]}, _build_uv_tool)
        return str(tool / "bin" / "uv")
    return find_uv_bin()


def _build_uv_tool(target: Path, spec: dict[str, object]) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, capture_output=True, timeout=300)
    command = [str(python_of(target)), "-m", "pip", "install", "--quiet", UV_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pip install {UV_REQUIREMENT} failed:\n{result.stderr[-3000:]}")


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def release_env(**extra: str) -> dict[str, str]:
    """The environment to run a release in: none of the caller's MLFLOW_* settings, and no telemetry
    (MLflow 3.x would otherwise try to send usage events off this machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", **extra}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_ready(venv: Path, spec: dict[str, object]) -> bool:
    try:
        return json.loads((venv / SPEC_FILE).read_text()) == spec
    except (OSError, ValueError):
        return False


def ensure_venv(version: str, root: Path | None = None, uv_cache: Path | None = None) -> Path:
    """The venv of MLflow ``version`` (a key of RELEASES), built first if missing or stale; returns its path."""
    root = root or venv_root()
    cache = uv_cache or root / ".uv-cache"
    return _ensure(root, version, _spec(version), lambda target, spec: _build(target, spec, _uv(root), cache))


def _ensure(root: Path, name: str, spec: dict[str, object], build: Callable[[Path, dict[str, object]], None]) -> Path:
    """``root/name`` as ``build`` makes it for ``spec``, reused while its recorded spec matches.

    Built in a temporary directory under a per-name lock and renamed into place, so that concurrent
    callers build it once and never see a half-built venv.
    """
    venv = root / name
    if _is_ready(venv, spec):
        return venv
    with _locked(root / f".{name}.lock"):
        if _is_ready(venv, spec):  # another process built it while we waited
            return venv
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=root))
        try:
            build(staging, spec)
            (staging / SPEC_FILE).write_text(json.dumps(spec))
            if venv.exists():  # stale: a different spec; move it aside first (rename cannot replace a directory)
                stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=root))
                venv.rename(stale / "venv")
                shutil.rmtree(stale, ignore_errors=True)
            staging.rename(venv)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return venv


def _build(target: Path, spec: dict[str, object], uv: str, uv_cache: Path) -> None:
    """A relocatable venv with the spec's requirements in ``target`` (renamed afterwards).

    Bytecode is compiled here, once: left to the first import it is never cached where
    PYTHONDONTWRITEBYTECODE is set (as on the project's machines), and every MLflow process of the check
    would then compile MLflow again (about 5 s of CPU each).
    """
    env = {**os.environ, "UV_CACHE_DIR": str(uv_cache), "UV_NO_CONFIG": "1"}
    requirements = [str(r) for r in spec["requirements"]]  # type: ignore[attr-defined]

    def run(*args: str) -> None:
        result = subprocess.run([uv, *args], env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"uv {' '.join(args[:2])} failed for {requirements[0]}:\n{result.stderr[-3000:]}")

    run("venv", "--quiet", "--relocatable", "--allow-existing", "--python", _base_python(), str(target))
    run(
        "pip",
        "install",
        "--quiet",
        "--compile-bytecode",
        "--exclude-newer",
        str(spec["exclude_newer"]),
        "--python",
        str(python_of(target)),
        *requirements,
    )


def ensure_all(versions: list[str] | None = None) -> dict[str, Path]:
    """All the venvs (default: every release), built side by side; returns version -> venv."""
    versions = versions or list(RELEASES)
    with ThreadPoolExecutor(max_workers=len(versions)) as pool:
        return dict(zip(versions, pool.map(ensure_venv, versions), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="*", metavar="VERSION", help=f"default: all of {', '.join(RELEASES)}")
    parser.add_argument("--root", type=Path, help="where the venvs go (default: $MGB_MLFLOW_VENVS or the cache)")
    parser.add_argument("--uv-cache", type=Path, help="uv's cache (default: ROOT/.uv-cache)")
    args = parser.parse_args()
    unknown = sorted(set(args.versions) - set(RELEASES))
    if unknown:
        parser.error(f"unknown release(s) {unknown}; choose from {list(RELEASES)}")
    for version in args.versions or list(RELEASES):
        start = time.monotonic()
        venv = ensure_venv(version, args.root, args.uv_cache)
        print(f"{version}: {venv} ({time.monotonic() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
