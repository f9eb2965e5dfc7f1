#!/bin/sh
# Entrypoint of mlflow-gateway-backfill/pgbouncer:1.18, Debian's PgBouncer (built offline by
# scripts/build-test-images.sh), configured from the environment as a managed or Kubernetes pooler is:
#   MGB_PGBOUNCER_UPSTREAM_HOST    the PostgreSQL server (e.g. its alias on a user-defined network); required
#   MGB_PGBOUNCER_UPSTREAM_PORT    its port (default 5432)
#   MGB_PGBOUNCER_POOL_MODE        session (PgBouncer's default), transaction or statement
#   MGB_PGBOUNCER_POOL_SIZE        default_pool_size: server connections per database and user (default 20)
#   MGB_PGBOUNCER_AUTH_USER        the role PgBouncer logs in as to look passwords up (auth_user); required
#   MGB_PGBOUNCER_AUTH_PASSWORD    its password (the only entry of auth_file); required
#   MGB_PGBOUNCER_AUTH_QUERY       auth_query (default PgBouncer's own, which reads pg_shadow: superuser only)
#
# Every database is reachable (a wildcard entry), on port 6432. Clients log in with SCRAM-SHA-256 as any role of
# the server, with that role's own password: PgBouncer fetches the role's SCRAM secret with auth_query, checks
# the client against it, and logs in to the server with the keys of that exchange (SCRAM pass-through, 1.14+).
# ignore_startup_parameters is PgBouncer's stock value (empty): a client that sends `options` is refused, as by
# a pooler nobody reconfigured. No TLS towards clients (PgBouncer's default).
set -eu

fail() {
    echo "pgbouncer-entrypoint: $*" >&2
    exit 1
}

[ -n "${MGB_PGBOUNCER_UPSTREAM_HOST:-}" ] || fail "MGB_PGBOUNCER_UPSTREAM_HOST must be set"
[ -n "${MGB_PGBOUNCER_AUTH_USER:-}" ] || fail "MGB_PGBOUNCER_AUTH_USER must be set"
[ -n "${MGB_PGBOUNCER_AUTH_PASSWORD:-}" ] || fail "MGB_PGBOUNCER_AUTH_PASSWORD must be set"
mode=${MGB_PGBOUNCER_POOL_MODE:-session}
case $mode in
    session | transaction | statement) ;;
    *) fail "MGB_PGBOUNCER_POOL_MODE must be session, transaction or statement, not '$mode'" ;;
esac
pool_size=${MGB_PGBOUNCER_POOL_SIZE:-20}
case $pool_size in
    '' | *[!0-9]*) fail "MGB_PGBOUNCER_POOL_SIZE must be a number, not '$pool_size'" ;;
esac
auth_query=${MGB_PGBOUNCER_AUTH_QUERY:-'SELECT usename, passwd FROM pg_shadow WHERE usename=$1'}

mkdir -p /etc/pgbouncer
# auth_file: "user" "password", a double quote inside doubled.
quote() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }
(
    umask 077
    printf '%s %s\n' "$(quote "$MGB_PGBOUNCER_AUTH_USER")" "$(quote "$MGB_PGBOUNCER_AUTH_PASSWORD")" \
        >/etc/pgbouncer/userlist.txt
)
# Settings for tests, each traded against PgBouncer's default for a reason:
#   server_idle_timeout 120 (600): every test database gets pools of its own; their idle server connections
#     are closed within two minutes instead of piling up towards the server's max_connections (still far
#     longer than any test waits for a lock a dead client left on a pooled server connection to go);
#   server_login_retry 1 (15) and dns_max_ttl 1 (15): after a fault test restarts the server (whose address on
#     the network may change), the pooler connects again at once rather than refusing clients for 15 s;
#   max_client_conn 500 (100): several test processes at once, each with a few connections.
cat >/etc/pgbouncer/pgbouncer.ini <<EOF
[databases]
* = host=$MGB_PGBOUNCER_UPSTREAM_HOST port=${MGB_PGBOUNCER_UPSTREAM_PORT:-5432}

[pgbouncer]
listen_addr = *
listen_port = 6432
unix_socket_dir =
pool_mode = $mode
default_pool_size = $pool_size
max_client_conn = 500
auth_type = scram-sha-256
auth_file = /etc/pgbouncer/userlist.txt
auth_user = $MGB_PGBOUNCER_AUTH_USER
auth_query = $auth_query
admin_users = $MGB_PGBOUNCER_AUTH_USER
server_idle_timeout = 120
server_login_retry = 1
dns_max_ttl = 1
EOF
chown -R postgres:postgres /etc/pgbouncer

# Not a daemon, no logfile: PgBouncer logs to stderr (docker logs). PID 1, so `docker stop` (SIGTERM: immediate
# shutdown in PgBouncer 1.18) ends it at once.
exec setpriv --reuid=postgres --regid=postgres --init-groups pgbouncer /etc/pgbouncer/pgbouncer.ini
