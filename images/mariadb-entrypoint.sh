#!/bin/sh
# Entrypoint of mlflow-gateway-backfill/mariadb:10.11 and :11.8, the offline stand-ins for the
# official mariadb image (built by scripts/build-test-images.sh). It honours what the unmodified
# testcontainers MySqlContainer relies on:
#   - MYSQL_ROOT_PASSWORD (root@'%' and root@localhost), MYSQL_DATABASE, and MYSQL_USER /
#     MYSQL_PASSWORD (a user with all rights on that database; not set when the user is root);
#   - readiness is ": ready for connections" seen TWICE in the log: once from a temporary
#     init server without networking, once from the final server on 0.0.0.0:3306;
#   - the server is PID 1 (exec): SIGTERM from `docker stop` is a clean shutdown;
#   - an initialised data directory (after `docker restart`) is started as it is (then the
#     line appears once for that start).
# Server defaults (Debian's: utf8mb4 and a case-insensitive collation) are kept.
#
# Replication (MariaDB's GTIDs are always on; these variables matter only when the data directory is
# first made, except MGB_REPLICATION and MGB_SERVER_ID, which apply at every start):
#   MGB_REPLICATION           unset or empty: a standalone server (as above, binary log off);
#                             "primary": binary log on and a replication user;
#                             "replica": read_only=ON (for users without READ ONLY ADMIN/SUPER: root may
#                             still write), replicating from MGB_PRIMARY_HOST with CHANGE MASTER TO ...
#                             MASTER_USE_GTID=slave_pos (the replication threads start with the final
#                             server and retry every second until the primary answers).
#                             Each server runs its own init (users, MYSQL_DATABASE, initdb.d scripts)
#                             outside the binary log, so it is not replicated: the replica copies what
#                             the primary does once it is ready.
#   MGB_REPLICATION_USER      the user replicas connect as (default: replicator);
#   MGB_REPLICATION_PASSWORD  its password (required for a primary and a replica);
#   MGB_PRIMARY_HOST          replica: the primary's host name (e.g. its alias on a user-defined network);
#   MGB_PRIMARY_PORT          replica: the primary's port (default: 3306);
#   MGB_SERVER_ID             server_id, unique among the servers that replicate together (default: 1 for
#                             a primary, a number derived from the container's host name for a replica).
set -eu

role=${MGB_REPLICATION:-}
repl_user=${MGB_REPLICATION_USER:-replicator}
fail() {
    echo "mariadb-entrypoint: $*" >&2
    exit 1
}
case $role in
    "" | primary | replica) ;;
    *) fail "MGB_REPLICATION must be empty, 'primary' or 'replica', not '$role'" ;;
esac
if [ -n "$role" ] && [ -z "${MGB_REPLICATION_PASSWORD:-}" ]; then
    fail "MGB_REPLICATION=$role needs MGB_REPLICATION_PASSWORD"
fi
if [ "$role" = replica ] && [ -z "${MGB_PRIMARY_HOST:-}" ]; then
    fail "MGB_REPLICATION=replica needs MGB_PRIMARY_HOST"
fi

datadir=/var/lib/mysql
socket=/run/mysqld/mysqld.sock
# For throw-away test databases: flush the redo log about once a second instead of at every
# commit, no doublewrite buffer, no DNS look-ups of clients (a host crash may lose data).
set -- --user=mysql --datadir="$datadir" --socket="$socket" --skip-name-resolve \
    --innodb-flush-log-at-trx-commit=2 --innodb-doublewrite=0 --innodb-log-file-size=32M "$@"

# The final server's options per role. The init server runs without network and without binary log
# (nothing done there is replicated); a replica's does not start replicating yet.
case $role in
    primary) role_options="--server-id=${MGB_SERVER_ID:-1} --log-bin=mysql-bin" ;;
    replica)
        # Docker gives each container its own host name: a default id that differs between replicas.
        id=${MGB_SERVER_ID:-$(($(cksum </proc/sys/kernel/hostname | cut -d' ' -f1) % 1000000000 + 2))}
        role_options="--server-id=$id --relay-log=relay-bin --read-only=ON"
        ;;
    *) role_options= ;;
esac

mkdir -p /run/mysqld "$datadir"
chown mysql:mysql /run/mysqld "$datadir"

# SQL string literal and identifier quoting.
lit() { printf "'%s'" "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g")"; }
# shellcheck disable=SC2016 # literal backticks
ident() { printf '`%s`' "$(printf '%s' "$1" | sed 's/`/``/g')"; }

if [ ! -d "$datadir/mysql" ]; then
    if [ -z "${MYSQL_ROOT_PASSWORD:-}" ]; then
        fail "MYSQL_ROOT_PASSWORD must be set"
    fi
    mariadb-install-db "$@" --skip-test-db >/dev/null

    if [ "$role" = replica ]; then
        mariadbd "$@" --skip-networking --relay-log=relay-bin --skip-slave-start &
    else
        mariadbd "$@" --skip-networking &
    fi
    pid=$!
    sql() { mariadb --protocol=socket --socket="$socket" -uroot "$@"; }
    tries=0
    until sql -e 'SELECT 1' >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -gt 300 ] || ! kill -0 "$pid" 2>/dev/null; then
            fail "the temporary server did not start"
        fi
        sleep 0.1
    done

    pw=$(lit "$MYSQL_ROOT_PASSWORD")
    {
        # root keeps unix_socket (docker exec as OS root) and gets the password for TCP.
        echo "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD($pw);"
        echo "CREATE USER 'root'@'%' IDENTIFIED BY $pw;"
        echo "GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;"
        if [ -n "${MYSQL_DATABASE:-}" ]; then
            echo "CREATE DATABASE IF NOT EXISTS $(ident "$MYSQL_DATABASE");"
        fi
        if [ -n "${MYSQL_USER:-}" ] && [ "$MYSQL_USER" != root ]; then
            echo "CREATE USER $(lit "$MYSQL_USER")@'%' IDENTIFIED BY $(lit "${MYSQL_PASSWORD:-}");"
            if [ -n "${MYSQL_DATABASE:-}" ]; then
                echo "GRANT ALL PRIVILEGES ON $(ident "$MYSQL_DATABASE").* TO $(lit "$MYSQL_USER")@'%';"
            fi
        fi
        if [ "$role" = primary ]; then
            echo "CREATE USER $(lit "$repl_user")@'%' IDENTIFIED BY $(lit "$MGB_REPLICATION_PASSWORD");"
            echo "GRANT REPLICATION SLAVE ON *.* TO $(lit "$repl_user")@'%';"
        elif [ "$role" = replica ]; then
            echo "CHANGE MASTER TO MASTER_HOST = $(lit "$MGB_PRIMARY_HOST"), MASTER_PORT = ${MGB_PRIMARY_PORT:-3306},"
            echo "  MASTER_USER = $(lit "$repl_user"), MASTER_PASSWORD = $(lit "$MGB_REPLICATION_PASSWORD"),"
            echo "  MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1;"
        fi
    } | sql
    # shellcheck source=/dev/null # (initdb.d scripts, sourced as the official images do)
    for f in /docker-entrypoint-initdb.d/*; do
        case $f in
            *.sql) sql ${MYSQL_DATABASE:+"--database=$MYSQL_DATABASE"} <"$f" ;;
            *.sh) . "$f" ;;
        esac
    done
    kill "$pid"
    wait "$pid"
fi

# shellcheck disable=SC2086 # option list split on purpose
exec mariadbd "$@" $role_options --bind-address=0.0.0.0 --port=3306
