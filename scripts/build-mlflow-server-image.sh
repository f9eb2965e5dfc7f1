#!/usr/bin/env bash
# A local stand-in for the MLflow server image of deploy/ (deploy/mlflow-server/Dockerfile installs from the
# package index inside the build, which this machine cannot do): requirements/mlflow-server.txt (MLflow
# 3.17.2 and its drivers, hash-checked) installed on the host by uv for the image's Python and platform, then
# copied onto the Debian base that `make image` builds. For tests/test_deploy.py's compose end-to-end run.
# Idempotent: an image whose label matches the lock, this script and the base is left alone.
#
# Env: UV (the uv binary, default: uv on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
base=mlflow-gateway-backfill/debian-python:bookworm
version=$(sed -n 's/^mlflow==\([^ ]*\).*/\1/p' requirements/mlflow-server.txt)
name=mlflow-gateway-backfill/mlflow-server:$version
out=build/mlflow-server

say() { echo "build-mlflow-server-image: $*" >&2; }
die() {
    say "$*"
    exit 1
}
[ -n "$version" ] || die "requirements/mlflow-server.txt pins no mlflow"
docker image inspect "$base" >/dev/null 2>&1 || die "no $base: run 'make image' first (it builds the base)"

recipe=$( (
    docker image inspect -f '{{.Id}}' "$base"
    sha256sum requirements/mlflow-server.txt scripts/build-mlflow-server-image.sh
) | sha256sum | cut -c1-16)
label=$(docker image inspect -f '{{index .Config.Labels "org.mlflow-gateway-backfill.recipe"}}' "$name" 2>/dev/null || true)
if [ "$label" = "$recipe" ]; then
    say "$name is up to date"
    exit 0
fi

t0=$(date +%s)
read -r pyver arch glibc < <(docker run --rm --network none --entrypoint python3 "$base" -c \
    'import platform; print(".".join(platform.python_version_tuple()[:2]), platform.machine(), platform.libc_ver()[1])')
rm -rf "$out"
mkdir -p "$out"
# Installed for the base's interpreter and platform, into what becomes its site directory.
"$uv" pip install --quiet --require-hashes --only-binary :all: --python-version "$pyver" \
    --python-platform "$arch-manylinux_${glibc/./_}" --target "$out/site" -r requirements/mlflow-server.txt ||
    die "uv pip install for the image failed"
rm -rf "$out/site/bin"  # console scripts with this host's interpreter: the image has its own `mlflow`
cat >"$out/Dockerfile" <<EOF
FROM $base
COPY site/ /usr/local/lib/python$pyver/dist-packages/
RUN printf '#!/bin/sh\nexec python3 -m mlflow "\$@"\n' >/usr/local/bin/mlflow && chmod 0755 /usr/local/bin/mlflow \\
    && useradd --uid 10001 --user-group --create-home mlflow
USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
EOF
say "docker build $name"
DOCKER_BUILDKIT=0 docker build --quiet --label "org.mlflow-gateway-backfill.recipe=$recipe" -t "$name" "$out" >/dev/null ||
    die "docker build of $name failed"
rm -rf "$out"
say "built $name in $(($(date +%s) - t0)) s ($(($(docker image inspect -f '{{.Size}}' "$name") / 1000000)) MB)"
