"""`make demo`: real MLflow writes an MLflow 3.10.0-style database, then shows what the UI would list.

python -m tests.demo mlflow.db               # create it (if absent) with gateway and ordinary experiments
python -m tests.demo mlflow.db --show-list   # the experiments MLflow 3.10.1+'s UI lists
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mlflow.entities import ViewType

from tests.mlflow_data import mlflow_store, populate

UI_FILTER = "tags.`mlflow.experiment.isGateway` IS NULL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--show-list", action="store_true")
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    url = f"sqlite:///{args.path}"
    if args.show_list:
        store = mlflow_store(url)
        names = [e.name for e in store.search_experiments(view_type=ViewType.ACTIVE_ONLY, filter_string=UI_FILTER)]
        print(f"MLflow's experiment list now shows: {', '.join(sorted(names))}")
        return
    if args.path.exists():
        print(f"{args.path} exists: using it as it is (remove it to start the demo afresh)")
        return
    data = populate(url, gateway=3, ordinary=2, deleted_gateway=1, with_runs=True)
    print(
        f"{args.path}: real MLflow made {len(data.gateway)} gateway experiments, 1 deleted one and "
        f"{len(data.ordinary)} ordinary ones, then lost isGateway as MLflow 3.10.0 wrote them"
    )
    store = mlflow_store(url)
    names = [e.name for e in store.search_experiments(view_type=ViewType.ACTIVE_ONLY, filter_string=UI_FILTER)]
    print(f"MLflow's experiment list shows: {', '.join(sorted(names))}  <- the gateway ones should not be there")


if __name__ == "__main__":
    main()
