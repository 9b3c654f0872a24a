"""Named MoE model presets on transformers' Qwen3-MoE architecture, and the one function that builds a model.

A preset is a plain dict of `Qwen3MoeConfig` fields; the vocabulary comes from the tokenizer. Qwen3-MoE has
no shared expert (Qwen2-MoE does); its router load-balancing loss is weighted by `router_aux_loss_coef`.
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

PRESETS: dict[str, dict[str, Any]] = {
    # ~2M parameters: CPU tests and the demo.
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    ),
    # ~48M total parameters (~11M active): a single GPU, or a patient CPU.
    "small": dict(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1024,
        moe_intermediate_size=384,
        num_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
    ),
    # ~1B total parameters (~0.23B active) with a 32k vocabulary: GPU clusters.
    "moe-1b": dict(
        hidden_size=1024,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=2816,
        moe_intermediate_size=512,
        num_experts=32,
        num_experts_per_tok=4,
        max_position_embeddings=4096,
    ),
}

COMMON: dict[str, Any] = dict(
    decoder_sparse_step=1,  # every layer is MoE
    norm_topk_prob=True,
    router_aux_loss_coef=0.01,
    output_router_logits=True,  # adds the load-balancing loss to the training loss
    tie_word_embeddings=False,
    rope_theta=10000.0,
)


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
