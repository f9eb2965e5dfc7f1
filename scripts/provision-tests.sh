#!/usr/bin/env bash
# What `make test` needs besides the venv: a Docker engine and the images of the selected server backends
# (MGB_TEST_BACKENDS, default all), unless every selected one is given as an existing server
# (MGB_TEST_<ID>_URL, e.g. MGB_TEST_POSTGRESQL_18_URL).
set -euo pipefail
backends=${MGB_TEST_BACKENDS:-sqlite,postgresql,postgresql-18,mysql,mariadb,mariadb-11}
need=()
IFS=, read -ra wanted <<<"$backends"
for b in "${wanted[@]}"; do
    b=${b// /}
    [ -n "$b" ] && [ "$b" != sqlite ] || continue
    var="MGB_TEST_$(echo "$b" | tr 'a-z-' 'A-Z_')_URL"
    [ -n "${!var:-}" ] || need+=("$b")
done
[ "${#need[@]}" -gt 0 ] || exit 0
here=$(dirname "$0")
"$here/ensure-docker.sh"
"$here/build-test-images.sh" "${need[@]}"
