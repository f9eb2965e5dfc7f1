#!/usr/bin/env bash
# `make image`: build mlflow-gateway-backfill:<version> and :latest from the Dockerfile, with no container
# registry and no network inside the build:
#
#   1. the base image: $BASE_IMAGE if set (e.g. python:3.11-slim, which must then be present locally: it is
#      never pulled), else mlflow-gateway-backfill/debian-python:bookworm, built here once from Debian packages
#      (debootstrap bookworm --variant=minbase with python3, the mirror read from the machine's apt sources,
#      the root cached in $MGB_ROOTFS_CACHE, `docker import`);
#   2. on the host: the wheels of requirements/runtime.txt (and of uv, the installer the build uses) for the
#      base image's Python and platform, hash-checked, plus the project's own wheel, into build/image/;
#   3. `docker build` with the legacy builder (no BuildKit front end or cache image to fetch; a FROM of a local
#      image never pulls), which installs those wheels with --no-index.
#
# Idempotent: an image whose label matches the inputs (sources, locks, Dockerfile, this script, base image id)
# is left alone, so a second run takes about a second.
#
# Env: BASE_IMAGE        the base (default: the Debian one built here)
#      UV                the uv binary (default: uv on PATH); builds the project's wheel
#      MGB_ROOTFS_CACHE  debootstrap cache, default /var/cache/mgb-rootfs (outside the repository)
#      MGB_IMAGE_NAME    default mlflow-gateway-backfill
set -euo pipefail

cd "$(dirname "$0")/.."
name=${MGB_IMAGE_NAME:-mlflow-gateway-backfill}
uv=${UV:-uv}
cache=${MGB_ROOTFS_CACHE:-/var/cache/mgb-rootfs}
own_base=mlflow-gateway-backfill/debian-python:bookworm
base=${BASE_IMAGE:-$own_base}
out=build/image
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' backfill/__init__.py)

say() { echo "build-image: $*" >&2; }
die() {
    say "$*"
    exit 1
}

[ -n "$version" ] || die "no __version__ in backfill/__init__.py"
docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info': run scripts/ensure-docker.sh first"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# What the Debian base is made of; a change rebuilds it.
base_recipe() {
    printf '%s\n' "bookworm minbase python3 ca-certificates; trimmed docs, man, locales, apt lists; uid 10001" |
        sha256sum | cut -c1-16
}

build_base() {
    local rootfs=$cache/bookworm-python stage=$cache/stage-python t0 mirror
    t0=$(date +%s)
    if [ ! -x "$rootfs/usr/bin/python3" ]; then
        [ "$(id -u)" = 0 ] || die "building $rootfs needs root (debootstrap); or set BASE_IMAGE to a local Python image"
        ensure_debootstrap
        mirror=$(debian_mirror)
        mkdir -p "$cache"
        remove_tree "$rootfs.partial"
        say "debootstrap bookworm (python3) into $rootfs; log: $cache/debootstrap-python.log"
        debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$rootfs.partial" "$mirror" \
            >"$cache/debootstrap-python.log" 2>&1 || die "debootstrap failed: see $cache/debootstrap-python.log"
        mv "$rootfs.partial" "$rootfs"
    fi
    # A hard-linked copy is instant; only whole files are deleted from it, so the cache stays intact.
    remove_tree "$stage"
    cp -al "$rootfs" "$stage"
    rm -rf "${stage:?}"/usr/share/{doc,man,info,locale,lintian} "${stage:?}"/var/cache/apt/* \
        "${stage:?}"/var/cache/debconf/*-old "${stage:?}"/var/lib/apt/lists/* "${stage:?}"/var/log/* \
        "${stage:?}"/{dev,proc,sys,run,tmp}/*
    say "importing $own_base ($(du -sm "$stage" | cut -f1) MB)"
    tar --numeric-owner -C "$stage" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --change "LABEL org.mlflow-gateway-backfill.recipe=$(base_recipe)" - "$own_base" >/dev/null ||
        die "docker import of $own_base failed"
    remove_tree "$stage"
    say "built $own_base in $(($(date +%s) - t0)) s"
}

label() { docker image inspect -f '{{index .Config.Labels "org.mlflow-gateway-backfill.recipe"}}' "$1" 2>/dev/null; }

# One build at a time on this machine (two would share the rootfs cache and build/image).
mkdir -p "$cache"
exec 9>"$cache/image.lock"
flock 9

if [ "$base" = "$own_base" ]; then
    [ "$(label "$own_base" || true)" = "$(base_recipe)" ] || build_base
else
    docker image inspect "$base" >/dev/null 2>&1 || die "base image $base (BASE_IMAGE) is not present locally and" \
        "is never pulled: 'docker pull $base' on a host that can, or unset BASE_IMAGE to build the Debian base here"
fi
base_id=$(docker image inspect -f '{{.Id}}' "$base")

# Everything the image is made of; the image's label records it.
recipe=$( (
    echo "$base_id"
    find Dockerfile .dockerignore scripts/build-image.sh pyproject.toml alembic.ini requirements/runtime.txt \
        requirements/uv.txt backfill migrations -type f ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum
) | sha256sum | cut -c1-16)
if [ "$(label "$name:$version" || true)" = "$recipe" ] && [ "$(label "$name:latest" || true)" = "$recipe" ]; then
    say "$name:$version is up to date"
    exit 0
fi

t0=$(date +%s)
# The base's Python and platform decide which wheels fit.
read -r pyver arch glibc < <(docker run --rm --network none --entrypoint python3 "$base" -c \
    'import platform; print(platform.python_version_tuple()[0] + "." + platform.python_version_tuple()[1],
     platform.machine(), platform.libc_ver()[1])') || die "cannot run python3 in $base"
[ -n "$glibc" ] || die "$base has no glibc (musl?): use a Debian-based Python image"
say "base $base: Python $pyver, $arch, glibc $glibc"
remove_tree "$out"
mkdir -p "$out/wheels"
# The runtime lock, resolved for that interpreter and platform: its markers evaluated for the image rather
# than for this host (which may be another OS or architecture); same pins and hashes.
"$uv" pip compile --quiet --no-header --no-annotate --generate-hashes --python-version "$pyver" \
    --python-platform "$arch-manylinux_${glibc/./_}" requirements/runtime.txt -o "$out/requirements.txt" ||
    die "uv pip compile for the image failed"
# pip matches the platform tags literally: list every manylinux level the base's glibc supports.
platforms=(--platform "manylinux2014_$arch")
for ((minor = ${glibc#*.}; minor >= 17; minor--)); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
abi=cp${pyver/./}
"${PYTHON:-python3}" -m pip download -qq --disable-pip-version-check --no-deps --only-binary=:all: --require-hashes \
    --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none "${platforms[@]}" \
    -d "$out/wheels" -r "$out/requirements.txt" -r requirements/uv.txt || die "downloading the wheels failed"
"$uv" build --quiet --wheel --out-dir "$out/wheels" . || die "building the project's wheel failed"
rm -rf build/lib build/bdist.* ./*.egg-info

say "docker build $name:$version (base $base)"
DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE_IMAGE=$base" --label "org.mlflow-gateway-backfill.recipe=$recipe" \
    --label "org.opencontainers.image.version=$version" -t "$name:$version" -t "$name:latest" . >/dev/null ||
    die "docker build failed (run it again without --quiet to see why: DOCKER_BUILDKIT=0 docker build --build-arg BASE_IMAGE=$base .)"
size=$(docker image inspect -f '{{.Size}}' "$name:$version")
say "built $name:$version and $name:latest in $(($(date +%s) - t0)) s ($((size / 1000000)) MB)"
