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
    """Logs rank 0's reported metrics to MLflow and measures every recovery; runs in the Ray Train controller,
    so workers need no MLflow.

    A resumed worker group first reports `resumed_from_step`. Steps lost are the furthest step this MLflow run
    ever logged minus that step (a lower bound, exact to `log_every_steps`), so a whole-job restart (driver or
    head died) is measured like a worker failure. Recoveries also go to Prometheus through Ray's metrics
    (`ray_strata_train_*`).
    """

    def __init__(self, tracking_uri: str, run_id: str, step_key: str = "step"):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.step_key = step_key
        self.failed_at: float | None = None
        self.failures = 0

    def _client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self.failures += 1
        self.failed_at = time.time()
        self._client().log_metric(self.run_id, "recovery_worker_failures", self.failures)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = metrics[0]
        step = int(reported.get(self.step_key, 0))
        now = time.time()
        batch = [
            Metric(key, float(value), int(now * 1000), step)
            for key, value in reported.items()
            if key != self.step_key and isinstance(value, (int, float))
        ]
        if "resumed_from_step" in reported:
            batch += self._recovery_metrics(int(reported["resumed_from_step"]), now, step)
        else:
            batch.append(Metric("progress_step", step, int(now * 1000), step))
        self._client().log_batch(self.run_id, metrics=batch)

    def _recovery_metrics(self, resumed_from: int, now: float, step: int) -> list[Metric]:
        history = self._client().get_metric_history(self.run_id, "progress_step")
        reached = max((m.step for m in history), default=resumed_from)
        last_progress_s = max((m.timestamp for m in history), default=int(now * 1000)) / 1000
        steps_lost = max(0, reached - resumed_from)
        seconds = now - (self.failed_at or last_progress_s)
        self.failed_at = None
        restarts = len(self._client().get_metric_history(self.run_id, "recovery_steps_lost")) + 1
        record_recovery(steps_lost, seconds)
        stamp = int(now * 1000)
        return [
            Metric("recovery_steps_lost", steps_lost, stamp, step),
            Metric("recovery_seconds_to_resume", seconds, stamp, step),
            Metric("recovery_restarts", restarts, stamp, step),
        ]


def record_recovery(steps_lost: int, seconds: float) -> None:
    """Export a recovery to Prometheus (Ray's metrics agent) for the dashboards and alerts."""
    from ray.util.metrics import Counter, Gauge

    Counter("strata_train_restarts", description="Training restarts from a checkpoint").inc()
    if steps_lost:  # a Counter rejects inc(0)
        Counter("strata_train_steps_lost", description="Optimizer steps recomputed after restarts").inc(steps_lost)
    Gauge("strata_train_resume_seconds", description="Seconds from failure to resumed training").set(seconds)
