"""Fine-tuning on Ray Train: resolve the base, validate the data, train, evaluate, export and register.

The driver does everything that needs the whole picture (bad-record report, sample generations before and
after, the merged export and its registry tags); workers run `finetune_loop_per_worker`.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from rich.console import Console
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from strata import registry, tracking
from strata.config import ConfigError, FinetuneConfig, dump_config
from strata.data.sft import SFTDataset, load_sft_dataset
from strata.data.tokenizer import stop_token_ids
from strata.models.adapters import ADAPTER_DIR, merged_model, parameter_counts, trainable_model
from strata.registry import ModelNotFound, ResolvedModel, generate_text, resolve_model
from strata.runtime import init_ray
from strata.train.callbacks import MlflowMetricsCallback
from strata.train.sft_loop import finetune_loop_per_worker
from strata.train.trainer import fit_unless_finished, make_trainer


@dataclass(frozen=True)
class FinetuneResult:
    run_id: str
    run_name: str
    checkpoint_path: str
    metrics: dict
    registered_version: str | None
    first_eval_loss: float | None
    samples: list[dict]
    bad_records: int


def sample_outputs(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return [generate_text(model.eval(), tokenizer, text, max_new_tokens) for text in rendered]


def run_finetuning(cfg: FinetuneConfig, console: Console | None = None) -> FinetuneResult:
    console = console or Console(stderr=True)
    uri = tracking.use_store(cfg.tracking.tracking_uri)
    inputs = finetune_inputs(cfg, uri)  # bad records fail here, before any Ray work
    base, tokenizer, dataset = inputs.base, inputs.tokenizer, inputs.dataset
    console.print(
        f"data: {len(dataset.train)} train / {len(dataset.eval)} eval examples from {dataset.source}"
        f" ({len(dataset.bad)} bad records skipped)"
    )
    init_ray()  # joins the cluster (or starts a local one) only once the inputs are known to be good
    run_name = cfg.resolved_run_name
    cpu = torch.device("cpu")
    base_samples = []
    if cfg.sample_prompts:  # the base's own answers, beside the fine-tune's at the end
        base_model = trainable_model(base.directory, "full", cfg.lora, cpu)
        base_samples = sample_outputs(base_model, tokenizer, cfg.sample_prompts, cfg.max_new_tokens)
        del base_model

    tags = {
        "strata.job": "finetune",
        "strata.method": cfg.method,
        "strata.dataset_hash": dataset.dataset_hash,
        **base.tags,
    }
    with (
        tracking.start_run(
            cfg.tracking.experiment,
            run_name,
            tracking.flatten(cfg),
            tags=tags,
            kind=tracking.FINETUNING,
            artifact_location=cfg.tracking.artifact_location,
        ) as run,
        contextlib.ExitStack() as checkpoint_copies,
    ):
        run_id = run.info.run_id
        mlflow.log_text(dump_config(cfg), "config.yaml")
        tracking.log_sft_data(dataset)
        mlflow.log_metric("bad_records", len(dataset.bad))
        if dataset.bad:
            mlflow.log_text("\n".join(map(str, dataset.bad)), "bad_records.txt")
        console.print(f"MLflow run {run_id} ({run_name}) in {uri}")
        callbacks = [MlflowMetricsCallback(uri, run_id)]
        trainer = make_trainer(cfg, finetune_loop_per_worker, inputs.loop_config, callbacks, run_name)
        result = fit_unless_finished(trainer, cfg, run_name)
        if result.checkpoint is None:
            raise RuntimeError(f"run {run_name} finished without a checkpoint")
        # In place when storage is local; a copy, removed on exit, when it is remote.
        ckpt_dir = Path(checkpoint_copies.enter_context(result.checkpoint.as_directory()))

        adapter_dir = ckpt_dir / ADAPTER_DIR
        tuned = trainable_model(
            str(ckpt_dir / "model") if cfg.method == "full" else base.directory,
            cfg.method,
            cfg.lora,
            cpu,
            adapter_dir=None if cfg.method == "full" else str(adapter_dir),
            quantize_experts=cfg.quantize_experts,
        )
        tuned_samples = sample_outputs(tuned, tokenizer, cfg.sample_prompts, cfg.max_new_tokens)
        samples = [
            {"prompt": p, "base_output": b, "finetuned_output": t}
            for p, b, t in zip(cfg.sample_prompts, base_samples, tuned_samples, strict=False)
        ]
        already = registry.already_registered(run, result.checkpoint.path)
        if not already:
            mlflow.log_params(parameter_counts(tuned))
            if samples:
                mlflow.log_table(
                    {k: [s[k] for s in samples] for k in ("prompt", "base_output", "finetuned_output")},
                    "samples.json",
                )
            if cfg.method != "full":
                mlflow.log_artifacts(str(adapter_dir), "adapter")
        with tempfile.TemporaryDirectory() as export_dir:
            if not already:
                merged = (
                    merged_model(
                        base.directory, cfg.method, str(adapter_dir), cfg.quantize_experts, cfg.scaling.use_gpu
                    )
                    if cfg.method != "full"
                    else tuned
                )
                merged.generation_config.eos_token_id = stop_token_ids(tokenizer, merged.generation_config)
                merged.save_pretrained(export_dir)
                tokenizer.save_pretrained(export_dir)
            version = registry.register_once(
                run,
                result.checkpoint.path,
                export_dir,
                cfg.tracking.registered_model,
                tags={"strata.run_name": run_name, **tags},
            )
    history = mlflow.MlflowClient().get_metric_history(run_id, "eval_loss")
    first_eval = min(history, key=lambda m: m.step).value if history else None
    return FinetuneResult(
        run_id,
        run_name,
        result.checkpoint.path,
        result.metrics,
        version,
        first_eval,
        samples,
        len(dataset.bad),
    )


@dataclass(frozen=True)
class FinetuneInputs:
    """What a fine-tuning run starts from: the resolved base, its tokenizer, the tokenized data, and the
    `train_loop_config` every worker is given (the config, the examples and the pad id)."""

    base: ResolvedModel
    tokenizer: PreTrainedTokenizerBase
    dataset: SFTDataset
    loop_config: dict


def base_of_run(cfg: FinetuneConfig) -> str:
    """The base to train on: the version this run recorded when it began, if it did (`registry.recorded_base`)."""
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    run_id = experiment and tracking.find_run(experiment.experiment_id, cfg.resolved_run_name)
    return registry.recorded_base(cfg.base_model, mlflow.MlflowClient().get_run(run_id).data.tags if run_id else {})


def finetune_inputs(cfg: FinetuneConfig, tracking_uri: str) -> FinetuneInputs:
    try:
        base = resolve_model(base_of_run(cfg))
    except ModelNotFound as err:
        raise ConfigError(f"base_model: {err}") from None
    tokenizer = AutoTokenizer.from_pretrained(base.directory)
    dataset = load_sft_dataset(cfg.data, tokenizer)
    loop_config = {
        # Workers, and the worker groups Ray Train restarts, load the very version the driver resolved.
        "config": cfg.model_copy(update={"base_model": base.pinned}).model_dump(mode="json"),
        "tracking_uri": tracking_uri,
        "train": dataset.train,
        "eval": dataset.eval,
        "pad_id": tokenizer.pad_token_id,
    }
    return FinetuneInputs(base, tokenizer, dataset, loop_config)
