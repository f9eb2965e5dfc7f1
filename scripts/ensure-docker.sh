#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`, installing (apt: docker.io) and
# starting dockerd when there is none. Idempotent and non-interactive (safe under CI=true).
#
# Why: CI and every new session start with no daemon running, and no image can be
# pulled, so the test suite's real-database tests need a local engine (see
# scripts/build-test-images.sh for the images).
#
# Env: MGB_DOCKERD_LOG  dockerd's log file (default /var/log/mgb-dockerd.log)
#      MGB_DOCKER_WAIT  seconds to wait for `docker info` (default 60)
set -euo pipefail

log=${MGB_DOCKERD_LOG:-/var/log/mgb-dockerd.log}
wait_s=${MGB_DOCKER_WAIT:-60}
start=$(date +%s)

fail() {
    echo "ensure-docker: no Docker engine available: $1." \
        "Fix: run scripts/ensure-docker.sh as root (it installs Debian's docker.io and starts dockerd)," \
        "or start a Docker engine yourself, or run the tests against existing servers with" \
        "MGB_TEST_POSTGRES_URL=postgresql+psycopg://USER:PW@HOST:5432/DB and" \
        "MGB_TEST_MYSQL_URL=mysql+pymysql://root:PW@HOST:3306/DB." >&2
    exit 1
}

docker_ok() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

docker_ok && exit 0

# A DOCKER_HOST pointing elsewhere is the user's choice: starting a local daemon would not help.
case ${DOCKER_HOST:-unix:///var/run/docker.sock} in
    unix:///var/run/docker.sock | unix:///run/docker.sock) ;;
    *) fail "DOCKER_HOST=$DOCKER_HOST does not answer 'docker info'" ;;
esac
[ "$(id -u)" = 0 ] || fail "'docker info' fails and installing/starting dockerd needs root (running as $(id -un))"

if ! command -v dockerd >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when docker.io has no install candidate yet.
    if ! apt-cache policy docker.io 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get update -qq || fail "'apt-get update' failed"
    fi
    # --no-install-recommends: skips cgroupfs-mount, git, ubuntu-fan, ... (not needed here).
    # The package also ships /usr/bin/docker; an existing /usr/local/bin/docker stays first on PATH.
    apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends docker.io >/dev/null ||
        fail "'apt-get install docker.io' failed"
    echo "ensure-docker: installed docker.io in $(($(date +%s) - start)) s" >&2
fi
command -v docker >/dev/null || fail "no docker client on PATH after installing docker.io"

# Returns 0 once `docker info` answers, 1 if dockerd ($1) died or the wait ran out.
wait_ready() {
    local deadline=$(($(date +%s) + wait_s))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        docker info >/dev/null 2>&1 && return 0
        [ -n "${1:-}" ] && ! kill -0 "$1" 2>/dev/null && return 1
        sleep 0.5
    done
    return 1
}

# Another dockerd (e.g. started by a parallel run) may still be coming up: wait for it
# rather than start a second one on the same pid file and socket.
running=$(cat /var/run/docker.pid 2>/dev/null || true)
if [ -n "$running" ] && [ "$(cat "/proc/$running/comm" 2>/dev/null)" = dockerd ]; then
    wait_ready "$running" && exit 0
    fail "dockerd (pid $running) runs but 'docker info' does not answer within ${wait_s} s; see $log"
fi

# Storage driver: overlay2 (fast container create); if dockerd cannot start with it,
# let dockerd choose (vfs in the worst case: works everywhere, copies the image per container).
# A storage-driver set in /etc/docker/daemon.json wins (passing both is an error).
drivers="overlay2 auto"
grep -qs '"storage-driver"' /etc/docker/daemon.json && drivers=auto
mkdir -p "$(dirname "$log")"
for driver in $drivers; do
    args=()
    [ "$driver" = auto ] || args=(--storage-driver "$driver")
    echo "=== $(date -Is) ensure-docker: dockerd ${args[*]}" >>"$log"
    # setsid + no stdin: the daemon must outlive this script and the CI step that ran it.
    setsid dockerd "${args[@]}" </dev/null >>"$log" 2>&1 &
    pid=$!
    if wait_ready "$pid"; then
        echo "ensure-docker: dockerd (pid $pid, storage driver" \
            "$(docker info -f '{{.Driver}}' 2>/dev/null)) ready after $(($(date +%s) - start)) s; log: $log" >&2
        exit 0
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
fail "dockerd did not answer 'docker info' within ${wait_s} s (last lines of $log: $(tail -n 3 "$log" | tr '\n' ' '))"
