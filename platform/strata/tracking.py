"""MLflow tracking: where the store is, one MLflow run per Strata run name, and metrics from Ray Train.

The default store is a sqlite file under $STRATA_HOME/mlruns; MLFLOW_TRACKING_URI (or the config's
`tracking.tracking_uri`) points Strata at a tracking server instead. Re-running a job with the same run
name continues the same MLflow run, just as Ray Train continues from the same checkpoints.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from pydantic import BaseModel

from strata.paths import home

RUN_NAME_TAG = "strata.run_name"
PARAM_TAG = "strata.param."  # + a param's name: its value now, where it differs from the logged param
CONFIG_CHANGES = "config_changes.json"  # one row per changed param per continued start


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


def flatten(config: BaseModel) -> dict[str, Any]:
    """A config as dotted key -> value, for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", config.model_dump(mode="json"))
    return flat


def start_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None):
    """Start, or continue, the MLflow run that belongs to `run_name`; returns an active-run context manager.
    Params are logged on every start (see `log_params`)."""
    experiment_id = ensure_experiment(experiment)
    existing = find_run(experiment_id, run_name)
    if existing:
        run = mlflow.start_run(run_id=existing)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})}
        )
    log_params(run.info.run_id, params)
    return run


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log `params`, on a continued run too. MLflow never changes a param once logged, so a value that differs
    from the logged one (a resume with a higher `optim.max_steps`) goes to the tag `strata.param.<name>`, which
    holds the value in effect, and to a row of the run's `CONFIG_CHANGES` table."""
    client = MlflowClient()
    logged = client.get_run(run_id).data.params
    current = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}
    new = [Param(key, value) for key, value in current.items() if key not in logged]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])
    changed = {key: value for key, value in current.items() if key in logged and logged[key] != value}
    tags = client.get_run(run_id).data.tags
    for key in logged:
        if key in changed:
            client.set_tag(run_id, PARAM_TAG + key, changed[key])
        elif PARAM_TAG + key in tags:  # back to the logged value
            client.delete_tag(run_id, PARAM_TAG + key)
    if changed:
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = {
            "started": [started] * len(changed),
            "param": list(changed),
            "logged_value": [logged[key] for key in changed],
            "value": list(changed.values()),
        }
        client.log_table(run_id, rows, CONFIG_CHANGES)
