"""A sweep: Ray Tune over a job config's fields, one MLflow parent run with a nested run per trial, and the best
trial's model registered (not promoted: that is the release workflow's job).

Running the same sweep name again restores it (`Tuner.restore`): finished trials are kept, unfinished ones resume
from their checkpoints, and the same MLflow parent run continues.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import ray.train
import ray.tune
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from rich.console import Console

from strata import registry, tracking
from strata.config import ConfigError
from strata.config.tune import Distribution, TuneConfig, trial_tree
from strata.paths import resolve
from strata.runtime import init_ray
from strata.tune.progress import SweepProgress
from strata.tune.trial import SWEEP_TAG, TRIAL_TAG, SweepContext, run_trial, trial_run_name

REGISTERED_TAG = "strata.registered_version"
LINEAGE_TAGS = ("base_model", "base_model_version", "strata.dataset_hash", "strata.method")  # from the trial's run


@dataclass(frozen=True)
class SweepResult:
    parent_run_id: str
    trials: list[dict[str, Any]]  # one row per trial: trial, params, state, step, metric
    best: dict[str, Any] | None
    trial_steps: int  # the compute used: optimizer steps summed over all trials
    registered_version: str | None


def tune_domain(distribution: Distribution):
    low_high = getattr(distribution, distribution.kind)
    match distribution.kind:
        case "uniform":
            return ray.tune.uniform(*low_high)
        case "loguniform":
            return ray.tune.loguniform(*low_high)
        case "randint":
            return ray.tune.randint(low_high[0], low_high[1] + 1)  # Tune's upper end is exclusive; ours is not
        case "choice":
            return ray.tune.choice(distribution.choice)
        case _:
            return ray.tune.grid_search(distribution.grid)


def make_scheduler(tune: TuneConfig):
    if tune.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        metric=tune.metric,
        mode=tune.mode,
        max_t=tune.max_steps,
        grace_period=tune.scheduler.grace_period_steps,
        reduction_factor=tune.scheduler.reduction_factor,
    )


def make_search(tune: TuneConfig):
    if tune.search != "optuna":
        # Random draws and every grid point; Tune leaves its max_concurrent_trials to this generator.
        return BasicVariantGenerator(random_state=tune.seed, max_concurrent=tune.max_concurrent_trials)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=tune.metric, mode=tune.mode, seed=tune.seed)


def make_tuner(tune: TuneConfig, context: SweepContext) -> ray.tune.Tuner:
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, context=context), {"CPU": tune.trial_driver_cpus}
    )
    path = f"{resolve(tune.storage_path)}/{tune.name}-tuner"
    if ray.tune.Tuner.can_restore(path):
        return ray.tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    return ray.tune.Tuner(
        trainable,
        param_space={name: tune_domain(d) for name, d in tune.search_space.items()},
        tune_config=ray.tune.TuneConfig(
            search_alg=make_search(tune),
            scheduler=make_scheduler(tune),
            num_samples=tune.num_samples,
            max_concurrent_trials=tune.max_concurrent_trials,
        ),
        run_config=ray.tune.RunConfig(
            name=f"{tune.name}-tuner",
            storage_path=resolve(tune.storage_path),
            verbose=0,
            callbacks=[SweepProgress(tune.name, list(tune.search_space), tune.metric)],
            failure_config=ray.tune.FailureConfig(max_failures=1),
        ),
    )


def stop_reason(result, max_steps: int) -> str:
    if result.error is not None:
        return f"error: {type(result.error).__name__}"
    step = int(result.metrics.get("step", 0))
    return "completed" if step >= max_steps else f"stopped early at step {step}"


def run_sweep(tune: TuneConfig, base_tree: dict[str, Any], console: Console | None = None) -> SweepResult:
    console = console or Console(stderr=True)
    uri = tracking.use_store(base_tree.get("tracking", {}).get("tracking_uri"))
    init_ray()
    params = {
        "job": tune.job,
        "metric": tune.metric,
        "mode": tune.mode,
        "search": tune.search,
        "scheduler": tune.scheduler.type,
        "num_samples": tune.num_samples,
        "max_steps": tune.max_steps,
        "search_space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in tune.search_space.items()}),
    }
    kind = tracking.FINETUNING if tune.job == "finetune" else tracking.PRETRAINING
    # The parent run makes the experiment, so the base config's `tracking.artifact_location` applies to every trial.
    artifacts = base_tree.get("tracking", {}).get("artifact_location")
    with tracking.start_run(
        tune.experiment, tune.name, params, tags={"strata.job": "tune"}, kind=kind, artifact_location=artifacts
    ) as parent:
        console.print(f"sweep {tune.name}: MLflow parent run {parent.info.run_id} in {uri}")
        if tune.job == "finetune":
            base_tree = {**base_tree, "base_model": pinned_base(base_tree["base_model"], parent.info.run_id)}
        context = SweepContext(tune, base_tree, uri, parent.info.run_id)
        grid = make_tuner(tune, context).fit()
        rows = []
        for result in grid:
            rows.append(
                {
                    "trial": result.metrics.get("trial_id") or Path(result.path).name,
                    "params": dict(result.config),
                    "state": stop_reason(result, tune.max_steps),
                    "step": int(result.metrics.get("step", 0)),
                    tune.metric: result.metrics.get(tune.metric),
                    "checkpoint": result.metrics.get("checkpoint_path"),
                }
            )
        scored = [r for r in rows if r[tune.metric] is not None and r["checkpoint"]]
        best = (min if tune.mode == "min" else max)(scored, key=lambda r: r[tune.metric]) if scored else None
        trial_steps = sum(r["step"] for r in rows)
        _record_sweep(tune, base_tree, rows, best, trial_steps)
        version = _register_best(tune, base_tree, best, parent) if best and tune.registered_model else None
    return SweepResult(parent.info.run_id, rows, best, trial_steps, version)


def pinned_base(spec: str, parent_run_id: str) -> str:
    """One base version for every trial, and for a restored sweep's too, however its alias moves meanwhile: the
    version the parent run recorded when the sweep began (`registry.recorded_base`)."""
    client = MlflowClient()
    try:
        base = registry.resolve_model(registry.recorded_base(spec, client.get_run(parent_run_id).data.tags))
    except registry.ModelNotFound as err:
        raise ConfigError(f"base_model: {err}") from None
    for key, value in base.tags.items():
        client.set_tag(parent_run_id, key, value)
    return base.pinned


def _record_sweep(tune: TuneConfig, base_tree: dict, rows: list[dict], best: dict | None, trial_steps: int) -> None:
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(tune.experiment)
    for row in rows:
        children = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{SWEEP_TAG}` = '{tune.name}' and tags.`{TRIAL_TAG}` = '{row['trial']}'",
        )
        for child in children:
            client.set_tag(child.info.run_id, "strata.stop_reason", row["state"])
    names = list(tune.search_space)
    table = {"trial": [r["trial"] for r in rows], "state": [r["state"] for r in rows]}
    table |= {name: [r["params"].get(name) for r in rows] for name in names}
    table |= {"step": [r["step"] for r in rows], tune.metric: [r[tune.metric] for r in rows]}
    mlflow.log_table(table, "trials.json")
    mlflow.log_dict({k: v.model_dump(exclude_none=True) for k, v in tune.search_space.items()}, "search_space.yaml")
    mlflow.log_metric("trial_steps", trial_steps)
    mlflow.log_metric("trials_stopped_early", sum(r["state"].startswith("stopped") for r in rows))
    if best:
        mlflow.log_metric(f"best_{tune.metric}", best[tune.metric])
        best_tree = trial_tree(tune, base_tree, best["params"], run_name=f"{tune.name}-best")
        best_tree["checkpoint"] = {k: v for k, v in best_tree.get("checkpoint", {}).items() if k != "storage_path"}
        mlflow.log_text(yaml.safe_dump(best_tree, sort_keys=False), "best_config.yaml")


def _register_best(tune: TuneConfig, base_tree: dict, best: dict, parent) -> str | None:
    """Register the best trial's model once per sweep, tagged with the sweep, the trial, its params and metric."""
    registered = MlflowClient().get_run(parent.info.run_id).data.tags.get(REGISTERED_TAG)
    if registered:
        return registered
    cfg = tune.schema.model_validate(
        trial_tree(tune, base_tree, best["params"], trial_run_name(tune.name, best["trial"]))
    )
    experiment_id = mlflow.get_experiment_by_name(tune.experiment).experiment_id
    best_run = tracking.find_run(experiment_id, cfg.run_name)
    lineage = {k: v for k, v in MlflowClient().get_run(best_run).data.tags.items() if k in LINEAGE_TAGS}
    tags = {
        SWEEP_TAG: tune.name,
        TRIAL_TAG: best["trial"],
        tune.metric: str(best[tune.metric]),
        **{f"strata.param.{k}": str(v) for k, v in best["params"].items()},
        **lineage,
    }
    with (
        ray.train.Checkpoint(best["checkpoint"]).as_directory() as checkpoint,
        tempfile.TemporaryDirectory() as export_dir,
        mlflow.start_run(run_id=best_run, nested=True),
    ):
        model_dir = export_model(tune.job, cfg, Path(checkpoint), Path(export_dir))
        version = registry.log_model(model_dir, tune.registered_model, tags=tags)
    mlflow.set_tag(REGISTERED_TAG, str(version.version))
    return str(version.version)


def export_model(job: str, cfg, checkpoint: Path, export_dir: Path) -> Path:
    """A trial's trained model as a transformers directory with its tokenizer, as the job's own driver exports it
    (a pretraining checkpoint already is one; an adapter is merged into its base)."""
    if job == "pretrain":
        return checkpoint / "model"
    import torch
    from transformers import AutoTokenizer

    from strata.data.tokenizer import stop_token_ids
    from strata.models.adapters import ADAPTER_DIR, merged_model, trainable_model

    base = registry.resolve_model(cfg.base_model)
    if cfg.method == "full":
        model = trainable_model(str(checkpoint / "model"), "full", cfg.lora, torch.device("cpu"))
    else:
        adapter_dir = str(checkpoint / ADAPTER_DIR)
        model = merged_model(base.directory, cfg.method, adapter_dir, cfg.quantize_experts, cfg.scaling.use_gpu)
    tokenizer = AutoTokenizer.from_pretrained(base.directory)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config)
    model.save_pretrained(export_dir)
    tokenizer.save_pretrained(export_dir)
    return export_dir
