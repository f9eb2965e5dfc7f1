"""Backfill ``mlflow.experiment.isGateway = true`` on MLflow 3.10.0 gateway experiments.

Library use::

    from backfill.db import create_engine, parse_url
    from backfill.job import Backfill

    job = Backfill(create_engine(parse_url("sqlite:///mlflow.db")))
    job.run()          # insert what is missing (idempotent, resumable)
    job.status()       # counts
    job.revert()       # remove exactly what this project inserted
"""

__version__ = "0.1.0"
