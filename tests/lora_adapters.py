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


def misfit_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """A copy of an adapter whose last adapted layer's B has 8 output rows more than the base's layer: what an adapter
    of another base looks like to this one, found only when its factors meet the base's layers."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, out_dir)
    weights = load_file(str(out_dir / "adapter_model.safetensors"))
    last_b = sorted(key for key in weights if key.endswith(".lora_B.weight"))[-1]
    weights[last_b] = torch.cat([weights[last_b], torch.ones(8, weights[last_b].shape[1])])
    save_file(weights, str(out_dir / "adapter_model.safetensors"))
    return out_dir
