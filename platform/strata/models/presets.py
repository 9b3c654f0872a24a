"""The one function that builds a model: a named MoE preset on transformers' Qwen3-MoE, or a pretrained one.

A preset (`strata.config.model.PRESETS`) is a plain dict of `Qwen3MoeConfig` fields; the vocabulary comes from the
tokenizer. Qwen3-MoE has no shared expert (Qwen2-MoE does); its router load-balancing loss is weighted by
`router_aux_loss_coef`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from strata.config import ConfigError, DataConfig, ModelConfig
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
    resize_embeddings: bool = False,
) -> PreTrainedModel:
    """A preset with fresh seeded weights, or a pretrained model from a local directory or hub id, with the
    tokenizer's special ids; `resize_embeddings` resizes a pretrained model's embeddings to `vocab_size`."""
    if name in PRESETS:
        torch.manual_seed(seed)
        return Qwen3MoeForCausalLM(preset_config(name, vocab_size, special_ids, **(overrides or {})))
    known_ids = {key: value for key, value in special_ids.items() if value is not None}
    config = AutoConfig.from_pretrained(name, **known_ids, **(overrides or {}))
    model = AutoModelForCausalLM.from_pretrained(name, config=config)
    if resize_embeddings and model.config.vocab_size != vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def vocabulary_mismatch(name: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why the pretrained model `name` cannot take `tokenizer`'s token ids as they are, or None if it can: its
    embedding rows must be at least as many, and mean the same tokens (its own tokenizer, where it has one)."""
    rows, size = AutoConfig.from_pretrained(name).vocab_size, len(tokenizer)
    if rows < size:
        return f"it has {rows} embedding rows, fewer than the tokenizer's {size} tokens"
    own = None
    # A directory without tokenizer files would get an empty default tokenizer of its model type.
    if not Path(name).is_dir() or (Path(name) / "tokenizer_config.json").exists():
        with contextlib.suppress(OSError, ValueError):
            own = AutoTokenizer.from_pretrained(name)
    if own is None:  # weights without a tokenizer: only the sizes can be compared
        return None if rows == size else f"it has a {rows}-token vocabulary, the tokenizer {size} tokens"
    if own.get_vocab() != tokenizer.get_vocab():
        return f"its own {len(own)}-token tokenizer gives tokens other ids than the {size}-token tokenizer"
    return None


def check_tokenizer_fits(model: ModelConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Before any Ray work: a pretrained `model.name` must take the tokenizer's ids, unless asked to resize."""
    if model.name in PRESETS or model.resize_embeddings:
        return
    reason = vocabulary_mismatch(model.name, tokenizer)
    if reason is None:
        return
    origin = (
        f"data.tokenizer={data.tokenizer}"
        if data.tokenizer
        else f"trained on data.source_dir with data.vocab_size={data.vocab_size}"
    )
    raise ConfigError(
        f"model.name {model.name!r} does not fit the tokenizer ({origin}): {reason}. Set data.tokenizer to the "
        "model's own tokenizer, or model.resize_embeddings: true to resize its embeddings to the tokenizer."
    )


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
