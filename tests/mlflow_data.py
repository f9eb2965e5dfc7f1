"""Real MLflow data: gateway experiments made through MLflow's own gateway store API.

MLflow 3.10.1 (the test dependency) already writes isGateway on new gateway experiments; the helpers
delete those rows afterwards to reproduce what MLflow 3.10.0 wrote (same schema, head 1b5f0d9ad7c1).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field

import sqlalchemy as sa

from backfill.sql import IS_GATEWAY_KEY

os.environ.setdefault("MLFLOW_CRYPTO_KEK_PASSPHRASE", "test-only-passphrase")
# MLflow 3.x sends usage telemetry off this machine unless told not to (or it detects CI or pytest);
# `make demo` runs it outside both.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@dataclass
class MlflowData:
    """What a fixture created: the ids of gateway and ordinary experiments."""

    gateway: list[int] = field(default_factory=list)
    ordinary: list[int] = field(default_factory=list)
    deleted_gateway: list[int] = field(default_factory=list)


def mlflow_store(url: str):  # type: ignore[no-untyped-def]
    """MLflow's SqlAlchemyStore on ``url`` (creates or upgrades MLflow's schema, as the server does)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SqlAlchemyStore(url, tempfile.mkdtemp(prefix="mlartifacts-"))


def create_gateway_experiments(store, count: int, prefix: str = "ep") -> list[int]:  # type: ignore[no-untyped-def]
    """``count`` gateway endpoints with usage tracking; returns their experiment ids."""
    from mlflow.entities.gateway_endpoint import GatewayEndpointModelConfig, GatewayModelLinkageType

    secret = store.create_gateway_secret(
        secret_name=f"{prefix}-secret", secret_value={"api_key": "x"}, provider="openai"
    )
    ids = []
    for i in range(count):
        md = store.create_gateway_model_definition(
            name=f"{prefix}-model-{i}", secret_id=secret.secret_id, provider="openai", model_name="gpt-4o-mini"
        )
        cfg = [
            GatewayEndpointModelConfig(
                model_definition_id=md.model_definition_id, linkage_type=GatewayModelLinkageType.PRIMARY
            )
        ]
        ep = store.create_gateway_endpoint(name=f"{prefix}-{i}", model_configs=cfg, usage_tracking=True)
        ids.append(int(ep.experiment_id))
    return ids


def strip_is_gateway(url: str, experiment_ids: list[int]) -> None:
    """Delete the isGateway rows MLflow 3.10.1 wrote, leaving the data exactly as 3.10.0 wrote it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "DELETE FROM experiment_tags WHERE experiment_id = :e AND "
                + ("`key`" if engine.dialect.name == "mysql" else "key")
                + " = :k"
            ),
            [{"e": e, "k": IS_GATEWAY_KEY} for e in experiment_ids],
        )
    engine.dispose()


def populate(
    url: str, gateway: int = 3, ordinary: int = 2, deleted_gateway: int = 1, with_runs: bool = False
) -> MlflowData:
    """An MLflow database as 3.10.0 leaves it: gateway experiments without isGateway, ordinary ones."""
    store = mlflow_store(url)
    data = MlflowData()
    all_gateway = create_gateway_experiments(store, gateway + deleted_gateway)
    data.gateway = all_gateway[:gateway]
    data.deleted_gateway = all_gateway[gateway:]
    for e in data.deleted_gateway:
        store.delete_experiment(str(e))
    for i in range(ordinary):
        eid = int(store.create_experiment(f"ordinary-{i}", tags=[]))
        data.ordinary.append(eid)
        if with_runs:
            from mlflow.entities import Metric, Param

            run = store.create_run(str(eid), "user", 0, [], f"run-{i}")
            store.log_batch(run.info.run_id, metrics=[Metric("m", 1.5, 0, 0)], params=[Param("p", "v")], tags=[])
    strip_is_gateway(url, all_gateway)
    store.engine.dispose()
    return data
