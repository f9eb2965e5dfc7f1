#!/bin/sh
# Entrypoint of mlflow-gateway-backfill/postgres:15 and :18, the offline stand-ins for the official
# postgres image (built by scripts/build-test-images.sh). It honours what the unmodified
# testcontainers PostgresContainer relies on:
#   - POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB create the superuser and database;
#   - readiness is `psql --host 127.0.0.1 ...` succeeding inside the container, so TCP is
#     only opened by the final server, after the user and database exist;
#   - the server is PID 1 (exec), so `docker stop` (STOPSIGNAL SIGINT = fast shutdown) is clean;
#   - an initialised data directory (after `docker restart`) is started as it is.
#
# Streaming replication (these variables matter only when the data directory is first made):
#   MGB_REPLICATION           unset or empty: a standalone server (as above);
#                             "primary": also a replication role and a pg_hba `replication` line for it
#                             (wal_level=replica, max_wal_senders=10 are set explicitly);
#                             "replica": a hot standby of MGB_PRIMARY_HOST, made by `pg_basebackup -R`
#                             (it waits up to MGB_PRIMARY_WAIT s for the primary); read-only for everyone.
#                             Its users, databases and pg_hba.conf are the primary's: give it the same
#                             POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB as the primary, so that
#                             PostgresContainer's readiness check logs in.
#   MGB_REPLICATION_USER      the role replicas connect as (default: replicator);
#   MGB_REPLICATION_PASSWORD  its password (required for a primary and a replica);
#   MGB_PRIMARY_HOST          replica: the primary's host name (e.g. its alias on a user-defined network);
#   MGB_PRIMARY_PORT          replica: the primary's port (default: 5432);
#   MGB_REPLICATION_SLOT      replica, optional: a physical replication slot of that name is created on
#                             the primary and used (WAL is then kept for this replica however far it lags);
#   MGB_PRIMARY_WAIT          replica: seconds to wait for the primary to accept connections (default: 120).
set -eu

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA
role=${MGB_REPLICATION:-}
repl_user=${MGB_REPLICATION_USER:-replicator}

as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
fail() {
    echo "postgres-entrypoint: $*" >&2
    exit 1
}

case $role in
    "" | primary | replica) ;;
    *) fail "MGB_REPLICATION must be empty, 'primary' or 'replica', not '$role'" ;;
esac
if [ -n "$role" ] && [ -z "${MGB_REPLICATION_PASSWORD:-}" ]; then
    fail "MGB_REPLICATION=$role needs MGB_REPLICATION_PASSWORD"
fi

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ] && [ "$role" = replica ]; then
    [ -n "${MGB_PRIMARY_HOST:-}" ] || fail "MGB_REPLICATION=replica needs MGB_PRIMARY_HOST"
    port=${MGB_PRIMARY_PORT:-5432}
    waited=0
    until pg_isready --quiet --host="$MGB_PRIMARY_HOST" --port="$port" --timeout=2; do
        waited=$((waited + 1))
        [ "$waited" -lt "${MGB_PRIMARY_WAIT:-120}" ] || fail "the primary $MGB_PRIMARY_HOST:$port does not answer"
        sleep 1
    done
    # -R (--write-recovery-conf): standby.signal, and primary_conninfo (password included) in
    # postgresql.auto.conf, so a restarted replica reconnects on its own.
    as_postgres env PGPASSWORD="$MGB_REPLICATION_PASSWORD" pg_basebackup --host="$MGB_PRIMARY_HOST" --port="$port" \
        --username="$repl_user" --pgdata="$PGDATA" --write-recovery-conf --wal-method=stream \
        --checkpoint=fast --no-sync \
        ${MGB_REPLICATION_SLOT:+--create-slot "--slot=$MGB_REPLICATION_SLOT"} ||
        fail "pg_basebackup from $MGB_PRIMARY_HOST:$port failed"
elif [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        fail "POSTGRES_PASSWORD must be set"
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
    if [ "$role" = primary ]; then
        echo 'CREATE ROLE :"user" WITH REPLICATION LOGIN PASSWORD :'\''pw'\'';' |
            psql --dbname=postgres --set=user="$repl_user" --set=pw="$MGB_REPLICATION_PASSWORD"
        printf 'host replication "%s" all scram-sha-256\n' "$(printf '%s' "$repl_user" | sed 's/"/""/g')" \
            >>"$PGDATA/pg_hba.conf"
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

if [ "$role" = primary ]; then
    set -- -c wal_level=replica -c max_wal_senders=10 -c max_replication_slots=10 "$@"
elif [ "$role" = replica ]; then
    # Reconnect to a restarted primary within a second (PostgreSQL waits 5 s by default).
    set -- -c wal_retrieve_retry_interval=1s "$@"
fi

# Settings for throw-away test databases, traded for speed: no fsync, no synchronous commit,
# no full-page writes (a crash of the host may corrupt the data: never use for real data;
# base backups force full-page writes while they run). jit=off: the image does not ship LLVM.
# A replica is a hot standby (hot_standby=on is PostgreSQL's default): it takes read-only queries.
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres \
    -c listen_addresses='*' -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c jit=off -c max_connections=200 "$@"
