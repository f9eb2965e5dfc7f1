#!/usr/bin/env bash
# `make screenshots`: docs/experiments-before.png and docs/experiments-after.png, MLflow's own experiment
# list (a real `mlflow server`, the version of requirements/mlflow-server.in) over the demo database
# (tests/demo.py: real MLflow 3.10.x data), before and after `mlflow-gateway-backfill run`, taken by
# Debian's headless Chromium (installed with apt when missing).
#
# Env: UV (the uv binary), MGB_UI_VENV (the MLflow server's venv, default outside the repository:
#      ${XDG_CACHE_HOME:-~/.cache}/mlflow-gateway-backfill/mlflow-server-<version>)
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
work=build/screenshots
version=$(sed -n 's/^mlflow==\([^ ]*\).*/\1/p' requirements/mlflow-server.txt)
venv=${MGB_UI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mlflow-gateway-backfill/mlflow-server-$version}

say() { echo "screenshots: $*" >&2; }
die() {
    say "$*"
    exit 1
}
[ -n "$version" ] || die "requirements/mlflow-server.txt pins no mlflow"

if ! command -v chromium >/dev/null; then
    [ "$(id -u)" = 0 ] || die "needs Debian's chromium: apt-get install chromium (as root)"
    export DEBIAN_FRONTEND=noninteractive
    apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq
    say "installing chromium (apt)"
    apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends chromium >/dev/null ||
        die "'apt-get install chromium' failed"
fi

# The MLflow server's venv, synced exactly to its lock; reused while the lock is unchanged.
if ! cmp -s requirements/mlflow-server.txt "$venv/.synced" 2>/dev/null; then
    say "MLflow $version into $venv"
    [ -x "$venv/bin/python" ] || "$uv" venv --quiet --python "${PYTHON:-python3}" "$venv"
    "$uv" pip sync --quiet --python "$venv/bin/python" --require-hashes requirements/mlflow-server.txt
    cp requirements/mlflow-server.txt "$venv/.synced"
fi

rm -rf "$work"
mkdir -p "$work" docs
.venv/bin/python -m tests.demo "$work/demo.db" >&2
# MLflow's own schema upgrade first (3.10 -> this version), as a deployment does before starting the server.
"$venv/bin/mlflow" db upgrade "sqlite:///$work/demo.db" >"$work/db-upgrade.log" 2>&1 ||
    die "mlflow db upgrade failed: see $work/db-upgrade.log"
cp "$work/demo.db" "$work/before.db"
cp "$work/demo.db" "$work/after.db"
.venv/bin/mlflow-gateway-backfill run --database-url "sqlite:///$work/after.db" >&2

server_pgid=
stop_server() {
    # The server runs in its own process group (setsid): stop the whole group, workers included.
    if [ -n "$server_pgid" ]; then
        kill -TERM -- "-$server_pgid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 -- "-$server_pgid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$server_pgid" 2>/dev/null || true
        server_pgid=
    fi
}
trap stop_server EXIT

healthy() {
    .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2)' \
        "$1" 2>/dev/null
}

# Serves database $1 with a real `mlflow server`, screenshots its experiment list into $2.
shoot() {
    local db=$1 png=$2 port profile
    port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$venv/bin/mlflow" server --host 127.0.0.1 --port "$port" \
        --backend-store-uri "sqlite:///$db" --default-artifact-root "$work/artifacts" --workers 1 \
        </dev/null >"$work/server-$(basename "$db").log" 2>&1 &
    server_pgid=$!
    for _ in $(seq 120); do
        healthy "$port" && break
        kill -0 "$server_pgid" 2>/dev/null || die "mlflow server exited: see $work/server-$(basename "$db").log"
        sleep 0.5
    done
    healthy "$port" || die "mlflow server did not answer in 60 s"
    profile=$(mktemp -d)
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
        --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
        --window-size=1280,480 --virtual-time-budget=20000 --screenshot="$png" \
        "http://127.0.0.1:$port/#/experiments" >"$work/chromium.log" 2>&1 ||
        die "chromium failed: see $work/chromium.log"
    rm -rf "$profile"
    stop_server
    say "wrote $png"
}

shoot "$work/before.db" docs/experiments-before.png
shoot "$work/after.db" docs/experiments-after.png
