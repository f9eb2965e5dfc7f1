"""With real MLflow data: after the backfill, MLflow's own experiment-list filter hides every gateway experiment."""

from __future__ import annotations

from mlflow.entities import ViewType

from backfill.connect import create_engine
from backfill.job import Backfill
from backfill.sql import IS_GATEWAY_KEY
from backfill.urls import parse_url
from tests.mlflow_data import mlflow_store, populate

# What the MLflow 3.10.1+ UI ANDs onto every experiment-list search.
UI_FILTER = "tags.`mlflow.experiment.isGateway` IS NULL"


def listed(url: str) -> set[int]:
    store = mlflow_store(url)
    try:
        found = store.search_experiments(view_type=ViewType.ALL, max_results=1000, filter_string=UI_FILTER)
        return {int(e.experiment_id) for e in found}
    finally:
        store.engine.dispose()


def test_gateway_experiments_leave_the_experiment_list(server) -> None:  # type: ignore[no-untyped-def]
    url = server.new_mlflow_database()
    data = populate(url, gateway=3, ordinary=2, deleted_gateway=1, with_runs=True)
    gateway = set(data.gateway) | set(data.deleted_gateway)
    assert gateway <= listed(url)  # the symptom: 3.10.0's gateway experiments show up

    report = Backfill(create_engine(parse_url(url))).run()

    assert report.inserted == len(gateway)
    after = listed(url)
    assert not gateway & after
    assert set(data.ordinary) <= after
    store = mlflow_store(url)  # MLflow still opens the database (its schema check passes)
    try:
        for e in gateway:  # deleted ones too, which MLflow's own API cannot tag
            assert store.get_experiment(str(e)).tags[IS_GATEWAY_KEY] == "true"
    finally:
        store.engine.dispose()
