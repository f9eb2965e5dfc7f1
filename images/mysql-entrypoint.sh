#!/bin/sh
# Entrypoint of mlflow-gateway-backfill/mysql:9.7, the offline stand-in for the official mysql image
# (Oracle MySQL from Debian's mysql-server-core; built by scripts/build-test-images.sh). It honours
# what the unmodified testcontainers MySqlContainer relies on:
#   - MYSQL_ROOT_PASSWORD (root@'%' and root@localhost), MYSQL_DATABASE, and MYSQL_USER /
#     MYSQL_PASSWORD (a user with all rights on that database; not set when the user is root);
#   - readiness is ": ready for connections" seen TWICE in the log: once from a temporary
#     init server without networking, once from the final server on 0.0.0.0:3306;
#   - the server is PID 1 (exec): SIGTERM from `docker stop` is a clean shutdown;
#   - an initialised data directory (after `docker restart`) is started as it is (then the
#     line appears once for that start).
# Like the official image: users get MySQL's default caching_sha2_password (the server makes its own
# TLS certificate, so clients can send the password over TLS, or use RSA); the binary log is on
# (MySQL's default); /docker-entrypoint-initdb.d/*.sql and *.sh run once, on the init server.
# Unlike it: the X protocol is off (mysqlx=OFF), and durability is traded for speed (below).
#
# Replication (GTID based; these variables matter only when the data directory is first made, except
# MGB_REPLICATION and MGB_SERVER_ID, which apply at every start):
#   MGB_REPLICATION           unset or empty: a standalone server (as above);
#                             "primary": gtid_mode=ON, enforce_gtid_consistency=ON, binary log on, and a
#                             replication user;
#                             "replica": the same GTID settings, read_only=ON (for users without
#                             CONNECTION_ADMIN/SUPER: root may still write), replicating from
#                             MGB_PRIMARY_HOST with CHANGE REPLICATION SOURCE TO ... SOURCE_AUTO_POSITION=1,
#                             SOURCE_SSL=1, GET_SOURCE_PUBLIC_KEY=1 (the replication threads start with
#                             the final server and retry every second until the primary answers).
#                             Each server runs its own init (users, MYSQL_DATABASE, initdb.d scripts)
#                             outside the binary log, so it is not replicated: the replica copies what
#                             the primary does once it is ready.
#                             Stopping a primary while a replica is connected takes about 10 s (its
#                             binlog dump thread is slow to notice the shutdown): Docker's default stop
#                             timeout is 10 s, so give `docker stop`/`restart` of a primary `-t 30`.
#   MGB_REPLICATION_USER      the user replicas connect as (default: replicator);
#   MGB_REPLICATION_PASSWORD  its password (required for a primary and a replica);
#   MGB_PRIMARY_HOST          replica: the primary's host name (e.g. its alias on a user-defined network);
#   MGB_PRIMARY_PORT          replica: the primary's port (default: 3306);
#   MGB_SERVER_ID             server_id, unique among the servers that replicate together (default: 1 for
#                             a primary, a number derived from the container's host name for a replica).
set -eu

datadir=/var/lib/mysql
socket=/run/mysqld/mysqld.sock
role=${MGB_REPLICATION:-}
repl_user=${MGB_REPLICATION_USER:-replicator}

fail() {
    echo "mysql-entrypoint: $*" >&2
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

# For throw-away test databases: flush the redo log about once a second instead of at every
# commit, no doublewrite buffer, no binary log sync, no DNS look-ups of clients (a host crash may
# lose data). Arguments given to the container come after these, so they win.
base="--user=mysql --datadir=$datadir --socket=$socket --pid-file=/run/mysqld/mysqld.pid --skip-name-resolve
    --mysqlx=OFF --innodb-numa-interleave=OFF --innodb-flush-log-at-trx-commit=2 --innodb-doublewrite=OFF --sync-binlog=0"
gtid="--gtid-mode=ON --enforce-gtid-consistency=ON"
# The init server: no network, no binary log (nothing done there is replicated); a replica's needs
# GTIDs on to accept SOURCE_AUTO_POSITION, and must not start replicating yet.
temp_options="--skip-networking --skip-log-bin"
case $role in
    primary) role_options="--server-id=${MGB_SERVER_ID:-1} --log-bin=binlog $gtid" ;;
    replica)
        # Docker gives each container its own host name: a default id that differs between replicas.
        id=${MGB_SERVER_ID:-$(($(cksum </proc/sys/kernel/hostname | cut -d' ' -f1) % 1000000000 + 2))}
        role_options="--server-id=$id --log-bin=binlog $gtid --relay-log=relay-bin --read-only=ON"
        temp_options="--server-id=$id $gtid --relay-log=relay-bin --skip-replica-start $temp_options"
        ;;
    *) role_options= ;;
esac

# /var/lib/mysql-files: MySQL's default secure_file_priv (the only place LOAD DATA / SELECT ... INTO
# OUTFILE may use); the server refuses to start without it.
mkdir -p /run/mysqld "$datadir" /var/lib/mysql-files
chown mysql:mysql /run/mysqld "$datadir" /var/lib/mysql-files
chmod 750 /var/lib/mysql-files

# SQL string literal and identifier quoting.
lit() { printf "'%s'" "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g")"; }
# shellcheck disable=SC2016 # literal backticks
ident() { printf '`%s`' "$(printf '%s' "$1" | sed 's/`/``/g')"; }

if [ ! -d "$datadir/mysql" ]; then
    if [ -z "${MYSQL_ROOT_PASSWORD:-}" ]; then
        fail "MYSQL_ROOT_PASSWORD must be set"
    fi
    # shellcheck disable=SC2086 # option lists are split on purpose
    mysqld $base --initialize-insecure "$@"

    # shellcheck disable=SC2086
    mysqld $base "$@" $temp_options &
    pid=$!
    rootpw=
    sql() { env MYSQL_PWD="$rootpw" mysql --protocol=socket --socket="$socket" --user=root "$@"; }
    tries=0
    until sql -e 'SELECT 1' >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -gt 600 ] || ! kill -0 "$pid" 2>/dev/null; then
            fail "the temporary server did not start"
        fi
        sleep 0.1
    done

    pw=$(lit "$MYSQL_ROOT_PASSWORD")
    {
        echo "ALTER USER 'root'@'localhost' IDENTIFIED BY $pw;"
        echo "CREATE USER 'root'@'%' IDENTIFIED BY $pw;"
        echo "GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;"
        echo "GRANT PROXY ON ''@'' TO 'root'@'%' WITH GRANT OPTION;"
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
            echo "CHANGE REPLICATION SOURCE TO SOURCE_HOST = $(lit "$MGB_PRIMARY_HOST"),"
            echo "  SOURCE_PORT = ${MGB_PRIMARY_PORT:-3306}, SOURCE_USER = $(lit "$repl_user"),"
            echo "  SOURCE_PASSWORD = $(lit "$MGB_REPLICATION_PASSWORD"), SOURCE_AUTO_POSITION = 1,"
            echo "  SOURCE_SSL = 1, GET_SOURCE_PUBLIC_KEY = 1, SOURCE_CONNECT_RETRY = 1, SOURCE_RETRY_COUNT = 86400;"
        fi
    } | sql
    rootpw=$MYSQL_ROOT_PASSWORD
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

# shellcheck disable=SC2086
exec mysqld $base $role_options "$@" --bind-address=0.0.0.0 --port=3306
