#!/usr/bin/env bash
# Build the local stand-ins for the official postgres / mysql images used by the tests,
# without any container registry: a Debian bookworm root made once by debootstrap (cached),
# trimmed per server, `docker import`ed with its entrypoint from images/.
# Idempotent: an image that exists (and, for our own tags, was built from the current
# recipe) is left alone, so a second run takes well under a second.
#
# Env: MGB_POSTGRES_IMAGE  default mlflow-gateway-backfill/postgres:15
#      MGB_MYSQL_IMAGE     default mlflow-gateway-backfill/mariadb:10.11
#      MGB_ROOTFS_CACHE    debootstrap cache, default /var/cache/mgb-rootfs (outside the
#                          repository, so it survives fresh clones on the same machine)
# Any other image name (e.g. postgres:16) is never pulled: it must already be present.
set -euo pipefail

self=$(realpath "${BASH_SOURCE[0]}")
images_dir=$(dirname "$self")/../images
pg_own=mlflow-gateway-backfill/postgres:15
my_own=mlflow-gateway-backfill/mariadb:10.11
cache=${MGB_ROOTFS_CACHE:-/var/cache/mgb-rootfs}
rootfs=$cache/bookworm

say() { echo "build-test-images: $*" >&2; }
die() { say "$*"; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info': run scripts/ensure-docker.sh first"

# The URIs of the apt source whose Suites include bookworm (deb822 first, then one-line style).
debian_mirror() {
    local m
    m=$(awk 'FNR == 1 || /^[ \t]*$/ { bad = suite = 0; uri = "" }
             /^Types:/ && !/[ \t]deb([ \t]|$)/ { bad = 1 }
             /^Suites:/ && /[ \t]bookworm([ \t]|$)/ { suite = 1 }
             /^URIs:/ { uri = $2 }
             !bad && suite && uri != "" { print uri; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(awk '$1 == "deb" { for (i = 3; i <= NF; i++) if ($i == "bookworm") { print $(i - 1); exit } }' \
        /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$m" ] || die "no apt source for bookworm found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    echo "$m"
}

# Unmount whatever a killed debootstrap left mounted under $1 (it bind-mounts /dev in
# containers), then delete it without ever crossing into another file system.
remove_tree() {
    local m
    awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r |
        while IFS= read -r m; do umount -l "$m"; done
    rm -rf --one-file-system "$1"
}

ensure_rootfs() {
    [ -x "$rootfs/usr/sbin/mariadbd" ] && [ -x "$rootfs/usr/lib/postgresql/15/bin/postgres" ] && return
    [ "$(id -u)" = 0 ] || die "building $rootfs needs root (debootstrap): run as root, or provide the images another way"
    local t0 mirror
    t0=$(date +%s)
    if ! command -v debootstrap >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-cache policy debootstrap 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq
        apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends debootstrap >/dev/null || die "'apt-get install debootstrap' failed"
    fi
    mirror=$(debian_mirror)
    mkdir -p "$cache"
    remove_tree "$rootfs.partial"
    say "debootstrap bookworm (postgresql + mariadb-server) into $rootfs; log: $cache/debootstrap.log"
    debootstrap --variant=minbase --include=postgresql,mariadb-server bookworm "$rootfs.partial" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 || die "debootstrap failed: see $cache/debootstrap.log"
    # Only a complete root gets the final name, so an interrupted run starts over.
    mv "$rootfs.partial" "$rootfs"
    say "rootfs ready in $(($(date +%s) - t0)) s ($(du -sm "$rootfs" | cut -f1) MB)"
}

# Remove the files of the installed packages matching the given names/globs from root $1.
# Runs inside the root (chroot): its absolute symlinks (/var/run -> /run, ...) must not
# lead to the host's files.
drop_packages() {
    local root=$1 pkgs
    shift
    pkgs=$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${db:Status-Abbrev}${Package}\n' "$@" 2>/dev/null |
        sed -n 's/^ii *//p' || true)
    [ -n "$pkgs" ] || return 0
    # Directories stay, and so do symlinks to them (merged /usr: /lib -> usr/lib).
    # shellcheck disable=SC2086,SC2016 # split the package list; $f is the chroot shell's
    dpkg-query --admindir="$root/var/lib/dpkg" -L $pkgs | grep '^/' | chroot "$root" /bin/sh -c \
        'while IFS= read -r f; do [ -d "$f" ] || echo "$f"; done | xargs -r -d "\n" rm -f'
    chroot "$root" find /usr/bin /usr/sbin -xtype l -delete
}

# Identifies the recipe of one of our images, so that editing this script or an entrypoint
# rebuilds it on the next run.
recipe() { cat "$self" "$images_dir/$1-entrypoint.sh" | sha256sum | cut -c1-16; }

build_image() {
    local kind=$1 name=$2 stage=$cache/stage-$1 t0 id out
    local -a drop changes
    t0=$(date +%s)
    ensure_rootfs
    # A hard-linked copy is instant; deleting links in it leaves the cache untouched
    # (nothing below modifies a file in place).
    remove_tree "$stage"
    cp -al "$rootfs" "$stage"
    # Not needed at run time: Perl (we bypass Debian's Perl wrappers), locale sources
    # (C.UTF-8 comes with libc), LLVM (only for PostgreSQL's JIT, turned off: ~110 MB).
    drop=(perl 'perl-modules-*' 'libperl*' 'lib*-perl' locales 'libllvm*' 'libz3-*')
    if [ "$kind" = postgres ]; then
        drop+=('mariadb-*' 'galera-*' 'libmariadb*' mysql-common socat rsync)
        rm -rf "$stage"/usr/lib/postgresql/15/lib/{llvmjit*,bitcode} "$stage"/var/lib/postgresql/15 \
            "$stage"/etc/postgresql/15 "$stage"/var/lib/mysql
        # PATH: Debian's /usr/bin/psql is a Perl wrapper (pg_wrapper); put the real binaries first.
        changes=(--change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
            --change 'ENV PGDATA=/var/lib/postgresql/data' --change 'EXPOSE 5432')
    else
        # ICU and libxml2 are PostgreSQL's (~40 MB); the MariaDB tools removed here are
        # ~5 MB each (statically linked) and not used by the entrypoint or the tests.
        drop+=('postgresql*' libpq5 sysstat libicu72 libxml2 'galera-*' socat rsync)
        rm -rf "$stage"/var/lib/postgresql "$stage"/var/lib/mysql/*
        rm -f "$stage"/usr/bin/{aria_*,myisam*,innochecksum,perror,replace,resolve_stack_dump} \
            "$stage"/usr/bin/mariadb-{binlog,check,conv,import,plugin,show,slap,tzinfo-to-sql,upgrade,waitpid}
        changes=(--change 'EXPOSE 3306')
    fi
    drop_packages "$stage" "${drop[@]}"
    rm -rf "${stage:?}"/usr/share/{doc,man,info,locale,lintian} "${stage:?}"/var/cache/apt/* \
        "${stage:?}"/var/lib/apt/lists/* "${stage:?}"/var/log/* "${stage:?}"/{dev,proc,sys,run,tmp}/*
    install -m 0755 "$images_dir/$kind-entrypoint.sh" "$stage/usr/local/bin/docker-entrypoint.sh"
    changes+=(--change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' --change 'ENV LANG=C.UTF-8'
        --change "LABEL org.mlflow-gateway-backfill.recipe=$(recipe "$kind")")
    say "importing $name ($(du -sm "$stage" | cut -f1) MB)"
    id=$(tar --numeric-owner -C "$stage" -c . | docker import "${changes[@]}" -) || die "docker import of $name failed"
    remove_tree "$stage"
    if [ "$kind" = postgres ]; then
        # `docker import --change` cannot set STOPSIGNAL; a metadata-only build adds it (no new
        # layer, < 1 s). SIGINT = PostgreSQL's "fast" shutdown; its SIGTERM ("smart") would wait
        # for every client to disconnect, so `docker stop`/`restart` would hang for 10 s.
        out=$(printf 'FROM %s\nSTOPSIGNAL SIGINT\n' "$id" | DOCKER_BUILDKIT=0 docker build -q -t "$name" - 2>&1) ||
            die "docker build (STOPSIGNAL) of $name failed: $out"
    else
        docker tag "$id" "$name"
    fi
    say "built $name in $(($(date +%s) - t0)) s ($(docker image inspect -f '{{.Size}}' "$name" | awk '{ printf "%d MB", $1 / 1e6 }'))"
}

label_fmt='{{index .Config.Labels "org.mlflow-gateway-backfill.recipe"}}'
rc=0
for spec in "postgres ${MGB_POSTGRES_IMAGE:-$pg_own} $pg_own MGB_POSTGRES_IMAGE" \
    "mariadb ${MGB_MYSQL_IMAGE:-$my_own} $my_own MGB_MYSQL_IMAGE"; do
    read -r kind name own var <<<"$spec"
    label=$(docker image inspect -f "$label_fmt" "$name" 2>/dev/null) || label=missing
    if [ "$name" != "$own" ]; then
        # Not ours: use it as it is, never pull (no registry is reachable on these machines).
        [ "$label" != missing ] || { say "image $name ($var) is not present locally and will not be pulled:" \
            "'docker pull $name' (or 'docker load') on a host that can, or unset $var to use $own built here"; rc=1; }
    elif [ "$label" != "$(recipe "$kind")" ]; then
        # One build at a time (two runs would share the rootfs cache); the other run may
        # have built the image meanwhile.
        mkdir -p "$cache"
        exec 9>"$cache/lock"
        flock 9
        [ "$(docker image inspect -f "$label_fmt" "$name" 2>/dev/null)" != "$(recipe "$kind")" ] || continue
        old=$(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null || true)
        [ -z "$old" ] || say "$name was built from an older recipe: rebuilding"
        build_image "$kind" "$name"
        # Best effort: an old image still used by a container stays until that is removed.
        [ -z "$old" ] || docker rmi "$old" >/dev/null 2>&1 || true
    fi
done
exit "$rc"
