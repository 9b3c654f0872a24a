"""The fine-tuning loop each Ray Train worker runs: full, LoRA or QLoRA over chat-formatted SFT examples.

The same global-batch schedule as pretraining walks the examples; micro-batches are right-padded to their
longest sample and the loss covers response tokens only: the mean over every response token of the global
batch, however the tokens fall into micro-batches and ranks, which is also how the eval loss is defined.
Checkpoints hold what training changes (the adapter, or the whole model for full fine-tuning), the optimizer,
scheduler, step and data cursor.
"""

from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from strata import tracking
from strata.config import FinetuneConfig
from strata.data.packing import GlobalBatchSchedule
from strata.data.sft import IGNORE_INDEX, SFTExample, collate
from strata.models.adapters import ADAPTER_DIR, save_trained, trainable_model
from strata.models.flops import mfu, peak_flops, training_flops_per_token
from strata.registry import resolve_model
from strata.train.state import (
    TRAIN_STATE,
    report_with_checkpoint,
    restore_rank_state,
    save_train_state,
    seed_everything,
)
from strata.train.trainer import (
    PreemptionGuard,
    mean_across_ranks,
    optimizer_and_schedule,
    sum_across_ranks,
)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss across fork + exec, VmHWM starts fresh.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def forward_batch(model, batch: dict[str, torch.Tensor]):
    """The model's output for a collated batch. Without a KV cache: transformers builds the block-diagonal mask
    of packed rows only for cache-free forwards, and `use_cache` defaults to on even in training mode."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sum of cross-entropy over the batch's response tokens, and the router's load-balancing loss (None
    for a dense model). Summed, not averaged: the caller divides by the tokens of the whole global batch."""
    out = forward_batch(model, batch)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, getattr(out, "aux_loss", None)


def accumulate_gradients(
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    global_tokens: int,
    world_size: int,
    aux_coef: float,
    autocast_bf16: bool = False,
) -> tuple[float, float]:
    """Backward over this rank's micro-batches of one global batch. Returns this rank's share of the global
    batch's loss (the shares of all ranks add up to it) and its mean load-balancing loss. `autocast_bf16`
    (`scaling.precision`, as in pretraining) runs the forward in bf16 over the fp32 trainable weights.

    The loss is the sum of token losses over `global_tokens`, the response tokens of the whole global batch on
    every rank, so a token weighs the same wherever it lands; DDP averages gradients across ranks, hence the
    factor `world_size`. The load-balancing loss is a mean over micro-batches, as in pretraining.
    """
    loss_sum = aux_sum = 0.0
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or world_size == 1
        device_type = batch["input_ids"].device.type
        with (
            nullcontext() if sync else model.no_sync(),  # all-reduce once per step
            torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast_bf16),
        ):
            token_losses, aux = response_loss(model, batch)
            loss = token_losses * world_size / global_tokens
            if aux is not None:
                loss = loss + aux_coef * aux / len(micro_batches)
                aux_sum += aux.item() / len(micro_batches)
            loss.backward()
        loss_sum += token_losses.item()
    return loss_sum / global_tokens, aux_sum


@torch.no_grad()
def evaluate(model, examples: list[SFTExample], rank: int, world_size: int, batch_size: int, pad_id: int, device):
    """Mean loss over the response tokens of the whole eval set (each rank takes a share)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, token count)
    shard = examples[rank::world_size]
    for i in range(0, len(shard), batch_size):
        chunk = shard[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        token_losses, _ = response_loss(model, batch)
        tokens = sum(e.loss_tokens for e in chunk)
        total += torch.tensor([token_losses.item(), tokens], dtype=torch.float64, device=device)
    model.train()
    total = sum_across_ranks(total)
    return (total[0] / total[1].clamp(min=1)).item()


def finetune_loop_per_worker(loop_config: dict) -> None:
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    train: list[SFTExample] = loop_config["train"]
    evaluation: list[SFTExample] = loop_config["eval"]
    pad_id: int = loop_config["pad_id"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    checkpoint = ray.train.get_checkpoint()
    seed_everything(cfg.optim.seed, rank)  # LoRA initialisation and dropout draw from these streams
    tracking.use_store(loop_config["tracking_uri"])
    # The checkpoint in place when storage is local; a copy, removed once loaded, when it is remote.
    with checkpoint.as_directory() if checkpoint else nullcontext() as resumed:
        resumed_dir = Path(resumed) if resumed else None
        state = torch.load(resumed_dir / TRAIN_STATE, weights_only=False) if resumed_dir else None
        base_dir = resolve_model(cfg.base_model).directory  # each worker fetches the base: nodes share no disk
        if cfg.method == "full" and resumed_dir:
            base_dir = str(resumed_dir / "model")
        adapter_dir = str(resumed_dir / ADAPTER_DIR) if resumed_dir and cfg.method != "full" else None
        model = trainable_model(
            base_dir, cfg.method, cfg.lora, device, cfg.gradient_checkpointing, adapter_dir, cfg.quantize_experts
        )
        # A 4-bit model is placed on its device at load time; moving it again is not supported.
        model = ray.train.torch.prepare_model(model, move_to_device=cfg.method != "qlora")
        optimizer, scheduler, step, cursor = optimizer_and_schedule(model, cfg.optim, state)
        if state:
            if not restore_rank_state(resumed_dir, rank, world_size):
                seed_everything(cfg.optim.seed + step, rank)
            ray.train.report({"step": step, "resumed_from_step": step})  # the controller measures the recovery

    schedule = GlobalBatchSchedule(len(train), cfg.optim.global_batch_size, cfg.optim.seed, cursor)
    grad_accum = cfg.optim.global_batch_size // (cfg.optim.micro_batch_size * world_size)  # elastic-safe
    if step == 0:  # the base model's eval loss: the point every fine-tuning curve starts from
        eval_loss = evaluate(model, evaluation, rank, world_size, cfg.optim.micro_batch_size, pad_id, device)
        ray.train.report({"step": 0, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})

    def report_checkpoint(metrics: dict) -> None:
        def write_rank0(directory: Path) -> None:
            save_trained(model, directory, cfg.method)
            save_train_state(directory, step, schedule.cursor.state_dict(), optimizer, scheduler)

        report_with_checkpoint(metrics, step, rank, world_size, schedule.cursor.state_dict(), write_rank0)

    model.train()
    preemption = PreemptionGuard(cfg.checkpoint.preemption_check_every_steps)
    model_config = getattr(model, "module", model).config
    aux_coef = getattr(model_config, "router_aux_loss_coef", 0.0)
    # Sequences are at most max_seq_len long: the attention term is an upper bound, so MFU is at most slightly high.
    flops_per_token, peak = training_flops_per_token(model_config, cfg.data.max_seq_len), peak_flops(device)
    micro = cfg.optim.micro_batch_size
    window_start, window_tokens = time.perf_counter(), 0
    while step < cfg.optim.max_steps:
        # The whole global batch (every rank computes it), so each rank knows its response-token count.
        global_batch = schedule.next_indices(0, 1)
        mine = np.array_split(global_batch, world_size)[rank]
        global_tokens = sum(train[j].loss_tokens for j in global_batch)
        micro_batches = [
            {k: v.to(device) for k, v in collate([train[j] for j in mine[i : i + micro]], pad_id).items()}
            for i in range(0, len(mine), micro)
        ]
        assert len(micro_batches) == grad_accum, f"{len(micro_batches)} micro-batches, expected {grad_accum}"
        loss_share, aux_loss = accumulate_gradients(
            model, micro_batches, global_tokens, world_size, aux_coef, cfg.scaling.autocast_bf16
        )
        window_tokens += sum(len(train[j].input_ids) for j in global_batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        checkpoint_due = step % cfg.checkpoint.every_steps == 0 or step == cfg.optim.max_steps
        if not checkpoint_due:  # a checkpoint is on its way anyway
            preemption.check(step, report_checkpoint)
        if not (checkpoint_due or step % cfg.tracking.log_every_steps == 0):
            continue
        now = time.perf_counter()  # report to report: logging and checkpointing count against throughput
        metrics = {
            "step": step,
            "loss": sum_across_ranks(torch.tensor([loss_share], device=device)).item(),
            "aux_loss": mean_across_ranks(torch.tensor([aux_loss], device=device)).item(),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "tokens_per_s": window_tokens / (now - window_start),
            "peak_memory_mb": peak_memory_mb(device),
        }
        if peak:  # a GPU whose peak is known
            metrics["mfu"] = mfu(metrics["tokens_per_s"], flops_per_token, peak, world_size)
        if checkpoint_due:
            eval_loss = evaluate(model, evaluation, rank, world_size, cfg.optim.micro_batch_size, pad_id, device)
            metrics.update(eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50)))
            report_checkpoint(metrics)
        else:
            ray.train.report(metrics)
        window_start, window_tokens = now, 0
