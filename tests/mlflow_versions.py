"""Real MLflow releases for the migration check, each in its own cached virtualenv, and the check's matrix.

``RELEASES`` says how each release is installed (``Release.route``):

* ``pip``: ``mlflow==X`` with its dependencies, as a user installs it.
* ``skinny``: for a release whose ``mlflow`` pins a companion package the index does not serve (3.18.0
  requires ``mlflow-tracing==3.18.0``, which is not there). The ``mlflow`` wheel holds every file of
  ``mlflow-skinny`` (and of ``mlflow-tracing``, whose files are a subset of skinny's), so: ``mlflow-skinny==X``
  with every other dependency ``mlflow==X`` declares, then ``mlflow==X --no-deps``. That is the same
  files and the same dependencies as ``pip install mlflow==X`` would give.
* ``auto``: ``pip``, and ``skinny`` when that fails. Releases named in ``MLFLOW_VERSIONS`` that are not in
  ``RELEASES`` are installed so, with their dependencies as the index stands (no ``EXCLUDE_NEWER``: a release
  that ships after that date must still resolve).

``MLFLOW_VERSIONS=3.18.0,3.19.0`` (comma-separated releases) makes the matrix ``X`` and ``3.10.0+X`` (a
database written by 3.10.0, then by X, as an upgraded user has it) for each X, instead of ``MATRIX``. The UI
check runs against the newest release of ``RELEASES`` and ``MLFLOW_VERSIONS`` (:func:`newest`).

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
is reused only when its recorded spec (requirements, route, Python, date) is the one asked for.

    python -m tests.mlflow_versions                       # build (or reuse) all of them, print the seconds
    python -m tests.mlflow_versions --root /tmp/v --uv-cache /tmp/c 3.10.0   # e.g. measure a cold build
    python -m tests.mlflow_versions --heads 3.18.0       # the MLflow schema revision each release ends at
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
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
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

# Plain postgresql:// means psycopg2 to SQLAlchemy 2.0 (2.22.5's) and psycopg 3 to SQLAlchemy 2.1 (3.10+'s).
DRIVERS = ("psycopg2-binary", "psycopg[binary]", "PyMySQL")
EXCLUDE_NEWER = "2026-11-26T00:00:00Z"
PIP, SKINNY, AUTO = "pip", "skinny", "auto"
# What the skinny route leaves out of mlflow's own requirements (their files are all in the mlflow wheel).
COMPANIONS = ("mlflow-skinny", "mlflow-tracing")


@dataclass(frozen=True)
class Release:
    """How one MLflow release is installed (see the module docstring for the routes)."""

    version: str
    pins: tuple[str, ...] = ()  # beside MLflow's own requirements
    route: str = PIP
    exclude_newer: str | None = EXCLUDE_NEWER  # None: dependencies as the index stands


RELEASES: dict[str, Release] = {
    # The last 2.x. It declares sqlalchemy<3 but fails to import on SQLAlchemy 2.1 (its store imports
    # sqlalchemy.pool.FallbackAsyncAdaptedQueuePool, which 2.1 removed), so its users have 2.0.
    "2.22.5": Release("2.22.5", pins=("SQLAlchemy>=2.0,<2.1",)),
    "3.10.0": Release("3.10.0"),  # the first with gateway experiments, without isGateway
    "3.10.1": Release("3.10.1"),  # tags new gateway experiments isGateway=true
    "3.17.2": Release("3.17.2"),
    "3.18.0": Release("3.18.0", route=SKINNY),  # mlflow-tracing==3.18.0, which mlflow 3.18.0 pins, is not served
}
UNTAGGING_RELEASE = "3.10.0"  # the one release that made gateway experiments without isGateway
# Matrix entry -> the releases that write its database, in order, each with its own interpreter.
MATRIX: dict[str, tuple[str, ...]] = {
    "2.22.5": ("2.22.5",),
    "3.10.0": ("3.10.0",),
    "3.10.0+3.10.1": ("3.10.0", "3.10.1"),
    "3.10.1": ("3.10.1",),
    "3.17.2": ("3.17.2",),
    "3.18.0": ("3.18.0",),
    "3.10.0+3.18.0": ("3.10.0", "3.18.0"),
}
VERSIONS_VARIABLE = "MLFLOW_VERSIONS"


def release(version: str) -> Release:
    """The table's entry for ``version``, else one installed the ``auto`` way against today's index."""
    return RELEASES.get(version) or Release(version, route=AUTO, exclude_newer=None)


def requested_versions(raw: str | None) -> list[str] | None:
    """``MLFLOW_VERSIONS``' releases, in order and without repeats; None when it is unset or empty.

    Raises ValueError (one line) for anything that is not a release number.
    """
    versions: list[str] = []
    for part in (raw or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            normal = str(Version(part))
        except InvalidVersion:
            raise ValueError(f"{VERSIONS_VARIABLE}: {part!r} is not an MLflow release number (e.g. 3.18.0)") from None
        if part != normal:
            raise ValueError(f"{VERSIONS_VARIABLE}: write {part!r} as MLflow numbers it: {normal}")
        if part not in versions:
            versions.append(part)
    return versions or None


def matrix(versions: list[str] | None) -> dict[str, tuple[str, ...]]:
    """The matrix for ``versions`` (``MATRIX`` when None): ``X`` for each, and ``3.10.0+X`` for each X after
    3.10.0 (gateway experiments 3.10.0 left untagged, then X's own on the same database)."""
    if versions is None:
        return dict(MATRIX)
    entries: dict[str, tuple[str, ...]] = {}
    for version in versions:
        entries[version] = (version,)
        if Version(version) > Version(UNTAGGING_RELEASE):
            entries[f"{UNTAGGING_RELEASE}+{version}"] = (UNTAGGING_RELEASE, version)
    return entries


def newest(versions: list[str] | None = None) -> str:
    """The newest release of ``RELEASES`` and ``versions``: the one the UI check serves every database with."""
    return max({*RELEASES, *(versions or ())}, key=Version)


NEWEST = newest()  # of the table alone: what tests outside the matrix serve their databases with


def candidates(versions: list[str] | None = None) -> list[str]:
    """The releases of ``RELEASES`` and ``versions``, newest first."""
    return sorted({*RELEASES, *(versions or ())}, key=Version, reverse=True)


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


def _spec(rel: Release) -> dict[str, object]:
    """What a venv is built from: it is reused only while its recorded spec is this one. A ``pip`` release's
    spec has the keys it always had, so the venvs that other checkouts share stay valid."""
    spec: dict[str, object] = {
        "requirements": [f"mlflow=={rel.version}", *rel.pins, *DRIVERS],
        "python": ".".join(map(str, sys.version_info[:3])),
        "exclude_newer": rel.exclude_newer,
        "compile_bytecode": True,
    }
    if rel.route != PIP:
        spec["route"] = rel.route
    return spec


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
    """The venv of MLflow ``version`` (see :func:`release`), built first if missing or stale; returns its path."""
    root = root or venv_root()
    cache = uv_cache or root / ".uv-cache"
    rel = release(version)
    return _ensure(root, version, _spec(rel), lambda target, spec: _build(target, rel, _uv(root), cache))


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


class InstallError(RuntimeError):
    """A release that uv could not install (its message ends with uv's own explanation)."""


def _build(target: Path, rel: Release, uv: str, uv_cache: Path) -> None:
    """A relocatable venv with ``rel`` installed its route's way in ``target`` (renamed afterwards).

    Bytecode is compiled here, once: left to the first import it is never cached where
    PYTHONDONTWRITEBYTECODE is set (as on the project's machines), and every MLflow process of the check
    would then compile MLflow again (about 5 s of CPU each).
    """
    env = {**os.environ, "UV_CACHE_DIR": str(uv_cache), "UV_NO_CONFIG": "1"}

    def run(*args: str) -> None:
        result = subprocess.run([uv, *args], env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise InstallError(
                f"uv {' '.join(args[:2])} failed for MLflow {rel.version}: {result.stderr[-3000:].strip()}"
            )

    def install(*args: str) -> None:
        cutoff = ("--exclude-newer", rel.exclude_newer) if rel.exclude_newer else ()
        run("pip", "install", "--quiet", *cutoff, "--python", str(python_of(target)), *args)

    run("venv", "--quiet", "--relocatable", "--allow-existing", "--python", _base_python(), str(target))
    if rel.route == SKINNY:
        _install_skinny(rel, target, install)
        return
    try:
        install("--compile-bytecode", f"mlflow=={rel.version}", *rel.pins, *DRIVERS)
    except InstallError as plain:
        if rel.route != AUTO:
            raise
        try:  # a resolution that fails installs nothing: the venv is still empty
            _install_skinny(rel, target, install)
        except InstallError as skinny:
            raise InstallError(
                f"MLflow {rel.version} installs neither as mlflow nor as mlflow-skinny:\n{plain}\n{skinny}"
            ) from None


def _install_skinny(rel: Release, target: Path, install: Callable[..., None]) -> None:
    """``mlflow-skinny==X`` with every other requirement ``mlflow==X`` declares, then ``mlflow==X --no-deps``
    (last, so that its files are the ones left where both wheels have a file)."""
    unpacked = Path(tempfile.mkdtemp(prefix=".mlflow-metadata-", dir=target.parent))
    try:  # the wheel unpacked aside, for its metadata: uv has no command that prints a package's requirements
        install("--no-deps", "--target", str(unpacked), f"mlflow=={rel.version}")
        (dist,) = importlib.metadata.distributions(name="mlflow", path=[str(unpacked)])
        declared = dist.requires or []
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    install(f"mlflow-skinny=={rel.version}", *_other_requirements(declared), *rel.pins, *DRIVERS)
    install("--no-deps", "--compile-bytecode", f"mlflow=={rel.version}")


def _other_requirements(declared: list[str]) -> list[str]:
    """``mlflow``'s requirements for this interpreter (the venvs' base), without extras and companions."""
    kept = []
    for line in declared:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) in COMPANIONS:
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            kept.append(str(requirement))
    return kept


# Run by a release's interpreter: the revisions of its own MLflow schema migrations. Found without importing
# mlflow (find_spec of a top-level package does not run it); Alembic loads each script.
_SCHEMA_SCRIPT = """
import importlib.util, json, os
from alembic.script import ScriptDirectory
package = os.path.dirname(importlib.util.find_spec("mlflow").origin)
scripts = ScriptDirectory(os.path.join(package, "store", "db_migrations"))
print(json.dumps({"head": scripts.get_current_head(), "revisions": [s.revision for s in scripts.walk_revisions()]}))
"""


@dataclass(frozen=True)
class Schema:
    """A release's MLflow schema: the revision ``mlflow db upgrade`` ends at, and every one it can start from."""

    head: str
    revisions: frozenset[str]


def schema_of(venv: Path) -> Schema:
    """What the release in ``venv`` knows of MLflow's schema, asked of its own interpreter."""
    command = [str(python_of(venv)), "-c", _SCHEMA_SCRIPT]
    result = subprocess.run(command, capture_output=True, text=True, env=release_env(), timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{venv}: reading MLflow's migration scripts failed:\n{result.stderr[-3000:]}")
    found = json.loads(result.stdout)
    return Schema(found["head"], frozenset(found["revisions"]))


def serving_release(revision: str | None, releases: list[str]) -> tuple[str, Path] | None:
    """The newest of ``releases`` whose migrations know ``revision`` (a database's ``alembic_version``), and
    its venv; None when none does. Venvs are built as needed, newest first."""
    for version in sorted(releases, key=Version, reverse=True):
        venv = ensure_venv(version)
        if revision in schema_of(venv).revisions:
            return version, venv
    return None


def ensure_all(versions: list[str] | None = None) -> dict[str, Path]:
    """All the venvs (default: every release of RELEASES), built side by side; returns version -> venv."""
    versions = versions or list(RELEASES)
    with ThreadPoolExecutor(max_workers=len(versions)) as pool:
        return dict(zip(versions, pool.map(ensure_venv, versions), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "versions",
        nargs="*",
        metavar="VERSION",
        help=f"default: {VERSIONS_VARIABLE}, else all of {', '.join(RELEASES)}",
    )
    parser.add_argument("--root", type=Path, help="where the venvs go (default: $MGB_MLFLOW_VENVS or the cache)")
    parser.add_argument("--uv-cache", type=Path, help="uv's cache (default: ROOT/.uv-cache)")
    parser.add_argument("--heads", action="store_true", help="also print each release's MLflow schema head")
    args = parser.parse_args()
    try:
        versions = requested_versions(",".join(args.versions) or os.environ.get(VERSIONS_VARIABLE)) or list(RELEASES)
    except ValueError as exc:
        parser.error(str(exc))
    for version in versions:
        start = time.monotonic()
        try:
            venv = ensure_venv(version, args.root, args.uv_cache)
        except InstallError as exc:
            parser.exit(1, f"{exc}\n")
        head = f", schema head {schema_of(venv).head}" if args.heads else ""
        print(f"{version}: {venv} ({time.monotonic() - start:.1f} s, {release(version).route}{head})", flush=True)


if __name__ == "__main__":
    main()
