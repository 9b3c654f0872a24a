"""The pretraining loop that every Ray Train worker runs, written out plainly.

One optimizer step consumes one global batch (optim.global_batch_size sequences, whatever the number of
workers): each rank takes its share and runs `grad_accum` micro-batches, DDP averages gradients on the last
one. Every `checkpoint.every_steps` steps rank 0 writes model, optimizer, scheduler, step and data cursor.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from strata.config import PretrainConfig, dump_config
from strata.data.packing import DataCursor, GlobalBatchSchedule, PackedSequences
from strata.data.tokenizer import load_tokenizer, stop_token_ids
from strata.models.flops import mfu, peak_flops, training_flops_per_token
from strata.models.moe_stats import ExpertLoad, expert_load
from strata.models.presets import build_model
from strata.train.state import (
    TRAIN_STATE,
    report_with_checkpoint,
    restore_rank_state,
    save_train_state,
    seed_everything,
)
from strata.train.trainer import PreemptionGuard, mean_across_ranks, optimizer_and_schedule

MODEL_DIR = "model"  # a transformers directory (config + weights + tokenizer) inside every checkpoint
EXPERT_LOAD = "expert_load.json"  # tokens per expert and router entropy, per layer, at that step


@dataclass(frozen=True)
class DataPaths:
    tokenizer_dir: str
    packed_dir: str


def save_checkpoint(directory: Path, model, tokenizer, optimizer, scheduler, step: int, cursor: DataCursor, cfg):
    unwrapped = getattr(model, "module", model)
    unwrapped.generation_config.eos_token_id = stop_token_ids(tokenizer, unwrapped.generation_config)  # + end of turn
    unwrapped.save_pretrained(directory / MODEL_DIR)
    tokenizer.save_pretrained(directory / MODEL_DIR)
    save_train_state(directory, step, cursor.state_dict(), optimizer, scheduler)
    (directory / "config.yaml").write_text(dump_config(cfg))


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = PretrainConfig.model_validate(loop_config["config"])
    paths = DataPaths(**loop_config["paths"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    tokenizer = load_tokenizer(paths.tokenizer_dir)
    data = PackedSequences(paths.packed_dir)  # local, or streamed from object storage

    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:  # resuming: architecture and weights come from the checkpoint, not the preset
        with checkpoint.as_directory() as ckpt_dir:
            model = build_model(str(Path(ckpt_dir) / MODEL_DIR), len(tokenizer), {})
            state = torch.load(Path(ckpt_dir) / TRAIN_STATE, weights_only=False)
            if not restore_rank_state(Path(ckpt_dir), rank, world_size):
                seed_everything(cfg.optim.seed + state["step"], rank)
    else:
        special_ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = build_model(
            cfg.model.name,
            len(tokenizer),
            special_ids,
            cfg.model.overrides,
            seed=cfg.optim.seed,
            resize_embeddings=cfg.model.resize_embeddings,
        )
        seed_everything(cfg.optim.seed, rank)
    model.config.output_router_logits = True
    model = ray.train.torch.prepare_model(model)  # moves to the device; DDP when world_size > 1
    optimizer, scheduler, step, cursor = optimizer_and_schedule(model, cfg.optim, state)
    if state:
        ray.train.report({"step": step, "resumed_from_step": step})  # the controller measures the recovery

    schedule = GlobalBatchSchedule(len(data), cfg.optim.global_batch_size, cfg.optim.seed, cursor)
    grad_accum = cfg.optim.global_batch_size // (cfg.optim.micro_batch_size * world_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.scaling.autocast_bf16 else nullcontext()
    unwrapped_config = getattr(model, "module", model).config
    top_k = getattr(unwrapped_config, "num_experts_per_tok", 0)
    aux_coef = getattr(unwrapped_config, "router_aux_loss_coef", 0.0)
    tokens_per_step = cfg.optim.global_batch_size * data.seq_len
    flops_per_token, peak = training_flops_per_token(unwrapped_config, data.seq_len), peak_flops(device)

    def report_checkpoint(metrics: dict, load: ExpertLoad | None = None) -> None:
        def write_rank0(directory: Path) -> None:
            save_checkpoint(directory, model, tokenizer, optimizer, scheduler, step, schedule.cursor, cfg)
            if load is not None:  # per layer and expert, for the run's artifacts and the dashboards
                (directory / EXPERT_LOAD).write_text(json.dumps(load.to_dict()))

        report_with_checkpoint(metrics, step, rank, world_size, schedule.cursor.state_dict(), write_rank0)

    model.train()
    preemption = PreemptionGuard(cfg.checkpoint.preemption_check_every_steps)
    window_start, window_steps = time.perf_counter(), 0
    while step < cfg.optim.max_steps:
        micro_batches = data.take(schedule.next_indices(rank, world_size)).to(device).split(cfg.optim.micro_batch_size)
        assert len(micro_batches) == grad_accum, f"{len(micro_batches)} micro-batches, expected {grad_accum}"
        checkpoint_due = (step + 1) % cfg.checkpoint.every_steps == 0 or step + 1 == cfg.optim.max_steps
        log_due = checkpoint_due or (step + 1) % cfg.tracking.log_every_steps == 0
        lm_loss = aux_loss = 0.0
        load = None  # expert load over the whole step, computed only on steps that are logged
        for i, batch in enumerate(micro_batches):
            is_last = i == grad_accum - 1
            sync = nullcontext() if is_last or world_size == 1 else model.no_sync()  # all-reduce once per step
            with sync, autocast:
                out = model(input_ids=batch, labels=batch)
                (out.loss / grad_accum).backward()
            aux = out.aux_loss.item() if getattr(out, "aux_loss", None) is not None else 0.0  # None: dense model
            lm_loss += (out.loss.item() - aux_coef * aux) / grad_accum
            aux_loss += aux / grad_accum
            if log_due and getattr(out, "router_logits", None):
                micro_load = expert_load(out.router_logits, top_k)
                load = micro_load if load is None else load + micro_load
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        if not checkpoint_due:  # a checkpoint is on its way anyway
            preemption.check(step, report_checkpoint)
        if not log_due:
            continue
        # The window runs report to report, so logging and checkpointing costs count against throughput.
        now = time.perf_counter()
        elapsed, steps_in_window = now - window_start, window_steps
        window_start, window_steps = now, 0
        losses = mean_across_ranks(torch.tensor([lm_loss, aux_loss], device=device))
        metrics = {
            "step": step,
            "loss": losses[0].item(),
            "aux_loss": losses[1].item(),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_step * steps_in_window / elapsed,
            "epoch": schedule.cursor.epoch,
            "world_size": world_size,
            "grad_accum": grad_accum,
        }
        if peak:  # a GPU whose peak is known
            metrics["mfu"] = mfu(metrics["tokens_per_s"], flops_per_token, peak, world_size)
        if load is not None:
            metrics.update(load.summary())
        if checkpoint_due:
            report_checkpoint(metrics, load)
        else:
            ray.train.report(metrics)
