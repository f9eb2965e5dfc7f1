"""Write an MLflow database the way one MLflow release does, and print JSON of what was written.

Run by that release's own interpreter (see tests/mlflow_versions.py), never imported by the tests:

    <venv>/bin/python tests/mlflow_writer.py DATABASE_URL LABEL

It only uses MLflow's own stores (the server's write path), so the rows are exactly what that release
writes: MLflow's schema at that release's head, experiments (active and deleted) with tags, runs with
params, metrics, tags and dataset inputs (a deleted run too), a registered model with a version, and, on
releases that have the AI Gateway (3.10.0+), gateway endpoints with usage tracking, whose experiments
3.10.0 tags ``sourceType=GATEWAY`` only and 3.10.1+ also ``isGateway=true``. It also writes near misses a
user can set through the API (``sourceType`` ``gateway``, ``GATEWAY `` ...) and a ``gateway/<name>``
experiment that MLflow reuses for an endpoint without tagging it.

LABEL makes names unique, so several releases can write into the same database one after the other
(e.g. 3.10.0 then 3.10.1, as a user who upgraded has it). Output, one JSON object on stdout: the
release, and experiment ids by kind (see ``report`` below).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings

SOURCE_TYPE = "mlflow.experiment.sourceType"
NEAR_MISSES = ("gateway", "GATEWAY ", " GATEWAY", "Gateway")


def main() -> None:
    url, label = sys.argv[1], sys.argv[2]
    # The gateway store encrypts secrets; without a passphrase it warns and uses a default one.
    os.environ.setdefault("MLFLOW_CRYPTO_KEK_PASSPHRASE", "test-only-passphrase")
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)

    import mlflow
    from mlflow.entities import (
        Dataset,
        DatasetInput,
        ExperimentTag,
        InputTag,
        Metric,
        Param,
        RunStatus,
        RunTag,
    )
    from mlflow.entities.model_registry import ModelVersionTag, RegisteredModelTag
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    artifacts = tempfile.mkdtemp(prefix="mgb-writer-")
    store = SqlAlchemyStore(url, artifacts)
    report: dict[str, object] = {
        "mlflow": mlflow.__version__,
        "label": label,
        "gateway": [],  # experiments MLflow made for endpoints with usage tracking (sourceType=GATEWAY)
        "gateway_deleted": [],  # of those, the ones deleted afterwards
        "ordinary": [],
        "ordinary_deleted": [],
        "near_miss": [],  # sourceType set by a user to a value that is not exactly GATEWAY
        "reused_by_gateway": [],  # a user's gateway/<name> experiment MLflow reused for an endpoint: no tags
    }
    now = int(time.time() * 1000)

    run_ids = []
    for i in range(3):
        tags = [ExperimentTag("team", "forecasting"), ExperimentTag("mlflow.note.content", f"notes {i}")]
        eid = store.create_experiment(f"{label}/ordinary-{i}", tags=tags)
        report["ordinary"].append(int(eid))
        for r in range(2):
            run = store.create_run(eid, "writer", now, [RunTag("mlflow.user", "writer")], f"run-{i}-{r}")
            run_id = run.info.run_id
            store.log_batch(
                run_id,
                metrics=[Metric("loss", 1.0 / (step + 1), now + step, step) for step in range(3)],
                params=[Param("lr", "0.01"), Param("layers", str(r + 2))],
                tags=[RunTag("stage", "dev")],
            )
            dataset = Dataset(name=f"data-{i}", digest=f"d{i}", source_type="local", source=f"/data/{i}")
            store.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
            store.update_run_info(run_id, RunStatus.FINISHED, now + 10, f"run-{i}-{r}")
            run_ids.append(run_id)
    store.delete_run(run_ids[-1])
    for i in range(20):  # enough experiments that the UI's list (25 a page) has a second page
        report["ordinary"].append(int(store.create_experiment(f"{label}/plain-{i}")))
    gone = store.create_experiment(f"{label}/ordinary-deleted", tags=[ExperimentTag("team", "old")])
    store.delete_experiment(gone)
    report["ordinary_deleted"].append(int(gone))
    for i, value in enumerate(NEAR_MISSES):
        eid = store.create_experiment(f"{label}/near-miss-{i}")
        store.set_experiment_tag(eid, ExperimentTag(SOURCE_TYPE, value))
        report["near_miss"].append(int(eid))

    registry = RegistryStore(url)
    model = f"{label}-model"
    registry.create_registered_model(model, tags=[RegisteredModelTag("owner", "writer")], description="a model")
    registry.create_model_version(
        model, f"{artifacts}/model", run_id=run_ids[0], tags=[ModelVersionTag("validated", "yes")]
    )
    registry.engine.dispose()

    if hasattr(store, "create_gateway_endpoint"):  # the AI Gateway exists from MLflow 3.10.0
        write_gateway(store, label, report)
    store.engine.dispose()
    json.dump(report, sys.stdout)


def write_gateway(store, label: str, report: dict) -> None:  # type: ignore[no-untyped-def]
    """Gateway endpoints as a user makes them: with usage tracking, enabled later, reused, deleted, off."""
    from mlflow.entities.gateway_endpoint import GatewayEndpointModelConfig, GatewayModelLinkageType

    secret = store.create_gateway_secret(
        secret_name=f"{label}-key", secret_value={"api_key": "not-a-key"}, provider="openai"
    )

    def models(name: str) -> list:
        md = store.create_gateway_model_definition(
            name=f"{name}-model", secret_id=secret.secret_id, provider="openai", model_name="gpt-4o-mini"
        )
        return [
            GatewayEndpointModelConfig(
                model_definition_id=md.model_definition_id, linkage_type=GatewayModelLinkageType.PRIMARY
            )
        ]

    made = []
    for i in range(3):
        name = f"{label}-chat-{i}"
        made.append(store.create_gateway_endpoint(name=name, model_configs=models(name), usage_tracking=True))
    later = f"{label}-tracked-later"  # usage tracking switched on by an update: MLflow's second code path
    endpoint = store.create_gateway_endpoint(name=later, model_configs=models(later), usage_tracking=False)
    made.append(store.update_gateway_endpoint(endpoint.endpoint_id, usage_tracking=True))
    report["gateway"] = [int(e.experiment_id) for e in made]
    store.delete_experiment(made[1].experiment_id)
    report["gateway_deleted"] = [int(made[1].experiment_id)]

    untracked = f"{label}-untracked"  # no usage tracking: no experiment
    store.create_gateway_endpoint(name=untracked, model_configs=models(untracked), usage_tracking=False)

    reused = f"{label}-reused"
    eid = store.create_experiment(f"gateway/{reused}")
    endpoint = store.create_gateway_endpoint(name=reused, model_configs=models(reused), usage_tracking=True)
    assert int(endpoint.experiment_id) == int(eid), "MLflow no longer reuses an existing gateway/<name> experiment"
    report["reused_by_gateway"] = [int(eid)]


if __name__ == "__main__":
    main()
