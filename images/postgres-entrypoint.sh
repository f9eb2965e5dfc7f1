#!/bin/sh
# Entrypoint of mlflow-gateway-backfill/postgres:15, the offline stand-in for the official
# postgres image (built by scripts/build-test-images.sh). It honours what the unmodified
# testcontainers PostgresContainer relies on:
#   - POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB create the superuser and database;
#   - readiness is `psql --host 127.0.0.1 ...` succeeding inside the container, so TCP is
#     only opened by the final server, after the user and database exist;
#   - the server is PID 1 (exec), so `docker stop` (STOPSIGNAL SIGINT = fast shutdown) is clean;
#   - an initialised data directory (after `docker restart`) is started as it is.
set -eu

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres-entrypoint: POSTGRES_PASSWORD must be set" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    chown postgres "$pwfile"
    # C.UTF-8: the image has no locales package (the official image uses en_US.utf8).
    as_postgres initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 --no-sync >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"

    # Temporary server on the Unix socket only: no TCP client gets in before setup is done.
    as_postgres pg_ctl --wait --silent -o "-c listen_addresses=''" start
    psql() { as_postgres psql -v ON_ERROR_STOP=1 --quiet --no-psqlrc --username="$POSTGRES_USER" "$@"; }
    if [ "$POSTGRES_DB" != postgres ]; then
        echo 'CREATE DATABASE :"db";' | psql --dbname=postgres --set=db="$POSTGRES_DB"
    fi
    # shellcheck source=/dev/null # (initdb.d scripts, sourced as the official images do)
    for f in /docker-entrypoint-initdb.d/*; do
        case $f in
            *.sql) psql --dbname="$POSTGRES_DB" --file="$f" ;;
            *.sh) . "$f" ;;
        esac
    done
    as_postgres pg_ctl --wait --silent --mode=fast stop
fi

# Settings for throw-away test databases, traded for speed: no fsync, no synchronous commit,
# no full-page writes (a crash of the host may corrupt the data: never use for real data).
# jit=off: the image does not ship LLVM.
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres \
    -c listen_addresses='*' -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c jit=off -c max_connections=200 "$@"
