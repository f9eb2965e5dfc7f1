#!/usr/bin/env bash
# Compile the hash-pinned lock files in requirements/ from pyproject.toml with uv (`make lock`), or check
# that the committed ones are up to date (`scripts/lock.sh --check`, run by `make lint`).
#
#   requirements/test.txt     extras test + bench: every make target that runs tests, the demo or the bench
#   requirements/runtime.txt  the tool alone (make backfill / migrate, the image); compiled with test.txt as
#                             constraints, so it pins exactly the versions the tests ran with
#   requirements/uv.txt       uv itself, at the version test.txt pins: what the Makefile bootstraps with pip
#   requirements/mlflow-server.txt  from mlflow-server.in: the MLflow server of make screenshots and the
#                             compose end-to-end test
#
# Why not uv.lock: it records the index's download URL of every file, and the repository must name no
# registry host; `uv pip compile` writes names, versions, markers and hashes only.
# An existing lock is the starting point (its pins are kept while pyproject.toml allows them), so the check
# reports a change of pyproject.toml, not a new release on the index. `make lock-upgrade` takes new releases.
#
# Env: UV (the uv binary, default: uv on PATH), LOCK_UPGRADE=1 to let every pin move to the newest release.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
check=no
[ "${1:-}" = --check ] && check=yes

compile() {
    local out=$1
    shift
    "$uv" pip compile --quiet --universal --generate-hashes --custom-compile-command "make lock" \
        ${LOCK_UPGRADE:+--upgrade} "$@" -o "$out"
}

# Writes the three locks into requirements/ of the current directory (which may already hold the previous
# ones as the starting point).
lock_here() {
    local version
    mkdir -p requirements
    compile requirements/test.txt pyproject.toml --extra test --extra bench
    compile requirements/runtime.txt pyproject.toml -c requirements/test.txt
    version=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' requirements/test.txt)
    [ -n "$version" ] || { echo "lock: requirements/test.txt pins no uv" >&2; exit 1; }
    echo "uv==$version" | compile requirements/uv.txt - --no-annotate
    compile requirements/mlflow-server.txt requirements/mlflow-server.in
}

if [ "$check" = no ]; then
    lock_here
    exit 0
fi
# The check compiles in a scratch copy (same relative paths, so the files' comments match) and compares.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/requirements"
cp pyproject.toml "$tmp"/
cp requirements/*.txt requirements/*.in "$tmp/requirements"/
uv=$(realpath "$(command -v "$uv")")
(cd "$tmp" && lock_here)
if ! diff -ru requirements "$tmp/requirements" >"$tmp/diff"; then
    echo "lock: requirements/*.txt are not up to date with pyproject.toml: run 'make lock' and commit the result" >&2
    head -n 40 "$tmp/diff" >&2
    exit 1
fi
echo "lock: requirements/*.txt are up to date with pyproject.toml"
