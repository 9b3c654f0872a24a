"""MLflow tracking: where the store is, one MLflow run per Strata run name, and metrics from Ray Train.

The default store is a sqlite file under $STRATA_HOME/mlruns; MLFLOW_TRACKING_URI (or the config's
`tracking.tracking_uri`) points Strata at a tracking server instead. Re-running a job with the same run
name continues the same MLflow run, just as Ray Train continues from the same checkpoints.

What the MLflow UI needs to show a training run as one: the experiment's kind, the data as dataset inputs
(the runs table's Dataset column) and system metrics (CPU/GPU utilisation and memory, sampled by MLflow).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Experiment, Param
from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from pydantic import BaseModel

from strata.paths import home, join

if TYPE_CHECKING:  # the data modules load torch and transformers, which the serving router does without
    from strata.data.prepare import PreparedData
    from strata.data.sft import SFTDataset

RUN_NAME_TAG = "strata.run_name"
# MLflow's record of what an experiment is for: model training here, not GenAI apps. The 3.17 UI picks its view
# from its own GenAI | Model training switch instead, so `strata ui` also prints links to the training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
PRETRAINING = "custom_model_development"
FINETUNING = "finetuning"
# MLflow samples every 10 s by default, which leaves a short run with one point or none;
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL still overrides it.
SYSTEM_METRICS_INTERVAL_S = 2.0
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


def ensure_experiment(name: str, kind: str | None = None, artifact_location: str | None = None) -> str:
    """The experiment's id; a new one keeps its artifacts under `artifact_location/<name>` when given (s3://...),
    else beside a local sqlite store, not in the cwd (a tracking server decides for itself).

    `kind` (PRETRAINING, FINETUNING) tags the experiment for the UI, also one made before Strata tagged them;
    a kind already set is left alone."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    kind_tag = {EXPERIMENT_KIND_TAG: kind} if kind else {}
    if experiment:
        if kind and EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, kind)
        return experiment.experiment_id
    uri = mlflow.get_tracking_uri()
    artifacts = None
    if artifact_location:
        artifacts = join(artifact_location, name)
    elif uri.startswith("sqlite:///"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts, tags=kind_tag)


def training_experiments() -> list[Experiment]:
    """The experiments tagged as model training (Strata's own), for links into the UI."""
    kinds = (PRETRAINING, FINETUNING)
    return [e for e in MlflowClient().search_experiments() if e.tags.get(EXPERIMENT_KIND_TAG) in kinds]


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


def start_run(
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
    kind: str | None = None,
    artifact_location: str | None = None,
):
    """Start, or continue, the MLflow run that belongs to `run_name`; returns an active-run context manager.
    Params are logged on every start (see `log_params`); MLflow samples the machine's system metrics for as long
    as the run is open."""
    experiment_id = ensure_experiment(experiment, kind, artifact_location)
    if MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() is None:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    existing = find_run(experiment_id, run_name)
    if existing:
        run = mlflow.start_run(run_id=existing, log_system_metrics=True)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            tags={RUN_NAME_TAG: run_name, **(tags or {})},
            log_system_metrics=True,
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


def log_dataset(source: str, name: str, digest: str, schema: Schema, context: str) -> None:
    """Record data the active run used as an MLflow dataset input: metadata only, the data stays where it is."""
    with warnings.catch_warnings():  # mlflow registers its local-file source twice, then warns it found two
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        dataset_source = resolve_dataset_source(source)
    dataset = MetaDataset(dataset_source, name=name, digest=digest, schema=schema)
    mlflow.log_input(dataset, context=context)


def packed_digest(data: PreparedData) -> str:
    """The packed data's identity: a hash of its manifest (corpus, tokenizer, sequence length)."""
    return hashlib.sha256(json.dumps(asdict(data.packed), sort_keys=True).encode()).hexdigest()[:16]


def log_packed_data(name: str, data: PreparedData) -> None:
    """Pretraining data: the packed token sequences, identified by their manifest (corpus, tokenizer, length)."""
    schema = Schema([ColSpec(Array(DataType.integer), "input_ids")])  # data.seq_len tokens a row
    log_dataset(data.worker_packed_dir, name, packed_digest(data), schema, context="training")  # where workers read


def log_sft_data(dataset: SFTDataset) -> None:
    """Fine-tuning data: the SFT file's train and eval splits, both with the file's hash as digest (the split
    itself follows from `data.eval_fraction`). The schema is the fields of the first records read."""
    schema = infer_signature(dataset.schema_sample).inputs
    name = Path(dataset.source).stem
    log_dataset(dataset.source, f"{name}-train", dataset.dataset_hash, schema, context="training")
    log_dataset(dataset.source, f"{name}-eval", dataset.dataset_hash, schema, context="eval")
