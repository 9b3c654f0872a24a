"""The one function that builds a model: a named MoE preset on transformers' Qwen3-MoE, or a pretrained one.

A preset (`strata.config.model.PRESETS`) is a plain dict of `Qwen3MoeConfig` fields; the vocabulary comes from the
tokenizer. Qwen3-MoE has no shared expert (Qwen2-MoE does); its router load-balancing loss is weighted by
`router_aux_loss_coef`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from strata.config.model import COMMON, PRESETS


def preset_config(name: str, vocab_size: int, special_ids: dict[str, int], **overrides: Any) -> Qwen3MoeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {**COMMON, **PRESETS[name], **overrides}
    return Qwen3MoeConfig(vocab_size=vocab_size, **special_ids, **fields)


def build_model(
    name: str,
    vocab_size: int,
    special_ids: dict[str, int],
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A preset with fresh seeded weights, or a pretrained model from a local directory or hub id."""
    if name in PRESETS:
        torch.manual_seed(seed)
        return Qwen3MoeForCausalLM(preset_config(name, vocab_size, special_ids, **(overrides or {})))
    config = AutoConfig.from_pretrained(name, **(overrides or {}))
    return AutoModelForCausalLM.from_pretrained(name, config=config)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and per-token active parameters (only top-k of the experts run for each token)."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not experts:
        return {"total": total, "active": total}
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or n.endswith("experts"))
    active = total - expert_params + expert_params * config.num_experts_per_tok // experts
    return {"total": total, "active": active}
