"""One trial of a sweep: the job's own Ray Train run (same loop, checkpoints, resume and recovery as
`strata finetune` / `strata pretrain`) with sampled params, reporting to Tune and to its own nested MLflow run.

Tune runs `run_trial` as a function trainable; inside it a `TorchTrainer` runs the workers, and Train's
`TuneReportCallback` forwards every report (with its checkpoint path) to Tune, whose scheduler may stop the trial.
A restored sweep re-runs unfinished trials with their old trial ids, so their Train runs resume from checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from strata import tracking
from strata.config.tune import TuneConfig, trial_tree
from strata.train.callbacks import MlflowMetricsCallback
from strata.train.trainer import make_trainer

TRIAL_TAG = "strata.trial_id"
SWEEP_TAG = "strata.sweep"


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled params (sent once to the trial actors)."""

    tune: TuneConfig
    base_tree: dict[str, Any]
    tracking_uri: str
    parent_run_id: str


class MetricReportCallback(TuneReportCallback):
    """Forwards to Tune only the checkpointed reports that carry the sweep's metric, every `report_every_steps`:
    the scheduler's decision points. Tune rejects a report without the metric, and a trial stopped at a report
    without a checkpoint (pretraining logs `loss` between checkpoints) would leave nothing to register."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is not None and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def run_trial(params: dict[str, Any], context: SweepContext) -> None:
    tune = context.tune
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = trial_run_name(tune.name, trial_id)
    tree = trial_tree(tune, context.base_tree, params, run_name)
    cfg = tune.schema.model_validate(tree)
    tracking.use_store(context.tracking_uri)
    tags = {"mlflow.parentRunId": context.parent_run_id, SWEEP_TAG: tune.name, TRIAL_TAG: trial_id}
    kind = tracking.FINETUNING if tune.job == "finetune" else tracking.PRETRAINING
    with tracking.start_run(tune.experiment, run_name, tracking.flatten(cfg), tags=tags, kind=kind) as run:
        train_fn, loop_config, lineage = worker_inputs(tune.job, cfg, context.tracking_uri)
        mlflow.set_tags(lineage)  # what promotion's lineage gate reads from the registered best trial's run
        callbacks = [MetricReportCallback(tune.metric), MlflowMetricsCallback(context.tracking_uri, run.info.run_id)]
        make_trainer(cfg, train_fn, loop_config, callbacks, run_name).fit()


def worker_inputs(job: str, cfg, tracking_uri: str) -> tuple[Callable, dict, dict[str, str]]:
    """The worker loop, its `train_loop_config` and the run's lineage tags, exactly as the job's own driver builds
    them; the data is logged to the active MLflow run as the driver does."""
    if job == "finetune":
        from strata.train.finetune import finetune_inputs
        from strata.train.sft_loop import finetune_loop_per_worker

        inputs = finetune_inputs(cfg, tracking_uri)
        tracking.log_sft_data(inputs.dataset)
        lineage = {"strata.method": cfg.method, "strata.dataset_hash": inputs.dataset.dataset_hash, **inputs.base.tags}
        return finetune_loop_per_worker, inputs.loop_config, lineage
    from strata.train.pretrain import lineage_tags, pretrain_loop_config
    from strata.train.pretrain_loop import train_loop_per_worker

    loop_config, data = pretrain_loop_config(cfg)
    tracking.log_packed_data(cfg.data.name, data)
    return train_loop_per_worker, loop_config, lineage_tags(cfg, data)
