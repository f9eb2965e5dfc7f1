#!/bin/sh
# Entrypoint of mlflow-gateway-backfill/mariadb:10.11, the offline stand-in for the official
# mysql/mariadb images (built by scripts/build-test-images.sh). It honours what the unmodified
# testcontainers MySqlContainer relies on:
#   - MYSQL_ROOT_PASSWORD (root@'%' and root@localhost), MYSQL_DATABASE, and MYSQL_USER /
#     MYSQL_PASSWORD (a user with all rights on that database; not set when the user is root);
#   - readiness is ": ready for connections" seen TWICE in the log: once from a temporary
#     init server without networking, once from the final server on 0.0.0.0:3306;
#   - the server is PID 1 (exec): SIGTERM from `docker stop` is a clean shutdown;
#   - an initialised data directory (after `docker restart`) is started as it is (then the
#     line appears once for that start).
# Server defaults (Debian's: utf8mb4, utf8mb4_general_ci, case-insensitive) are kept.
set -eu

datadir=/var/lib/mysql
socket=/run/mysqld/mysqld.sock
# For throw-away test databases: flush the redo log about once a second instead of at every
# commit, no doublewrite buffer, no DNS look-ups of clients (a host crash may lose data).
set -- --user=mysql --datadir="$datadir" --socket="$socket" --skip-name-resolve \
    --innodb-flush-log-at-trx-commit=2 --innodb-doublewrite=0 --innodb-log-file-size=32M "$@"

mkdir -p /run/mysqld "$datadir"
chown mysql:mysql /run/mysqld "$datadir"

# SQL string literal and identifier quoting.
lit() { printf "'%s'" "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g")"; }
# shellcheck disable=SC2016 # literal backticks
ident() { printf '`%s`' "$(printf '%s' "$1" | sed 's/`/``/g')"; }

if [ ! -d "$datadir/mysql" ]; then
    if [ -z "${MYSQL_ROOT_PASSWORD:-}" ]; then
        echo "mariadb-entrypoint: MYSQL_ROOT_PASSWORD must be set" >&2
        exit 1
    fi
    mariadb-install-db "$@" --skip-test-db >/dev/null

    mariadbd "$@" --skip-networking &
    pid=$!
    sql() { mariadb --protocol=socket --socket="$socket" -uroot "$@"; }
    tries=0
    until sql -e 'SELECT 1' >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -gt 300 ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "mariadb-entrypoint: the temporary server did not start" >&2
            exit 1
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

exec mariadbd "$@" --bind-address=0.0.0.0 --port=3306
