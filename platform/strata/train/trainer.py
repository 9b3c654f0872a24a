"""Training machinery that pretraining and fine-tuning share: the TorchTrainer, the optimizer and its schedule,
cross-rank means, and the just-in-time checkpoint on a preemption notice."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import ray.train
import torch
import torch.distributed as dist
from ray.train import PreemptionInfo
from ray.train.torch import TorchConfig, TorchTrainer

from strata.config import OptimConfig
from strata.config.training import BatchedJob
from strata.data.packing import DataCursor
from strata.train.callbacks import PrometheusMetricsCallback


def make_trainer(cfg: BatchedJob, train_fn, loop_config: dict, callbacks: list, run_name: str) -> TorchTrainer:
    """A TorchTrainer for a pretraining or fine-tuning config (both have scaling and checkpoint sections). Every
    run also exports its progress to Prometheus (`PrometheusMetricsCallback`).

    The same `run_name` and storage path resume from the latest checkpoint there."""
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
            name=run_name,
            storage_path=cfg.checkpoint.resolved_storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=[*callbacks, PrometheusMetricsCallback(run_name)],
        ),
    )


def fit_unless_finished(trainer: TorchTrainer, cfg: BatchedJob, run_name: str) -> ray.train.Result:
    """The run's result: read from storage when its latest checkpoint already reached `max_steps` (rerunning a
    finished run starts no worker and trains nothing), else what `trainer.fit()` returns (a fresh start or a resume)."""
    try:
        done = ray.train.Result.from_path(f"{cfg.checkpoint.resolved_storage_path}/{run_name}")
    except RuntimeError:  # no run there yet, or one that never checkpointed
        done = None
    finished = done is not None and done.checkpoint is not None and done.metrics["step"] >= cfg.optim.max_steps
    return done if finished else trainer.fit()


def lr_lambda(optim: OptimConfig):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or router-free vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=False)


def optimizer_and_schedule(model: torch.nn.Module, optim: OptimConfig, state: dict | None):
    """AdamW and its LR schedule, with the step and data cursor: fresh, or as a checkpoint's train state left them."""
    optimizer = make_optimizer(model, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim))
    if not state:
        return optimizer, scheduler, 0, DataCursor()
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return optimizer, scheduler, state["step"], DataCursor(**state["cursor"])


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over all ranks (in place); the tensor itself on a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over all ranks (in place); the tensor itself on a single process."""
    values = sum_across_ranks(values)
    if dist.is_available() and dist.is_initialized():
        values /= dist.get_world_size()
    return values


def hold_until_preempted(deadline_ms: int | None, slack_s: float = 30.0) -> None:
    """After a just-in-time checkpoint, wait for Ray Train to tear this worker group down at the preemption
    deadline and restart from that checkpoint: steps trained meanwhile would be lost. If the node outlives
    the deadline (the reclaim was cancelled), training simply carries on."""
    deadline_s = deadline_ms / 1000 if deadline_ms else time.time() + 120
    while time.time() < deadline_s + slack_s:
        time.sleep(0.5)


class PreemptionGuard:
    """Asks Ray Train about node preemptions every `every_steps` steps and acts once per notice: a just-in-time
    checkpoint, then a hold until the reclaim deadline.

    A worker keeps the last notice Ray Train sent it, so after a cancelled reclaim (the deadline passed, the node
    is still there) `get_preemption_info` keeps returning it: that notice is not acted on again, but checking goes
    on, and a later, different notice gets its own checkpoint. `get_preemption_info` is a barrier: every rank
    must call `check` at the same steps."""

    def __init__(
        self, every_steps: int, slack_s: float = 30.0, poll: Callable[[], PreemptionInfo | None] | None = None
    ):
        self.every_steps = every_steps
        self.slack_s = slack_s
        self.poll = poll or ray.train.get_preemption_info
        self.handled: PreemptionInfo | None = None  # the notice the last just-in-time checkpoint answered

    def check(self, step: int, report_checkpoint: Callable[[dict], None]) -> bool:
        """True when this step wrote a just-in-time checkpoint (and held until the deadline)."""
        if step % self.every_steps:
            return False
        notice = self.poll()
        if notice is None or notice == self.handled:
            return False
        report_checkpoint({"step": step, "preemption_checkpoint_step": step})
        self.handled = notice
        hold_until_preempted(notice.deadline_ms, self.slack_s)
        return True
