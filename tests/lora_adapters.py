"""Small random LoRA adapters of the tiny MoE, made in-process: B is initialised nonzero, so each changes the model."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def make_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_options) -> Path:
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]} | lora_options
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(init_lora_weights=False, **options)
    )
    model.save_pretrained(out_dir)
    return out_dir
