"""The pretraining job: which data to build and pack, and the shared training sections."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from pydantic import Field, field_validator

from strata.config.base import StrictModel
from strata.config.model import ModelConfig
from strata.config.training import BatchedJob, CheckpointConfig, OptimConfig, ScalingConfig, TrackingConfig
from strata.paths import is_remote, resolve


def stdlib_source_dir() -> str:
    """The Python standard library's own source tree: the default corpus, present on every machine."""
    return sysconfig.get_paths()["stdlib"]


class DataConfig(StrictModel):
    name: str = Field("stdlib", description="Dataset name: outputs go to <data_dir>/<name>/.")
    source_dir: str = Field(default_factory=stdlib_source_dir, description="Directory of text/source files.")
    extensions: list[str] = Field(default_factory=lambda: [".py"])
    exclude_dirs: list[str] = Field(default_factory=lambda: ["site-packages", "__pycache__"])
    max_files: int | None = Field(None, gt=0, description="Cap on files read (sorted by path).")
    docs_per_shard: int = Field(2000, gt=0)
    data_dir: str = Field("data", description="Where corpus, tokenizer and packed tokens are written.")
    tokenizer: str | None = Field(None, description="An existing tokenizer directory; default: train one.")
    vocab_size: int = Field(4096, ge=512)
    seq_len: int = Field(128, ge=8)
    publish_to: str | None = Field(
        None,
        description="An object-store URI (s3://bucket/prefix) to publish the tokenizer and packed tokens to, for "
        "clusters whose nodes share no disk: workers then read only the row groups their batches need from there. "
        "Unset: workers read the local directories (one machine, or a shared file system).",
    )

    @field_validator("source_dir")
    @classmethod
    def _source_exists(cls, source_dir: str) -> str:
        if not Path(source_dir).expanduser().is_dir():
            raise ValueError(f"source directory {source_dir!r} does not exist")
        return str(Path(source_dir).expanduser().resolve())

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, tokenizer: str | None) -> str | None:
        if tokenizer is not None and not Path(tokenizer).expanduser().is_dir():
            raise ValueError(f"tokenizer directory {tokenizer!r} does not exist")
        return tokenizer and str(Path(tokenizer).expanduser().resolve())

    @field_validator("publish_to")
    @classmethod
    def _object_store(cls, uri: str | None) -> str | None:
        if uri is not None and not is_remote(uri):
            raise ValueError(f"publish_to must be an object-store URI such as s3://bucket/prefix, not {uri!r}")
        return uri and uri.rstrip("/")

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, extensions: list[str]) -> list[str]:
        if not extensions or any(not e.startswith(".") for e in extensions):
            raise ValueError("extensions must be a non-empty list like ['.py', '.md']")
        return extensions

    @property
    def root(self) -> Path:
        return Path(resolve(self.data_dir)) / self.name


class PretrainConfig(BatchedJob):
    run_name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
