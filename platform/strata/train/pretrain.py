"""Pretraining on Ray Train: prepare data, run the TorchTrainer, track in MLflow, register the model.

Re-running with the same `run_name` and storage path resumes from the latest checkpoint (Ray Train finds
it in storage) and continues the same MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console

from strata import registry, tracking
from strata.config import PretrainConfig, dump_config, flatten
from strata.data.prepare import prepare_data
from strata.runtime import init_ray
from strata.train.loop import EXPERT_LOAD, MODEL_DIR, train_loop_per_worker


@dataclass(frozen=True)
class PretrainResult:
    run_id: str
    checkpoint_path: str
    model_dir: str  # the final transformers directory (inside the last checkpoint)
    metrics: dict
    registered_version: str | None
    first_loss: float | None


def make_trainer(cfg, loop_config: dict, callbacks: list, train_fn=train_loop_per_worker, run_name: str | None = None):
    """A TorchTrainer for a pretraining or fine-tuning config (both have scaling and checkpoint sections)."""
    scaling = cfg.scaling
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(scaling.min_workers, scaling.num_workers) if scaling.min_workers else scaling.num_workers,
            elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s,
            use_gpu=scaling.use_gpu,
            resources_per_worker={
                "CPU": scaling.cpus_per_worker,
                **({"GPU": 1} if scaling.use_gpu else {}),
                **scaling.resources_per_worker,
            },
        ),
        run_config=ray.train.RunConfig(
            name=run_name or cfg.run_name,
            storage_path=cfg.checkpoint.resolved_storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=3),
            callbacks=callbacks,
        ),
    )


def run_pretraining(cfg: PretrainConfig, console: Console | None = None) -> PretrainResult:
    console = console or Console(stderr=True)
    data = prepare_data(cfg.data, console)
    init_ray()  # joins the cluster (or starts a local one) only once the inputs are known to be good
    uri = tracking.use_store(cfg.tracking.tracking_uri)
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "paths": {"tokenizer_dir": data.tokenizer_dir, "packed_dir": data.packed_dir},
    }
    with tracking.start_run(
        cfg.tracking.experiment, cfg.run_name, flatten(cfg), tags={"strata.job": "pretrain"}
    ) as run:
        run_id = run.info.run_id
        mlflow.log_text(dump_config(cfg), "config.yaml")
        console.print(f"MLflow run {run_id} in {uri}")
        trainer = make_trainer(cfg, loop_config, [tracking.MlflowMetricsCallback(uri, run_id)])
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"run {cfg.run_name} finished without a checkpoint")
        checkpoint_dir = Path(result.checkpoint.to_directory())
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
            tags={"strata.run_name": cfg.run_name, "strata.preset": cfg.model.name},
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
