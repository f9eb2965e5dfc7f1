#!/usr/bin/env bash
# What `make test` needs besides the venv: a Docker engine and the test images, unless every requested
# server backend is given as an existing server (MGB_TEST_POSTGRES_URL / MGB_TEST_MYSQL_URL).
set -euo pipefail
backends=${MGB_TEST_BACKENDS:-sqlite,postgresql,mysql}
need=no
case ",$backends," in *,postgresql,*) [ -n "${MGB_TEST_POSTGRES_URL:-}" ] || need=yes ;; esac
case ",$backends," in *,mysql,*) [ -n "${MGB_TEST_MYSQL_URL:-}" ] || need=yes ;; esac
[ "$need" = yes ] || exit 0
here=$(dirname "$0")
"$here/ensure-docker.sh"
"$here/build-test-images.sh"
