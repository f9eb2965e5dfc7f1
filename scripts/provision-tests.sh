#!/usr/bin/env bash
# What `make test` needs besides the venv: a Docker engine and the images of the selected server backends
# (MGB_TEST_BACKENDS, default all), unless every selected one is given as an existing server
# (MGB_TEST_<ID>_URL, e.g. MGB_TEST_POSTGRESQL_18_URL). The postgresql-pgbouncer-* backends need the images
# of postgresql and pgbouncer.
set -euo pipefail
backends=${MGB_TEST_BACKENDS:-sqlite,postgresql,postgresql-18,mysql,mariadb,mariadb-11,postgresql-pgbouncer-transaction,postgresql-pgbouncer-session}
need=()
IFS=, read -ra wanted <<<"$backends"
for b in "${wanted[@]}"; do
    b=${b// /}
    [ -n "$b" ] && [ "$b" != sqlite ] || continue
    var="MGB_TEST_$(echo "$b" | tr 'a-z-' 'A-Z_')_URL"
    [ -z "${!var:-}" ] || continue
    case $b in
        postgresql-pgbouncer-*) need+=(postgresql pgbouncer) ;;
        *) need+=("$b") ;;
    esac
done
[ "${#need[@]}" -gt 0 ] || exit 0
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
here=$(dirname "$0")
"$here/ensure-docker.sh"
"$here/build-test-images.sh" "${need[@]}"
