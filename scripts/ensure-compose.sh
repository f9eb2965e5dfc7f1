#!/usr/bin/env bash
# Make sure a compose implementation exists for tests/test_deploy.py (`config` only: it starts nothing):
# `docker compose` (v2, a client plugin) if the client has it, else Debian's `docker-compose` (1.29, which
# understands depends_on conditions including service_completed_successfully), installed with apt as root.
set -euo pipefail
docker compose version >/dev/null 2>&1 && exit 0
command -v docker-compose >/dev/null && exit 0
[ "$(id -u)" = 0 ] || {
    echo "ensure-compose: no 'docker compose' nor 'docker-compose'; install one (Debian: apt-get install docker-compose)" >&2
    exit 1
}
export DEBIAN_FRONTEND=noninteractive
apt-cache policy docker-compose 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq
apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends docker-compose >/dev/null ||
    { echo "ensure-compose: 'apt-get install docker-compose' failed" >&2; exit 1; }
echo "ensure-compose: installed $(docker-compose version --short 2>/dev/null || echo docker-compose)" >&2
