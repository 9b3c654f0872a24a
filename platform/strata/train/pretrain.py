"""Pretraining on Ray Train: prepare data, run the TorchTrainer, track in MLflow, register the model.

Re-running with the same `run_name` and storage path resumes from the latest checkpoint (Ray Train finds
it in storage) and continues the same MLflow run; re-running a finished one returns its result without training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from rich.console import Console

from strata import registry, tracking
from strata.config import PRESETS, PretrainConfig, dump_config
from strata.data.prepare import PreparedData, prepare_data
from strata.data.tokenizer import load_tokenizer
from strata.models.presets import check_tokenizer_fits
from strata.runtime import init_ray
from strata.train.callbacks import MlflowMetricsCallback
from strata.train.pretrain_loop import EXPERT_LOAD, MODEL_DIR, train_loop_per_worker
from strata.train.trainer import fit_unless_finished, make_trainer


@dataclass(frozen=True)
class PretrainResult:
    run_id: str
    checkpoint_path: str
    model_dir: str  # the final transformers directory inside the last checkpoint (local storage; else registry)
    metrics: dict
    registered_version: str | None
    first_loss: float | None


def run_pretraining(cfg: PretrainConfig, console: Console | None = None) -> PretrainResult:
    console = console or Console(stderr=True)
    loop_config, data = pretrain_loop_config(cfg, console)
    init_ray()  # joins the cluster (or starts a local one) only once the inputs are known to be good
    uri = tracking.use_store(cfg.tracking.tracking_uri)
    lineage = lineage_tags(cfg, data)
    with tracking.start_run(
        cfg.tracking.experiment,
        cfg.run_name,
        tracking.flatten(cfg),
        tags={"strata.job": "pretrain", **lineage},
        kind=tracking.PRETRAINING,
        artifact_location=cfg.tracking.artifact_location,
    ) as run:
        run_id = run.info.run_id
        mlflow.set_tags(lineage)  # also on a run started before pretraining recorded its lineage
        mlflow.log_text(dump_config(cfg), "config.yaml")
        tracking.log_packed_data(cfg.data.name, data)
        console.print(f"MLflow run {run_id} in {uri}")
        trainer = make_trainer(
            cfg, train_loop_per_worker, loop_config, [MlflowMetricsCallback(uri, run_id)], cfg.run_name
        )
        result = fit_unless_finished(trainer, cfg, cfg.run_name)
        if result.checkpoint is None:
            raise RuntimeError(f"run {cfg.run_name} finished without a checkpoint")
        # The checkpoint in place when storage is local (as_directory copies only a remote one, and removes the copy).
        with result.checkpoint.as_directory() as checkpoint_path:
            checkpoint_dir = Path(checkpoint_path)
            model_dir = checkpoint_dir / MODEL_DIR
            if (checkpoint_dir / EXPERT_LOAD).exists():
                mlflow.log_artifact(str(checkpoint_dir / EXPERT_LOAD))
            if not registry.already_registered(run, result.checkpoint.path):
                mlflow.log_artifacts(data.tokenizer_dir, "tokenizer")
            version = registry.register_once(
                run,
                result.checkpoint.path,
                model_dir,
                cfg.tracking.registered_model,
                tags={"strata.run_name": cfg.run_name, "strata.preset": cfg.model.name, **lineage},
            )
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    first_loss = min(history, key=lambda m: m.step).value if history else None
    return PretrainResult(
        run_id=run_id,
        checkpoint_path=result.checkpoint.path,
        model_dir=str(model_dir),
        metrics=result.metrics,
        registered_version=version,
        first_loss=first_loss,
    )


def lineage_tags(cfg: PretrainConfig, data: PreparedData) -> dict[str, str]:
    """Where a pretrained model comes from, in the tags a fine-tune records (promotion gates check them): the model
    it continued (`scratch:PRESET` when trained from scratch) and the packed data's digest."""
    base = f"scratch:{cfg.model.name}" if cfg.model.name in PRESETS else cfg.model.name
    return {"base_model": base, "strata.dataset_hash": tracking.packed_digest(data)}


def pretrain_loop_config(cfg: PretrainConfig, console: Console | None = None) -> tuple[dict, PreparedData]:
    """What every pretraining worker is given: the config and where the tokenizer and packed data are. A
    pretrained `model.name` that does not fit the tokenizer fails here, before any Ray work."""
    data = prepare_data(cfg.data, console)
    check_tokenizer_fits(cfg.model, cfg.data, load_tokenizer(data.tokenizer_dir))
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "paths": {"tokenizer_dir": data.worker_tokenizer_dir, "packed_dir": data.worker_packed_dir},
    }
    return loop_config, data
