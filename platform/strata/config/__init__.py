"""Typed job configuration, one module per job on the loader's shared machinery (`base`).

    base      StrictModel, ConfigError, load_config (YAML + `--set a.b=value`), dump_config
    model     the MoE presets and the model a job builds
    training  the sections pretraining and fine-tuning share (optim, checkpoint, scaling, tracking)
    pretrain  PretrainConfig and its data section
    finetune  FinetuneConfig, LoRA settings and SFT data
    serve     ServeConfig: variants, engine, autoscaling, auth, audit
    release   PromotionGates: what a version must show before a release track (registry alias) moves to it
    canary    CanaryConfig: a canary release's steps, bake times and thresholds
    tune      TuneConfig: a sweep over a job config (imported from `strata.config.tune`: it loads the job schemas)

Validating a config imports neither torch nor transformers.
"""

from strata.config.base import ConfigError, StrictModel, dump_config, load_config
from strata.config.canary import CanaryConfig, CanaryThresholds
from strata.config.finetune import FinetuneConfig, LoraSettings, SFTDataConfig
from strata.config.model import PRESETS, ModelConfig
from strata.config.pretrain import DataConfig, PretrainConfig, stdlib_source_dir
from strata.config.release import TRACKS, PromotionGates
from strata.config.serve import (
    AuditSettings,
    AuthSettings,
    AutoscalingSettings,
    EngineSettings,
    RateLimit,
    ServeConfig,
    VariantConfig,
    check_replica_group,
    replica_groups,
)
from strata.config.training import CheckpointConfig, OptimConfig, ScalingConfig, TrackingConfig

__all__ = [
    "check_replica_group",
    "replica_groups",
    "PRESETS",
    "TRACKS",
    "CanaryConfig",
    "CanaryThresholds",
    "AuditSettings",
    "AuthSettings",
    "AutoscalingSettings",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EngineSettings",
    "FinetuneConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "PromotionGates",
    "RateLimit",
    "SFTDataConfig",
    "ScalingConfig",
    "ServeConfig",
    "StrictModel",
    "TrackingConfig",
    "VariantConfig",
    "dump_config",
    "load_config",
    "stdlib_source_dir",
]
