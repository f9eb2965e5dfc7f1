#!/usr/bin/env bash
# shellcheck disable=SC2317 # spec_*, trim_* and the jobs of in_parallel are called indirectly
# Build the local stand-ins for the official postgres / mysql / mariadb images used by the tests,
# without any container registry: one Debian root per suite made by debootstrap (cached), copied and
# trimmed per server, `docker import`ed (one layer) with its entrypoint from images/.
#
# Usage: scripts/build-test-images.sh [BACKEND...]        (no argument: every backend)
#
#   backend        image variable          our image                               Debian suite: packages
#   postgresql     MGB_POSTGRES_IMAGE      mlflow-gateway-backfill/postgres:15     bookworm: postgresql
#   postgresql-18  MGB_POSTGRES_18_IMAGE   mlflow-gateway-backfill/postgres:18     sid: postgresql-18
#   mysql          MGB_MYSQL_IMAGE         mlflow-gateway-backfill/mysql:9.7       sid: mysql-server-core (Oracle MySQL)
#   mariadb        MGB_MARIADB_IMAGE       mlflow-gateway-backfill/mariadb:10.11   bookworm: mariadb-server
#   mariadb-11     MGB_MARIADB_11_IMAGE    mlflow-gateway-backfill/mariadb:11.8    trixie: mariadb-server
#   pgbouncer      MGB_PGBOUNCER_IMAGE     mlflow-gateway-backfill/pgbouncer:1.18  bookworm: pgbouncer
#
# pgbouncer is not a database backend: it is the connection pooler that the postgresql-pgbouncer-* test
# backends put in front of a PostgreSQL 15 server (tests/backends.py, images/pgbouncer-entrypoint.sh).
#
# Idempotent: an image that exists and carries the label of its current recipe is left alone, so a
# second run takes well under a second. The label hashes only what that image is built from (its spec_
# and trim_ functions below, the shared build steps, its entrypoint), so editing one image's recipe
# rebuilds that image only. An image variable naming any other image (postgres:17, mysql:8.4,
# mariadb:11, ...) is never pulled: that image must already be present.
#
# Env: MGB_ROOTFS_CACHE  the debootstrap roots, one per suite (default /var/cache/mgb-rootfs: outside the
#                        repository, so fresh clones on the same machine reuse them). A root is made again
#                        only when it lacks a package; delete $MGB_ROOTFS_CACHE/SUITE to force that.
# The Debian mirror is the machine's own (its apt sources); it must also serve sid and trixie.
set -euo pipefail

self=$(realpath "${BASH_SOURCE[0]}")
images_dir=$(dirname "$self")/../images
cache=${MGB_ROOTFS_CACHE:-/var/cache/mgb-rootfs}
all_backends=(postgresql postgresql-18 mysql mariadb mariadb-11 pgbouncer)
label_key=org.mlflow-gateway-backfill.recipe

say() { echo "build-test-images: $*" >&2; }
die() { say "$*"; exit 1; }

# --- The images ------------------------------------------------------------------------------------
# spec_BACKEND sets: own (our image name), var (the variable that may name another image), suite and
# pkgs (the Debian suite and the packages its root must hold), kind (images/KIND-entrypoint.sh and the
# trim_KIND function), version (what the server binary must report). The roots hold the union of the
# packages of their suite's images; each image drops what it does not need.
spec_postgresql() {
    own=mlflow-gateway-backfill/postgres:15 var=MGB_POSTGRES_IMAGE
    suite=bookworm pkgs=postgresql kind=postgres version=15
}
spec_postgresql_18() {
    own=mlflow-gateway-backfill/postgres:18 var=MGB_POSTGRES_18_IMAGE
    suite=sid pkgs=postgresql-18 kind=postgres version=18
}
spec_mysql() {
    own=mlflow-gateway-backfill/mysql:9.7 var=MGB_MYSQL_IMAGE
    suite=sid pkgs='mysql-server-core mysql-client' kind=mysql version=9.7
}
spec_mariadb() {
    own=mlflow-gateway-backfill/mariadb:10.11 var=MGB_MARIADB_IMAGE
    suite=bookworm pkgs=mariadb-server kind=mariadb version=10.11
}
spec_mariadb_11() {
    own=mlflow-gateway-backfill/mariadb:11.8 var=MGB_MARIADB_11_IMAGE
    suite=trixie pkgs=mariadb-server kind=mariadb version=11.8
}
spec_pgbouncer() {
    own=mlflow-gateway-backfill/pgbouncer:1.18 var=MGB_PGBOUNCER_IMAGE
    suite=bookworm pkgs=pgbouncer kind=pgbouncer version=1.18
}
spec() { "spec_${1//-/_}"; }

# trim_KIND: run in the staged copy $stage of the root; sets server (the binary checked for $version),
# binaries (must find all their libraries) and changes (docker import --change arguments).
trim_postgres() {
    local bin=/usr/lib/postgresql/$version/bin
    drop_packages 'mariadb-*' 'galera-*' 'libmariadb*' 'mysql-*' 'libmecab*' 'libprotobuf*' \
        'libgoogle-perftools*' 'libtcmalloc*' socat rsync
    rm -rf "$stage"/usr/lib/postgresql/"$version"/lib/{llvmjit*,bitcode} "$stage"/var/lib/postgresql/"$version" \
        "$stage"/etc/postgresql/"$version" "$stage"/var/lib/mysql
    server=$bin/postgres
    binaries=("$server" "$bin"/{initdb,pg_ctl,psql,pg_isready,pg_basebackup} "$stage"/usr/lib/postgresql/"$version"/lib/*.so)
    # PATH: Debian's /usr/bin/psql is a Perl wrapper (pg_wrapper); put the real binaries first.
    changes=(--change "ENV PATH=$bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        --change 'ENV PGDATA=/var/lib/postgresql/data' --change 'EXPOSE 5432')
}
trim_mysql() {
    # ICU stays (mysqld uses it for REGEXP); the client tools removed here are ~7 MB each (statically
    # linked), as are the client-side authentication plugins and the telemetry plugin.
    drop_packages 'postgresql*' libpq5 sysstat ssl-cert 'libxml2*' 'mariadb-*' 'galera-*' 'libmariadb*' socat rsync \
        'libprotobuf[0-9]*'
    rm -rf "$stage"/var/lib/postgresql "$stage"/var/lib/mysql
    rm -f "$stage"/usr/bin/{innochecksum,ibd2sdi,myisam*,mysql_config_editor,mysql_migrate_keyring} \
        "$stage"/usr/bin/{mysql_secure_installation,mysql_tzinfo_to_sql,mysqlbinlog,perror} \
        "$stage"/usr/bin/mysql{check,import,show,slap} \
        "$stage"/usr/lib/mysql/plugin/{authentication_*_client.so,telemetry_client.so,component_telemetry.so}
    # Debian creates the mysql account in mysql-server's maintainer scripts, which this root lacks.
    # useradd replaces /etc/passwd and friends (new files): the hard-linked cache stays as it is.
    chroot "$stage" useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin mysql
    server=/usr/sbin/mysqld
    binaries=("$server" /usr/bin/mysql /usr/bin/mysqladmin /usr/bin/mysqldump "$stage"/usr/lib/mysql/plugin/*.so)
    changes=(--change 'EXPOSE 3306')
}
trim_mariadb() {
    # ICU and libxml2 are PostgreSQL's (~40 MB); the MariaDB tools removed here are ~5 MB each
    # (statically linked) and not used by the entrypoint or the tests.
    drop_packages 'postgresql*' libpq5 sysstat 'libicu[0-9]*' 'libxml2*' 'galera-*' socat rsync
    rm -rf "$stage"/var/lib/postgresql "$stage"/var/lib/mysql/*
    rm -f "$stage"/usr/bin/{aria_*,myisam*,innochecksum,perror,replace,resolve_stack_dump} \
        "$stage"/usr/bin/mariadb-{binlog,check,conv,import,plugin,show,slap,tzinfo-to-sql,upgrade,waitpid}
    server=/usr/sbin/mariadbd
    binaries=("$server" /usr/bin/mariadb /usr/bin/mariadb-admin /usr/bin/mariadb-dump /usr/bin/my_print_defaults
        "$stage"/usr/lib/mysql/plugin/*.so)
    changes=(--change 'EXPOSE 3306')
}
trim_pgbouncer() {
    # Debian's package pulls in postgresql-common (Perl scripts); the pooler needs none of it, nor the
    # servers of this root. The postgres account (made by postgresql-common) stays: PgBouncer runs as it.
    drop_packages 'postgresql*' libpq5 'libicu[0-9]*' 'libxml2*' 'mariadb-*' 'galera-*' 'libmariadb*' 'mysql-*' \
        'libmecab*' 'libprotobuf*' 'libgoogle-perftools*' 'libtcmalloc*' socat rsync sysstat
    rm -rf "$stage"/var/lib/postgresql "$stage"/var/lib/mysql "$stage"/etc/postgresql "$stage"/etc/mysql
    server=/usr/sbin/pgbouncer
    binaries=("$server")
    changes=(--change 'EXPOSE 6432')
}

# --- Shared build steps ----------------------------------------------------------------------------

# shellcheck source=scripts/lib.sh
. "$(dirname "$self")/lib.sh"

# The packages the root of suite $1 must hold: those of every image built from it.
suite_packages() {
    local b own var suite pkgs kind version
    for b in "${all_backends[@]}"; do
        spec "$b"
        [ "$suite" != "$1" ] || echo "$pkgs"
    done | tr ' ' '\n' | sort -u | paste -sd ' '
}

# Whether root $1 has every package $2... installed.
root_has() {
    local root=$1 p
    shift
    [ -d "$root/var/lib/dpkg" ] || return 1
    for p in "$@"; do
        [ "$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] ||
            return 1
    done
}

# Makes $cache/$1 (debootstrap of suite $1 with its packages) unless it is there already.
ensure_root() {
    local suite=$1 root=$cache/$1 log=$cache/debootstrap-$1.log pkgs t0
    pkgs=$(suite_packages "$suite")
    # shellcheck disable=SC2086 # the package list is split on purpose
    root_has "$root" $pkgs && return 0
    t0=$(date +%s)
    remove_tree "$root.partial"
    say "debootstrap $suite ($pkgs) into $root; log: $log"
    debootstrap --variant=minbase --include="${pkgs// /,}" "$suite" "$root.partial" "$mirror" >"$log" 2>&1 ||
        die "debootstrap $suite failed: see $log"
    # Only a complete root gets the final name, so an interrupted run starts over.
    remove_tree "$root"
    mv "$root.partial" "$root"
    say "root $suite ready in $(($(date +%s) - t0)) s ($(du -sm "$root" | cut -f1) MB)"
}

# Removes the files of the installed packages matching the given names/globs from $stage.
# Runs inside the root (chroot): its absolute symlinks (/var/run -> /run, ...) must not
# lead to the host's files.
drop_packages() {
    local pkgs
    pkgs=$(dpkg-query --admindir="$stage/var/lib/dpkg" -W -f='${db:Status-Abbrev}${Package}\n' "$@" 2>/dev/null |
        sed -n 's/^ii *//p' || true)
    [ -n "$pkgs" ] || return 0
    # Directories stay, and so do symlinks to them (merged /usr: /lib -> usr/lib).
    # shellcheck disable=SC2086,SC2016 # split the package list; $f is the chroot shell's
    dpkg-query --admindir="$stage/var/lib/dpkg" -L $pkgs | grep '^/' | chroot "$stage" /bin/sh -c \
        'while IFS= read -r f; do [ -d "$f" ] || echo "$f"; done | xargs -r -d "\n" rm -f'
    chroot "$stage" find /usr/bin /usr/sbin -xtype l -delete
}

# Builds image $2 from the recipe of backend $1 (its root must exist).
build_image() {
    local backend=$1 name=$2 stage=$cache/stage-$1 t0 id out missing
    local own var suite pkgs kind version server
    local -a binaries changes
    t0=$(date +%s)
    spec "$backend"
    # A hard-linked copy is instant; deleting links in it leaves the cache untouched
    # (nothing below modifies a file in place).
    remove_tree "$stage"
    cp -al "$cache/$suite" "$stage"
    # Not needed at run time: Perl (we bypass Debian's Perl wrappers), locale sources
    # (C.UTF-8 comes with libc), LLVM (only for PostgreSQL's JIT, turned off: ~110 MB), systemd
    # itself (libsystemd0 stays).
    drop_packages perl perl-base 'perl-modules-*' 'libperl*' 'lib*-perl' locales 'libllvm*' 'libz3-*' \
        systemd libsystemd-shared
    "trim_$kind"
    rm -rf "${stage:?}"/usr/share/{doc,man,info,locale,lintian} "${stage:?}"/var/cache/apt/* \
        "${stage:?}"/var/lib/apt/lists/* "${stage:?}"/var/log/* "${stage:?}"/{dev,proc,sys,run,tmp}/*
    # The trimmed root must still run its server: every library found, the version the tag promises.
    missing=$(chroot "$stage" ldd "${binaries[@]#"$stage"}" 2>&1 | grep 'not found' | sort -u || true)
    [ -z "$missing" ] || die "$name: libraries missing after trimming: $missing"
    out=$(chroot "$stage" "$server" --version 2>&1) || die "$name: '$server --version' failed: $out"
    [[ " $out" == *" $version."* ]] || die "$name: $server reports '$out', not version $version"
    install -m 0755 "$images_dir/$kind-entrypoint.sh" "$stage/usr/local/bin/docker-entrypoint.sh"
    changes+=(--change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' --change 'ENV LANG=C.UTF-8'
        --change "LABEL $label_key=$(recipe "$backend")")
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
    say "built $name in $(($(date +%s) - t0)) s ($(docker image inspect -f '{{.Size}}' "$name" |
        awk '{ printf "%d MB", $1 / 1e6 }'))"
}

# The label of backend $1's image: a hash of what that image is built from. `declare -f` prints the
# functions' code without comments, so editing a comment rebuilds nothing.
recipe() {
    local own var suite pkgs kind version
    spec "$1"
    {
        declare -f "spec_${1//-/_}" "trim_$kind" drop_packages build_image
        cat "$images_dir/$kind-entrypoint.sh"
    } | sha256sum | cut -c1-16
}

image_label() { docker image inspect -f "{{index .Config.Labels \"$label_key\"}}" "$1" 2>/dev/null || echo missing; }

# Runs "$1 ARG" for each further argument, all at once; fails if any of them failed.
in_parallel() {
    local fn=$1 arg rc=0
    local -a pids=()
    shift
    for arg in "$@"; do
        "$fn" "$arg" &
        pids+=($!)
    done
    for arg in "${pids[@]}"; do wait "$arg" || rc=1; done
    return "$rc"
}

# --- Main ------------------------------------------------------------------------------------------
start=$(date +%s)
[ $# -gt 0 ] || set -- "${all_backends[@]}"
for b in "$@"; do
    [[ " ${all_backends[*]} " == *" $b "* ]] || die "unknown backend '$b' (choose from: ${all_backends[*]})"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info': run scripts/ensure-docker.sh first"

# Which backend's recipe builds each of our images (an image variable may name any of them).
declare -A recipe_of=()
for b in "${all_backends[@]}"; do
    spec "$b"
    recipe_of[$own]=$b
done

rc=0
declare -A todo=() # image name -> backend whose recipe builds it
for b in "$@"; do
    spec "$b"
    name=${!var:-$own}
    if [ -z "${recipe_of[$name]:-}" ]; then
        # Not ours: use it as it is, never pull (no registry is reachable on these machines).
        [ "$(image_label "$name")" != missing ] || {
            say "image $name ($var) is not present locally and will not be pulled:" \
                "'docker pull $name' (or 'docker load') on a host that can, or unset $var to use $own built here"
            rc=1
        }
    elif [ "$(image_label "$name")" != "$(recipe "${recipe_of[$name]}")" ]; then
        todo[$name]=${recipe_of[$name]}
    fi
done
[ ${#todo[@]} -gt 0 ] || exit "$rc"

[ "$(id -u)" = 0 ] || die "building ${!todo[*]} needs root (debootstrap, chroot): run as root, or provide the images another way"
# One build at a time (two runs would share the roots and stages); another run may have built
# some of the images meanwhile.
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
for name in "${!todo[@]}"; do
    [ "$(image_label "$name")" != "$(recipe "${todo[$name]}")" ] || unset "todo[$name]"
done
[ ${#todo[@]} -gt 0 ] || exit "$rc"

ensure_debootstrap
mirror=$(debian_mirror)
declare -A old=()
for name in "${!todo[@]}"; do old[$name]=$(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null || true); done
# One job per suite, all at once: the suites' roots are independent, and debootstrap is mostly
# download and unpacking, so they overlap well. Within a suite the images are built one after the
# other: their stages share the root's files (hard links), and deleting files in one stage changes
# the link count, hence the ctime, of files that tar may be reading in the other.
build_suite() {
    local name own var suite pkgs kind version
    ensure_root "$1"
    for name in "${!todo[@]}"; do
        spec "${todo[$name]}"
        [ "$suite" != "$1" ] || build_image "${todo[$name]}" "$name"
    done
}
suites=$(for b in "${todo[@]}"; do
    spec "$b"
    echo "$suite"
done | sort -u)
# shellcheck disable=SC2086 # one suite a word
in_parallel build_suite $suites || rc=1
for name in "${!todo[@]}"; do
    new=$(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null || true)
    # Best effort: an old image still used by a container stays until that is removed.
    [ -z "${old[$name]}" ] || [ "${old[$name]}" = "$new" ] || docker rmi "${old[$name]}" >/dev/null 2>&1 || true
done
say "done in $(($(date +%s) - start)) s"
exit "$rc"
