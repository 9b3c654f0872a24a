"""Which model to build: the MoE presets (plain Qwen3-MoE config fields), a local directory or a hub id.

The preset table lives here, not beside the model code, so that validating a config needs no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from strata.config.base import StrictModel

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


def validate_model_name(name: str) -> str:
    """A preset name, an existing transformers directory (made absolute) or a hub id; else a ValueError."""
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
    resize_embeddings: bool = Field(
        False,
        description="A pretrained model whose vocabulary is not the tokenizer's: resize its embeddings to the "
        "tokenizer (rows then stand for other tokens and must be relearned) instead of failing at start.",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return validate_model_name(name)
