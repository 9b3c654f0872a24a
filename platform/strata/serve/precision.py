"""The numbers a replica computes in: its dtype (`auto` decided by the hardware at load) and weight-only quantisation.

Measured on this machine's CPU (AVX512-BF16, one thread, batch 32, a 384x1024 linear): fp32 0.50 ms, bf16 0.21 ms,
int8 weights dequantised to bf16 per call 0.29 ms, bitsandbytes' Linear8bitLt 0.40 ms (and 2.3x fp32 at batch 1:
LLM.int8 also quantises the activations), bitsandbytes nf4 0.34 ms. So int8 is torch-native weight-only (below) and
nf4 is bitsandbytes' `Linear4bit`, the one well-kept nf4 kernel there is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from strata.config import VariantConfig
from strata.models.cpu_features import cpu_instructions

logger = logging.getLogger("ray.serve")  # a replica's own log file


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str  # why this dtype, for the log and the replica's info


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """`auto`: bf16 on a GPU and on a CPU with native bf16, else fp32. An explicit dtype is taken as it is."""
    if setting != "auto":
        return Precision(getattr(torch, setting), f"dtype: {setting} in the variant's engine settings")
    if device.type == "cuda":
        return Precision(torch.bfloat16, "auto: bf16 on a GPU")
    instructions = cpu_instructions()
    if instructions:
        return Precision(torch.bfloat16, f"auto: the CPU has {instructions}")
    return Precision(torch.float32, "auto: the CPU lacks AVX512-BF16 and AMX (bf16 would be emulated)")


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one absmax scale per output row, dequantised to the input's dtype at each
    call: a quarter of fp32's weight memory, the activations untouched."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", (weight / scale).round().to(torch.int8))
        self.register_buffer("scale", scale.to(compute_dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(compute_dtype), False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, quant_type="nf4"
    )
    layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.to(linear.weight.device)  # moving the weight is what quantises it


def quantize_for_serving(model: nn.Module, scheme: str, compute_dtype: torch.dtype) -> int:
    """Weight-only `scheme` (none, int8, nf4) for every nn.Linear but the output head (the logits are where
    rounding shows most; transformers' bitsandbytes integration keeps it too) and for the fused MoE experts.
    Returns how many layers were quantised."""
    if scheme == "none":
        return 0
    from strata.models.quantized_experts import quantize_experts

    make = Int8Linear if scheme == "int8" else nf4_linear
    head = model.get_output_embeddings()
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    for name, linear in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(linear, compute_dtype))
    return len(linears) + quantize_experts(model, scheme, compute_dtype)


def to_serving_precision(model: nn.Module, variant: VariantConfig, device: torch.device) -> tuple[nn.Module, dict]:
    """The model on `device` in the variant's dtype and quantisation, and what was chosen and why (also logged)."""
    precision = resolve_precision(variant.engine.dtype, device)
    model = model.to(device=device, dtype=precision.dtype).eval()
    layers = quantize_for_serving(model, variant.engine.quantization, precision.dtype)
    kernels = brgemm_kernels(model) if variant.engine.quantization == "none" else "torch's (quantised weights)"
    dtype = str(precision.dtype).removeprefix("torch.")
    logger.info(
        "variant %s computes in %s (%s); quantization %s (%d layers); kernels: %s",
        *(variant.name, dtype, precision.reason, variant.engine.quantization, layers, kernels),
    )
    return model, {
        "dtype": dtype,
        "dtype_reason": precision.reason,
        "quantization": variant.engine.quantization,
        "kernels": kernels,
    }


def brgemm_kernels(model: nn.Module) -> str:
    """A bf16 model on a CPU with AMX or AVX512-BF16 runs on Strata's prepacked brgemm kernels; says which kernels it
    runs on."""
    from strata.models.brgemm_bf16 import use_brgemm_bf16  # model code, as quantize_for_serving's: not for deploy time

    reason, layers = use_brgemm_bf16(model)
    if reason:
        return f"torch's (brgemm not used: {reason})"
    return f"brgemm on {cpu_instructions()} ({layers} layers prepacked)"
