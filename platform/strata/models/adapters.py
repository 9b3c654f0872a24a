"""Fine-tuning methods as options of one path: full, LoRA (peft) and QLoRA (peft on a bitsandbytes NF4 base).

QLoRA is LoRA with `quantize_base=True`: the frozen base's linear layers are loaded as 4-bit NF4 with double
quantisation (compute in bf16 on GPU, fp32 on CPU). Qwen3-MoE keeps its experts as fused 3-D parameters,
not nn.Linear, so bitsandbytes leaves them alone; `quantize_experts` (on by default) stores them as NF4 too
(`strata.models.quantized_experts`), and LoRA still reaches them through peft's `target_parameters`
(e.g. `mlp.experts.gate_up_proj`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from strata.config import LoraSettings
from strata.models import quantized_experts

ADAPTER_DIR = "adapter"


def qlora_dtype(on_gpu: bool) -> torch.dtype:
    """What QLoRA loads the base in, quantises it from and computes in: bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if on_gpu else torch.float32


def quantization_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def load_base(
    directory: str, method: str, device: torch.device, quantize_experts: bool = True, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The base to train or merge into: fp32, or for QLoRA quantised to NF4 from `dtype` (default: `qlora_dtype`
    of `device`)."""
    if method == "qlora":
        dtype = dtype or qlora_dtype(device.type == "cuda")
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            quantization_config=quantization_config(dtype),
            dtype=dtype,  # the unquantised rest (embeddings, norms, router)
            device_map={"": device},
        )
        if quantize_experts:
            quantized_experts.quantize_experts(model, "nf4", dtype)
        return model
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        target_parameters=settings.target_parameters or None,
        use_rslora=settings.use_rslora,
        task_type="CAUSAL_LM",
    )


def trainable_model(
    directory: str,
    method: str,
    settings: LoraSettings,
    device: torch.device,
    gradient_checkpointing: bool = False,
    adapter_dir: str | None = None,
    quantize_experts: bool = True,
) -> PreTrainedModel:
    """The model to train: the full model, or the frozen base with a (new or resumed) LoRA adapter."""
    model = load_base(directory, method, device, quantize_experts)
    if method == "full":
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    if method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(settings))
    quantized_experts.keep_out_of_ddp(model)
    return model


def merged_model(
    directory: str, method: str, adapter_dir: str, quantize_experts: bool = True, trained_on_gpu: bool = False
) -> PreTrainedModel:
    """Base + adapter folded into plain fp32 weights; for QLoRA into the *dequantised* 4-bit base it trained on,
    quantised here on the CPU from what training quantised it from (bf16 where it trained on a GPU: an fp32 base
    rounded to bf16 first, as training saw it, embeddings and norms too)."""
    cpu = torch.device("cpu")
    base = load_base(directory, method, cpu, quantize_experts, qlora_dtype(trained_on_gpu))
    if method == "qlora":
        base = base.dequantize()
        quantized_experts.dequantize_experts(base)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config  # the export is a plain fp32 model
    return merged.to(torch.float32)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit weights at full size
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def save_trained(model: torch.nn.Module, directory: Path, method: str) -> None:
    """Checkpoint only what training changes: the adapter for LoRA/QLoRA, everything for full fine-tuning."""
    model = getattr(model, "module", model)
    model.save_pretrained(directory / (ADAPTER_DIR if method != "full" else "model"))
