# mlflow-gateway-backfill. Every target bootstraps .venv on first use.
# The database: DATABASE_URL, else MLFLOW_TRACKING_URI when it is a database URI, else sqlite:///mlflow.db.
#   make backfill DATABASE_URL=postgresql://mlflow@db/mlflow ARGS="--sleep 0.1"

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=
export DATABASE_URL MLFLOW_TRACKING_URI MGB_TEST_BACKENDS MGB_TEST_POSTGRES_URL MGB_TEST_MYSQL_URL \
	MGB_POSTGRES_IMAGE MGB_POSTGRES_18_IMAGE MGB_MYSQL_IMAGE MGB_MARIADB_IMAGE MGB_MARIADB_11_IMAGE MGB_ROOTFS_CACHE

.PHONY: backfill migrate demo test migration-check lint bench bench-quick clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

backfill: $(BIN)/.installed  ## run the backfill on the resolved database
	$(BIN)/mlflow-gateway-backfill run $(ARGS)

migrate: $(BIN)/.installed  ## alembic upgrade head on the resolved database
	$(BIN)/alembic upgrade head

demo: $(BIN)/.installed  ## real MLflow writes mlflow.db with gateway experiments; status, run, verify
	$(BIN)/python -m tests.demo mlflow.db
	$(BIN)/mlflow-gateway-backfill status --database-url sqlite:///mlflow.db
	$(BIN)/mlflow-gateway-backfill run --database-url sqlite:///mlflow.db
	$(BIN)/mlflow-gateway-backfill verify --database-url sqlite:///mlflow.db
	$(BIN)/python -m tests.demo mlflow.db --show-list

test: $(BIN)/.installed  ## the full suite on sqlite, postgresql and mysql (starts Docker and builds images if needed)
	scripts/provision-tests.sh
	$(BIN)/pytest -m "not migration_check" $(PYTEST_ARGS)

migration-check: $(BIN)/.installed  ## the CI migration check on every backend
	scripts/provision-tests.sh
	$(BIN)/pytest -m migration_check $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(BIN)/.bench-installed  ## 100k and 1M experiments on every backend (see README)
	scripts/provision-tests.sh
	$(BIN)/python -m bench

bench-quick: $(BIN)/.bench-installed  ## small sizes, for development
	scripts/provision-tests.sh
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
