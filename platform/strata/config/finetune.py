"""The fine-tuning job: base model, method (full, LoRA, QLoRA), adapter settings and SFT data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from strata.config.base import StrictModel
from strata.config.model import validate_model_name
from strata.config.training import BatchedJob, CheckpointConfig, OptimConfig, ScalingConfig, TrackingConfig
from strata.paths import exists, is_remote

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LoraSettings(StrictModel):
    rank: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: list(ATTENTION_PROJECTIONS),
        description="nn.Linear names or regexes (peft `target_modules`), e.g. attention projections.",
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="Parameter names for LoRA on fused MoE expert weights, e.g. mlp.experts.gate_up_proj.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")

    @model_validator(mode="after")
    def _dropout_with_parameters(self) -> LoraSettings:
        if self.target_parameters and self.dropout:
            raise ValueError("dropout must be 0 with target_parameters (peft's ParamWrapper has no dropout)")
        return self


class SFTDataConfig(StrictModel):
    train_file: str | None = Field(
        None, description="JSONL or Parquet (a path or an s3:// URI): prompt/response pairs or chat messages."
    )
    builtin: Literal["stdlib-docstrings"] | None = Field(
        "stdlib-docstrings", description="A dataset built locally, used when train_file is not given."
    )
    max_records: int | None = Field(None, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_seq_len: int = Field(256, ge=16)
    packing: bool = Field(False, description="Pack several samples per sequence (loss masks stay per sample).")
    on_bad_record: Literal["skip", "error"] = "skip"
    data_dir: str = "data"

    @field_validator("train_file")
    @classmethod
    def _file_exists(cls, train_file: str | None) -> str | None:
        if train_file is None:
            return None
        path = Path(train_file).expanduser()
        if path.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"training data must be .jsonl or .parquet, not {path.suffix!r}")
        if is_remote(train_file):  # s3://...: read by the driver, which tokenizes and ships the examples
            if not exists(train_file):
                raise ValueError(f"training data file {train_file!r} does not exist")
            return train_file
        if not path.is_file():
            raise ValueError(f"training data file {train_file!r} does not exist")
        return str(path.resolve())

    @model_validator(mode="after")
    def _has_source(self) -> SFTDataConfig:
        if self.train_file is None and self.builtin is None:
            raise ValueError("set data.train_file or data.builtin")
        return self


class FinetuneConfig(BatchedJob):
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Default: derived.")
    base_model: str = Field(..., description="models:/NAME@ALIAS, models:/NAME/VERSION, a local HF dir or hub id.")
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quantize_experts: bool = Field(
        True,
        description="QLoRA only: store the fused MoE expert weights in NF4 too (bitsandbytes does only nn.Linear).",
    )
    gradient_checkpointing: bool = False
    data: SFTDataConfig = Field(default_factory=SFTDataConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=5, max_steps=100))
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(experiment="strata-finetune", registered_model=None)
    )
    sample_prompts: list[str] = Field(default_factory=list, description="Generated before/after, logged as a table.")
    max_new_tokens: int = Field(48, gt=0)

    @field_validator("base_model")
    @classmethod
    def _base_exists(cls, base_model: str) -> str:
        if base_model.startswith("models:/"):
            return base_model
        return validate_model_name(base_model)

    @property
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        dataset = Path(self.data.train_file).stem if self.data.train_file else self.data.builtin
        rank = f"-r{self.lora.rank}" if self.method != "full" else ""
        lr = f"{self.optim.lr:.0e}".replace("e-0", "e-").replace("e+0", "e")
        return f"{self.method}{rank}-lr{lr}-{dataset}"
