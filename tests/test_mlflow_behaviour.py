"""What MLflow itself still does after 3.10.0, checked against the real MLflow in the test venv (3.10.1):
why the backfill belongs in every rollout, not only in the upgrade from 3.10.0.

* Creating a gateway endpoint whose ``gateway/<name>`` experiment already exists reuses that experiment
  and adds no tag (``_get_or_create_experiment_id`` in ``mlflow/store/tracking/gateway/sqlalchemy_mixin.py``
  returns the existing id when ``create_experiment`` fails with RESOURCE_ALREADY_EXISTS): an untagged
  experiment left by 3.10.0 stays untagged, and visible, when an endpoint of that name is made again.
* The home page's "Recent Experiments" asks for the five most recently updated experiments with no filter
  (``mlflow/server/js/src/home/HomePage.tsx``), so gateway experiments show there whatever their tags.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

from backfill.sql import IS_GATEWAY_KEY, SOURCE_TYPE_KEY
from tests.conftest import Db, run_cli
from tests.mlflow_data import create_gateway_experiments, mlflow_store, strip_is_gateway


@pytest.mark.backends("sqlite", "postgresql")
def test_mlflow_relinks_an_untagged_gateway_experiment_until_the_backfill_runs(db: Db) -> None:
    """A 3.10.0-style ``gateway/ep-0`` (no isGateway), its endpoint deleted, then an endpoint of the same name
    created by MLflow 3.10.1: MLflow links the old experiment and leaves it untagged (the UI's filter lists
    it); the backfill tags it."""
    store = mlflow_store(db.url)
    (old,) = create_gateway_experiments(store, 1, prefix="ep")
    strip_is_gateway(db.url, [old])
    endpoint = store.list_gateway_endpoints()[0]
    store.delete_gateway_endpoint(endpoint.endpoint_id)

    from mlflow.entities.gateway_endpoint import GatewayEndpointModelConfig, GatewayModelLinkageType

    definition = store.list_gateway_model_definitions()[0]
    config = [
        GatewayEndpointModelConfig(
            model_definition_id=definition.model_definition_id, linkage_type=GatewayModelLinkageType.PRIMARY
        )
    ]
    recreated = store.create_gateway_endpoint(name="ep-0", model_configs=config, usage_tracking=True)
    assert int(recreated.experiment_id) == old  # the old experiment, linked again
    tags = {k: v for e, k, v in db.tags() if e == old}
    assert tags[SOURCE_TYPE_KEY] == "GATEWAY"
    assert IS_GATEWAY_KEY not in tags  # ... and still without isGateway
    listed = store.search_experiments(filter_string=f"tags.`{IS_GATEWAY_KEY}` IS NULL")
    assert "gateway/ep-0" in {e.name for e in listed}  # the UI's experiment list shows it
    store.engine.dispose()

    result = run_cli("run", "--database-url", db.url)
    assert result.returncode == 0, result.stderr
    assert {k: v for e, k, v in db.tags() if e == old}[IS_GATEWAY_KEY] == "true"
    store = mlflow_store(db.url)
    listed = store.search_experiments(filter_string=f"tags.`{IS_GATEWAY_KEY}` IS NULL")
    assert "gateway/ep-0" not in {e.name for e in listed}
    store.engine.dispose()


def test_mlflow_home_page_lists_recent_experiments_unfiltered() -> None:
    """The installed MLflow's UI bundle: the home page's recent-experiments query is max_results 5, newest
    first, and carries no filter (so no tag hides a gateway experiment there)."""
    import mlflow

    bundle = os.path.join(os.path.dirname(mlflow.__file__), "server", "js", "build", "static", "js", "*.js")
    queries = []
    for path in glob.glob(bundle):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if "recent-experiments" in text:
            queries += re.findall(r"\[\[\"max_results\",\"5\"\][^\]]*\]\]", text)
    assert queries, "the home page's query was not found in the bundle"
    for query in queries:
        assert '"max_results","5"' in query
        assert "last_update_time DESC" in query
        assert "filter" not in query
