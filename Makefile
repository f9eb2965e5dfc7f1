# mlflow-gateway-backfill. Every target bootstraps what it needs on first use: uv (pinned, hash-checked,
# in .cache/), then .venv synced exactly to a hash-pinned lock in requirements/ (runtime only for backfill
# and migrate; the test lock for everything else).
# The database: DATABASE_URL, else MLFLOW_BACKEND_STORE_URI, else MLFLOW_TRACKING_URI when it is a database
# URI, else sqlite:///mlflow.db.
#   make backfill DATABASE_URL=postgresql://mlflow@db/mlflow ARGS="--sleep 0.1"

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers; every test of one backend runs on the same worker (see tests/conftest.py). The suite
# waits on servers, replicas, locks and child processes more than it computes: 4 workers keep 2 cores busy
# (with 2, a full run used about half of them). The migration check is CPU-bound (MLflow's imports): 2.
PYTEST_WORKERS ?= 4
MIGRATION_CHECK_WORKERS ?= 2
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' requirements/uv.txt)
UV_DIR := .cache/uv-$(UV_VERSION)
UV ?= $(UV_DIR)/bin/uv
# Bootstrapped only when UV is the pinned one (make UV=uv uses yours).
UV_DEP := $(filter $(UV_DIR)/bin/uv,$(UV))
# The image's base (see Dockerfile); empty: a Debian bookworm base built here (scripts/build-image.sh).
BASE_IMAGE ?=
export DATABASE_URL MLFLOW_BACKEND_STORE_URI MLFLOW_TRACKING_URI MLFLOW_READ_REPLICA_BACKEND_STORE_URI BASE_IMAGE UV \
	MGB_TEST_BACKENDS MGB_TEST_POSTGRESQL_URL MGB_TEST_POSTGRESQL_18_URL MGB_TEST_MYSQL_URL MGB_TEST_MARIADB_URL \
	MGB_TEST_MARIADB_11_URL MGB_POSTGRES_IMAGE MGB_POSTGRES_18_IMAGE MGB_MYSQL_IMAGE MGB_MARIADB_IMAGE \
	MGB_MARIADB_11_IMAGE MGB_PGBOUNCER_IMAGE MGB_ROOTFS_CACHE MGB_MLFLOW_VENVS MGB_MIGRATION_CHECK_URL \
	MGB_MIGRATION_CHECK_PARALLEL MLFLOW_VERSIONS
# uv never downloads a Python: the venv uses $(PYTHON).
export UV_PYTHON_DOWNLOADS := never
# Python's own byte-code cache, as it works by default. uv (unlike pip) does not compile at install time,
# so where the environment sets PYTHONDONTWRITEBYTECODE (some CI and sandbox images do) every command would
# compile MLflow's thousands of modules again (about 4 s of CPU each time); compiling the whole lock up
# front costs 30 s instead. With the cache, the first import writes what it uses, once.
unexport PYTHONDONTWRITEBYTECODE
export PYTHON

.PHONY: backfill migrate demo test migration-check mlflow-venvs lint lock lock-upgrade image screenshots bench bench-light bench-quick clean

# uv itself, from PyPI with the system pip, exactly the version and hashes of requirements/uv.txt.
$(UV_DIR)/bin/uv: requirements/uv.txt
	$(PYTHON) -m pip install -qq --disable-pip-version-check --no-deps --only-binary :all: --no-compile \
		--require-hashes --upgrade --target $(UV_DIR) -r requirements/uv.txt
	touch $@

# .venv at one of two levels. The runtime lock pins a subset of the test lock's exact versions
# (scripts/lock.sh), so a venv synced to the test lock also serves the runtime targets; syncing the
# runtime lock (exact: it removes the rest) drops the test stamp.
$(BIN)/.runtime: requirements/runtime.txt | $(UV_DEP)
	@if [ -f $(BIN)/.test ] && [ $(BIN)/.test -nt requirements/test.txt ]; then touch $@; exit 0; fi; \
	set -e; [ -x $(BIN)/python ] || $(UV) venv --quiet --python $(PYTHON) $(VENV); \
	echo "$(UV) pip sync requirements/runtime.txt"; \
	$(UV) pip sync --quiet --python $(BIN)/python --require-hashes requirements/runtime.txt; \
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .; \
	rm -f $(BIN)/.test; touch $@

$(BIN)/.test: requirements/test.txt | $(UV_DEP)
	[ -x $(BIN)/python ] || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --python $(BIN)/python --require-hashes requirements/test.txt
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@ $(BIN)/.runtime

backfill: $(BIN)/.runtime  ## run the backfill on the resolved database
	$(BIN)/mlflow-gateway-backfill run $(ARGS)

migrate: $(BIN)/.runtime  ## alembic upgrade head on the resolved database
	$(BIN)/alembic upgrade head

demo: $(BIN)/.test  ## real MLflow writes mlflow.db with gateway experiments; status, run, verify
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m tests.demo mlflow.db
	$(BIN)/mlflow-gateway-backfill status --database-url sqlite:///mlflow.db
	$(BIN)/mlflow-gateway-backfill run --database-url sqlite:///mlflow.db
	$(BIN)/mlflow-gateway-backfill verify --database-url sqlite:///mlflow.db
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m tests.demo mlflow.db --show-list

# The tool's image is part of the suite (tests/test_image.py, tests/test_deploy.py): built here, up front,
# so its log shows; the tests' own `make image` is then a no-op.
test: $(BIN)/.test  ## the full suite on every backend (starts Docker, builds the images if needed)
	scripts/provision-tests.sh
	$(MAKE) --no-print-directory image
	scripts/ensure-compose.sh
	$(BIN)/pytest -m "not migration_check" -n $(PYTEST_WORKERS) --dist loadgroup --durations=20 $(PYTEST_ARGS)

# MLFLOW_VERSIONS=3.18.0,3.19.0: those releases (each alone, and over 3.10.0's data) instead of the table's.
migration-check: $(BIN)/.test  ## the CI migration check: MLflow 2.22.5 to 3.18.0 on every backend
	scripts/provision-tests.sh
	$(BIN)/pytest -m migration_check -n $(MIGRATION_CHECK_WORKERS) --dist loadgroup $(PYTEST_ARGS)

mlflow-venvs: $(BIN)/.test  ## build (or reuse) the migration check's per-release MLflow venvs
	$(BIN)/python -m tests.mlflow_versions

lint: $(BIN)/.test  ## ruff, shell scripts' syntax, and the locks up to date with pyproject.toml
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	for f in scripts/*.sh images/*.sh; do bash -n "$$f"; done
	UV=$(UV) scripts/lock.sh --check

lock: | $(UV_DEP)  ## recompile requirements/*.txt after a change to pyproject.toml (keeps the other pins)
	UV=$(UV) scripts/lock.sh

lock-upgrade: | $(UV_DEP)  ## recompile requirements/*.txt with the newest releases pyproject.toml allows
	UV=$(UV) LOCK_UPGRADE=1 scripts/lock.sh

image: | $(UV_DEP)  ## mlflow-gateway-backfill:<version> and :latest, built offline (BASE_IMAGE=python:3.11-slim to use that)
	scripts/ensure-docker.sh
	scripts/build-image.sh

screenshots: $(BIN)/.test | $(UV_DEP)  ## docs/experiments-{before,after}.png: a real mlflow server's UI, Chromium
	UV=$(UV) scripts/screenshots.sh

bench: $(BIN)/.test  ## 1M experiments, two shapes of data, every backend, 3 pairs (see docs/benchmark.md; about 14 min here)
	scripts/provision-tests.sh
	$(BIN)/python -m bench

bench-light: $(BIN)/.test  ## the same pairs, only the figures the goals are judged on (about 10 min here)
	scripts/provision-tests.sh
	$(BIN)/python -m bench --light

bench-quick: $(BIN)/.test  ## small sizes, for development
	scripts/provision-tests.sh
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .cache build .pytest_cache .ruff_cache .hypothesis
