"""The serving application: variants of one model, each with its engine settings, behind a router with a split."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from strata.config.base import StrictModel


def validate_weights(weights: Mapping[str, float], variants: list[str]) -> None:
    """Split weights name known variants only, are never negative, and are not all zero."""
    unknown = sorted(set(weights) - set(variants))
    if unknown:
        raise ValueError(f"weights name unknown variants {unknown}; the variants are {variants}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {dict(weights)}")


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
    kv_cache_tokens: int | None = Field(
        None,
        gt=0,
        description="KV cache budget in tokens, padding included (rows x longest row): requests wait in the queue "
        "while admitting them could outgrow it; one whose own prompt + max_tokens exceeds it is refused (400). "
        "Default: as many tokens as fit in kv_cache_gb.",
    )
    kv_cache_gb: float = Field(2.0, gt=0, description="Memory (GiB) the default kv_cache_tokens is sized for.")
    loops: int = Field(
        1,
        gt=0,
        description="Engine loops per replica over one copy of the weights, each with its share of max_batch_size "
        "and of the KV cache budget and its own torch_threads. On torch's CPU kernels (fp32, bf16 without brgemm) one "
        "loop per core decodes faster than one loop on all of them; on the bf16 brgemm kernels, where a layer is one "
        "call, one loop on all cores does (strata.serve.engine_loops). A GPU replica runs one.",
    )
    torch_threads: int | None = Field(None, gt=0, description="Per loop. Default: the replica's CPUs / loops.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16 or AMX), else fp32; decided when "
        "the replica loads, logged and reported in its stats. float16 needs a GPU.",
    )
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="Weight-only quantisation of the linear layers and MoE experts (not the output head); they "
        "compute in `dtype`. nf4 needs bitsandbytes.",
    )

    @model_validator(mode="after")
    def _slots_for_every_loop(self) -> EngineSettings:
        if self.loops > self.max_batch_size:
            raise ValueError(f"loops ({self.loops}) exceeds max_batch_size ({self.max_batch_size}): each needs a slot")
        return self


SERVE_METRICS_PUSH_INTERVAL_S = 10.0  # ray.serve.config.DEFAULT_METRICS_INTERVAL_S


class AutoscalingSettings(StrictModel):
    """Serve's request-based autoscaling of one variant's replicas (its `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(16, gt=0, description="Requests in flight per replica to aim for.")
    upscale_delay_s: float = Field(30, ge=0, description="Load must stay high this long before a replica is added.")
    downscale_delay_s: float = Field(600, ge=0, description="Load must stay low this long before one is removed.")
    look_back_period_s: float = Field(
        30,
        gt=SERVE_METRICS_PUSH_INTERVAL_S,
        description="The window the load is averaged over. It must span more than one of Serve's load reports, "
        "which replicas and handles push every 10 s (Serve warns below that, and will refuse in a later release).",
    )

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
    num_cpus: float = Field(0.5, ge=0, description="Per replica; 0.5 lets two variants and the router share 2 CPUs.")
    num_gpus: float = Field(0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {serve_gpu: 1}: replicas land only on the node group that "
        "declares them (cluster/aws.yaml); leave empty on a laptop.",
    )
    engine: EngineSettings = Field(default_factory=EngineSettings)
    replica_group: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="Variants naming the same group share its replicas: the base loaded once, each variant's LoRA "
        "adapter (`adapter`, or the one a registered fine-tune records) beside it, all of them decoded in one batch. "
        "They need one base and the same replica settings (REPLICA_SETTINGS).",
    )

    @model_validator(mode="after")
    def _group_unquantised(self) -> VariantConfig:
        if self.replica_group and self.engine.quantization != "none":
            raise ValueError(
                f"variant {self.name!r}: engine.quantization {self.engine.quantization} with replica_group "
                f"{self.replica_group!r}: a replica group's LoRA adapters wrap the base's plain linear layers, so its "
                "base is not quantised; use quantization none (bf16 halves the weights) or serve it without a group"
            )
        return self

    @model_validator(mode="after")
    def _float16_on_gpu(self) -> VariantConfig:
        if self.engine.dtype == "float16" and not self.num_gpus:
            raise ValueError(
                f"variant {self.name!r}: engine.dtype float16 needs a GPU (num_gpus > 0): CPUs have no fast float16 "
                "matmul; use bfloat16 or auto"
            )
        return self


# What a replica group's members must agree on: they run in the same replicas.
REPLICA_SETTINGS = ("num_replicas", "autoscaling", "num_cpus", "num_gpus", "resources", "engine")


def replica_groups(variants: list[VariantConfig]) -> dict[str, list[VariantConfig]]:
    """The variants of each replica group, in config order; the config's first member sets the replica."""
    groups: dict[str, list[VariantConfig]] = {}
    for variant in variants:
        if variant.replica_group:
            groups.setdefault(variant.replica_group, []).append(variant)
    return groups


def check_replica_group(members: list[VariantConfig]) -> None:
    """Members of a group run in the same replicas, so they must ask for the same ones."""
    first = members[0]
    for member in members[1:]:
        for setting in REPLICA_SETTINGS:
            if getattr(member, setting) != getattr(first, setting):
                raise ValueError(
                    f"variants {first.name!r} and {member.name!r} share replica_group {first.replica_group!r} but "
                    f"differ in {setting}: {getattr(first, setting)!r} vs {getattr(member, setting)!r}"
                )


class RateLimit(StrictModel):
    requests_per_minute: float = Field(
        600,
        gt=0,
        description="Per key, for the whole application: each of the `router_replicas` enforces its share of it.",
    )
    burst: int = Field(
        60,
        gt=0,
        description="Requests a key may send at once before the per-minute rate applies; shared among the router "
        "replicas like the rate, so it must be at least `router_replicas`.",
    )


Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class AuthSettings(RateLimit):
    api_key_hashes: list[Sha256Hex] = Field(
        default_factory=list,
        description="sha256 hex digests of the API keys (`strata keys hash`): a config never holds a key itself.",
    )
    api_keys_file: str | None = Field(
        None,
        description="One key per line, read by the router (relative paths: under $STRATA_HOME on its node); "
        "adds to api_key_hashes and the cluster's $STRATA_API_KEYS.",
    )
    allow_anonymous: bool = Field(False, description="Serve without keys (local experiments only).")
    key_limits: dict[str, RateLimit] = Field(
        default_factory=dict, description="Per key id (`key-...`, as in the audit log): a different rate limit."
    )


class AuditSettings(StrictModel):
    path: str = Field("logs/audit.jsonl", description="JSON lines, one per request; relative: under $STRATA_HOME.")
    log_prompts: bool = Field(False, description="Also record prompts and completions.")
    max_bytes: int = Field(
        100 * 2**20, gt=0, description="The file rotates at this size: PATH is renamed PATH.1, PATH.1 PATH.2, ..."
    )
    backup_count: int = Field(10, gt=0, description="Rotated files kept; the oldest beyond them is deleted.")


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
    router_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per router replica, e.g. {driver: 0.1}."
    )
    experiment: str | None = Field(
        None,
        description="Names this A/B experiment and salts its sticky assignment, so each experiment draws its own "
        "users for each variant. Default: the variants' names and models (new versions, a new experiment).",
    )

    @model_validator(mode="after")
    def _variants_and_weights(self) -> ServeConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        validate_weights(self.initial_weights, names)
        for members in replica_groups(self.variants).values():
            check_replica_group(members)
        return self

    @model_validator(mode="after")
    def _burst_per_router_replica(self) -> ServeConfig:
        limits = {"auth": self.auth} | {f"auth.key_limits.{kid}": limit for kid, limit in self.auth.key_limits.items()}
        for where, limit in limits.items():
            if limit.burst < self.router_replicas:
                raise ValueError(
                    f"{where}.burst ({limit.burst}) must be at least router_replicas ({self.router_replicas}): "
                    "each router replica admits its share of the burst"
                )
        return self

    @property
    def initial_weights(self) -> dict[str, float]:
        return self.weights or {v.name: 1.0 for v in self.variants}

    @property
    def split_salt(self) -> str:
        """What seeds the sticky assignment: the experiment's name, else its variants (in no particular order)."""
        return self.experiment or ",".join(sorted(f"{v.name}={v.model}+{v.adapter or ''}" for v in self.variants))
