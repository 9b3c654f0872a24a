"""The sections pretraining and fine-tuning share: optimizer, checkpoints, scaling and tracking."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from strata.config.base import StrictModel
from strata.paths import resolve


class OptimConfig(StrictModel):
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(300, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(8, gt=0, description="Sequences per worker per forward pass.")
    global_batch_size: int = Field(32, gt=0, description="Sequences per optimizer step, across all workers.")
    seed: int = 0

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("betas must each be in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


class CheckpointConfig(StrictModel):
    every_steps: int = Field(50, gt=0)
    keep_last: int = Field(3, gt=0)
    preemption_check_every_steps: int = Field(
        1, gt=0, description="How often the loop asks Ray Train about node preemptions (a barrier across ranks)."
    )
    storage_path: str = Field("runs", description="Local directory or s3:// URI for Ray Train storage.")
    max_failures: int = Field(
        3,
        ge=-1,
        description="Worker-group failures to resume from before the run fails (-1: no limit). Preemptions are "
        "counted apart and always resumed.",
    )

    @property
    def resolved_storage_path(self) -> str:
        return resolve(self.storage_path)


class ScalingConfig(StrictModel):
    num_workers: int = Field(2, gt=0, description="Workers to run (the most, when elastic).")
    min_workers: int | None = Field(
        None, gt=0, description="Elastic: keep training on as few as this many while capacity is missing."
    )
    elastic_resize_interval_s: float = Field(60, gt=0, description="How often Ray Train looks for capacity to grow.")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources per worker, e.g. {spot: 1} to run on spot nodes."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")

    @model_validator(mode="after")
    def _elastic_range(self) -> ScalingConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) exceeds num_workers ({self.num_workers})")
        return self

    @property
    def world_sizes(self) -> range:
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    @property
    def autocast_bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)


class TrackingConfig(StrictModel):
    tracking_uri: str | None = Field(None, description="Default: $MLFLOW_TRACKING_URI, else a local sqlite file.")
    artifact_location: str | None = Field(
        None,
        description="Where a new experiment keeps its artifacts (s3://bucket/mlflow): the client writes there "
        "itself. Default: beside a local sqlite store, or wherever the tracking server sends them.",
    )
    experiment: str = "strata-pretrain"
    registered_model: str | None = Field("strata-tiny", description="Registry name; null to skip registering.")
    log_every_steps: int = Field(10, gt=0)


class BatchedJob(StrictModel):
    """What pretraining and fine-tuning share: one global batch per optimizer step, whatever the workers."""

    optim: OptimConfig
    scaling: ScalingConfig

    @model_validator(mode="after")
    def _batch_divides(self):
        # The global batch stays the same whatever the number of workers: gradient accumulation adapts.
        for workers in self.scaling.world_sizes:
            per_step = self.optim.micro_batch_size * workers
            if self.optim.global_batch_size % per_step:
                raise ValueError(
                    f"optim.global_batch_size ({self.optim.global_batch_size}) must be a multiple of "
                    f"optim.micro_batch_size x workers ({per_step}, with {workers} workers)"
                )
        return self

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per worker per step at the full `scaling.num_workers`."""
        return self.optim.global_batch_size // (self.optim.micro_batch_size * self.scaling.num_workers)
