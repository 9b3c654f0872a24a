"""Typed job configuration: YAML files validated by pydantic, with dotted command-line overrides.

Every job reads one file (`--config FILE`) plus `--set a.b=value` overrides. Validation happens here,
before any Ray work starts, and an error names the file and the dotted field that is wrong.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from strata.paths import resolve


class ConfigError(ValueError):
    """A job configuration is invalid; the message names the file and the field."""


class StrictModel(BaseModel):
    # Unknown keys are errors: a misspelt option must never be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def stdlib_source_dir() -> str:
    """The Python standard library's own source tree: the default corpus, present on every machine."""
    return sysconfig.get_paths()["stdlib"]


def validate_model_name(name: str) -> str:
    """A preset name, an existing transformers directory (made absolute) or a hub id; else a ValueError."""
    from strata.models.presets import PRESETS

    if name in PRESETS:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a directory but has no config.json (not a transformers model)")
        return str(path.resolve())
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_like_path:
        raise ValueError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model directory")
    return name  # a hub id such as "Qwen/Qwen3-30B-A3B", loaded with from_pretrained


class ModelConfig(StrictModel):
    name: str = Field("tiny", description="A preset (tiny, small, moe-1b), a local HF directory or a hub id.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Extra transformers config fields.")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return validate_model_name(name)


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

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, extensions: list[str]) -> list[str]:
        if not extensions or any(not e.startswith(".") for e in extensions):
            raise ValueError("extensions must be a non-empty list like ['.py', '.md']")
        return extensions

    @property
    def root(self) -> Path:
        return Path(resolve(self.data_dir)) / self.name


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


class PretrainConfig(BatchedJob):
    run_name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def _set_dotted(tree: dict[str, Any], dotted: str, raw_value: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw_value)


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | os.PathLike, overrides: list[str] = (), schema: type[StrictModel] = PretrainConfig):
    """Read a YAML job config, apply `a.b=value` overrides and validate it against `schema`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(path, err)) from None


def format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        shown = e["type"] not in ("extra_forbidden", "missing") and not isinstance(e["input"], (dict, list))
        got = f" (got {e['input']!r})" if shown else ""
        lines.append(f"  {field}: {message}{got}")
    return "\n".join(lines)


def dump_config(config: StrictModel) -> str:
    """The resolved config as YAML, saved next to every checkpoint and tracked run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config: StrictModel) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", config.model_dump(mode="json"))
    return flat


# --- fine-tuning -------------------------------------------------------------------------------------------

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
    train_file: str | None = Field(None, description="JSONL or Parquet: prompt/response pairs or chat messages.")
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
        if not path.is_file():
            raise ValueError(f"training data file {train_file!r} does not exist")
        if path.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"training data must be .jsonl or .parquet, not {path.suffix!r}")
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


# -- serving ------------------------------------------------------------------------------------------------------


class EngineSettings(StrictModel):
    max_batch_size: int = Field(32, gt=0, description="Sequences decoded together (continuous batching slots).")
    max_tokens_limit: int = Field(512, gt=0, description="The largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(16, gt=0, description="max_tokens when a request names none (OpenAI: 16).")
    stream_interval_s: float = Field(
        0.02, ge=0, description="Streamed tokens are sent at most this often (the first one at once)."
    )
    stream_chunks_per_s: float = Field(
        200,
        gt=0,
        description="Chunks a replica streams per second across all its requests: with many streams each one's "
        "interval grows, so the cost of streaming stays bounded while the batch grows.",
    )
    admission_group: int = Field(
        4, gt=0, description="New requests join a running batch this many at a time (one prefill for the group)..."
    )
    admission_wait_s: float = Field(0.05, ge=0, description="...or once the first of them has waited this long.")
    torch_threads: int | None = Field(None, gt=0, description="Default: the replica's CPUs.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")


class AutoscalingSettings(StrictModel):
    """Serve's request-based autoscaling of one variant's replicas (its `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(16, gt=0, description="Requests in flight per replica to aim for.")
    upscale_delay_s: float = Field(30, ge=0, description="Load must stay high this long before a replica is added.")
    downscale_delay_s: float = Field(600, ge=0, description="Load must stay low this long before one is removed.")
    look_back_period_s: float = Field(30, gt=0, description="The window the load is averaged over.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class VariantConfig(StrictModel):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]*$", description="e.g. stable, fast")
    model: str = Field(..., description="models:/NAME@ALIAS, models:/NAME/VERSION or a transformers directory.")
    adapter: str | None = Field(None, description="A LoRA adapter (directory or runs:/ URI) applied to `model`.")
    num_replicas: int = Field(1, gt=0)
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    engine: EngineSettings = Field(default_factory=EngineSettings)


class RateLimit(StrictModel):
    requests_per_minute: float = Field(600, gt=0, description="Per key, per router replica.")
    burst: int = Field(60, gt=0, description="Requests a key may send at once before the per-minute rate applies.")


class AuthSettings(RateLimit):
    api_keys_file: str | None = Field(None, description="One key per line; added to $STRATA_API_KEYS.")
    allow_anonymous: bool = Field(False, description="Serve without keys (local experiments only).")
    key_limits: dict[str, RateLimit] = Field(
        default_factory=dict, description="Per key id (`key-...`, as in the audit log): a different rate limit."
    )


class AuditSettings(StrictModel):
    path: str = Field("logs/audit.jsonl", description="JSON lines, one per request.")
    log_prompts: bool = Field(False, description="Also record prompts and completions.")


class ServeConfig(StrictModel):
    """The arguments of the A/B application (`serve_apps/ab.py`): one model name, N variants, a split."""

    model_name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The API's `model`.")
    variants: list[VariantConfig] = Field(..., min_length=1)
    weights: dict[str, float] = Field(
        default_factory=dict, description="Initial split; live changes go to the router's user_config."
    )
    tracking_uri: str | None = Field(None, description="MLflow store holding the registry; default as for training.")
    auth: AuthSettings = Field(default_factory=AuthSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    max_body_bytes: int = Field(1_000_000, gt=0)
    router_replicas: int = Field(1, gt=0)
    router_num_cpus: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _variants_and_weights(self) -> ServeConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        from strata.serve.routing import Split

        Split(self.initial_weights, names)  # raises on unknown names or all-zero weights
        return self

    @property
    def initial_weights(self) -> dict[str, float]:
        return self.weights or {v.name: 1.0 for v in self.variants}
