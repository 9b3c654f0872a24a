"""MLflow tracking: where the store is, one MLflow run per Strata run name, and metrics from Ray Train.

The default store is a sqlite file under $STRATA_HOME/mlruns; MLFLOW_TRACKING_URI (or the config's
`tracking.tracking_uri`) points Strata at a tracking server instead. Re-running a job with the same run
name continues the same MLflow run, just as Ray Train continues from the same checkpoints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from strata.paths import home

RUN_NAME_TAG = "strata.run_name"


def default_tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlruns' / 'mlflow.db'}"


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def use_store(configured: str | None = None) -> str:
    """Point this process's MLflow client at the store and return its URI."""
    uri = tracking_uri(configured)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id; a new one keeps its artifacts beside a local sqlite store, not in the cwd."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    uri = mlflow.get_tracking_uri()
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def find_run(experiment_id: str, run_name: str) -> str | None:
    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def start_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None):
    """Start, or continue, the MLflow run that belongs to `run_name`; returns an active-run context manager."""
    experiment_id = ensure_experiment(experiment)
    existing = find_run(experiment_id, run_name)
    if existing:
        return mlflow.start_run(run_id=existing)
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})}
    )
    client = MlflowClient()
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run


class MlflowMetricsCallback(UserCallback):
    """Logs rank 0's reported metrics to MLflow; runs in the Ray Train controller, so workers need no MLflow."""

    def __init__(self, tracking_uri: str, run_id: str, step_key: str = "step"):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.step_key = step_key

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = metrics[0]
        step = int(reported.get(self.step_key, 0))
        timestamp = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), timestamp, step)
            for key, value in reported.items()
            if key != self.step_key and isinstance(value, (int, float))
        ]
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=batch)
