"""4-bit (NF4, double quantisation) and 8-bit expert weights for MoE models that fuse their experts into 3-D params.

transformers keeps Qwen3-MoE's experts as `gate_up_proj` (experts, 2*inter, hidden) and `down_proj`
(experts, hidden, inter) parameters; bitsandbytes only quantises nn.Linear, so those stay in full precision and they
are most of an MoE's bytes. Here each expert matrix is quantised on its own (NF4 through bitsandbytes, int8 as
per-row absmax) and the experts run through transformers' experts-implementation dispatch, dequantising one expert at
a time (or, for an int8 expert given a few rows in CPU inference, multiplying by its int8 weights directly). Backward
dequantises again instead of keeping the full-precision weight alive.

peft's `target_parameters` LoRA keeps working: the fused parameter stays as a one-element placeholder of the right
shape, peft registers its LoRA parametrization on it as usual, and the forward here reads the low-rank factors from
that parametrization and applies them per expert as `x @ A_e.T @ B_e.T`, never the full-size delta. peft registers
its parametrization at every forward, and torch checks a new one by running it once: on a placeholder that computed
`W + scaling * lhs @ rhs` at the full (experts, out, in) size, in fp32, per expert parameter per layer, for nothing
(nothing reads it). So on placeholders the check is skipped (`register_parametrization` below).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from transformers import PreTrainedModel
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
IMPLEMENTATION = "strata_quantized"
NF4_BLOCKSIZE = 64
# Below this many rows an int8 expert runs as torch's int8-weight matmul (CPU), its weights never dequantised: at 8
# rows 63 us against 182 us for dequantise + bf16 linear (768x384, 2 cores); from ~28 rows the bf16 kernel wins.
INT8_MATMUL_MAX_ROWS = 24


class QuantizedExpertWeight(nn.Module):
    """One fused (experts, out, in) weight, quantised expert by expert; `dequantize(e)` gives expert e back."""

    def __init__(self, weight: torch.Tensor, scheme: Literal["nf4", "int8"], compute_dtype: torch.dtype):
        super().__init__()
        self.scheme = scheme
        self.shape = tuple(weight.shape)
        self.compute_dtype = compute_dtype
        weight = weight.detach()
        if scheme == "int8":
            scale = weight.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
            self.register_buffer("data", torch.round(weight / scale).to(torch.int8))
            self.register_buffer("scale", scale.to(compute_dtype))
            return
        if scheme != "nf4":
            raise ValueError(f"scheme must be 'nf4' or 'int8', not {scheme!r}")
        import bitsandbytes.functional as bnb  # only for nf4: it costs every process that imports this ~1 s

        quantized = [
            bnb.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4") for w in weight
        ]
        packed, states = [q[0] for q in quantized], [q[1] for q in quantized]
        self.register_buffer("data", torch.stack(packed))
        self.register_buffer("absmax", torch.stack([s.absmax for s in states]))  # uint8, itself quantised
        self.register_buffer("offset", torch.stack([s.offset for s in states]))
        self.register_buffer("absmax2", torch.stack([s.state2.absmax for s in states]))
        self.register_buffer("code", states[0].code)
        self.register_buffer("code2", states[0].state2.code)
        self.blocksize2 = states[0].state2.blocksize

    def dequantize(self, expert: int) -> torch.Tensor:
        if self.scheme == "int8":
            return self.data[expert].to(self.compute_dtype) * self.scale[expert]
        import bitsandbytes.functional as bnb

        nested = bnb.QuantState(
            absmax=self.absmax2[expert], code=self.code2, blocksize=self.blocksize2, dtype=torch.float32
        )
        state = bnb.QuantState(
            absmax=self.absmax[expert],
            shape=torch.Size(self.shape[1:]),
            code=self.code,
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=self.compute_dtype,
            offset=self.offset[expert],
            state2=nested,
        )
        return bnb.dequantize_4bit(self.data[expert], state)

    def int8_matmul_fits(self, x: torch.Tensor) -> bool:
        """Whether `x @ W_e.T` can run on the int8 weights as they are: CPU inference on a few rows."""
        return (
            self.scheme == "int8"
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and x.shape[0] <= INT8_MATMUL_MAX_ROWS
        )

    def int8_linear(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.data[expert], self.scale[expert, :, 0].to(x.dtype))

    def dequantize_all(self) -> torch.Tensor:
        return torch.stack([self.dequantize(e) for e in range(self.shape[0])])


class _DequantizedLinear(torch.autograd.Function):
    """x @ W_e.T with W_e dequantised in forward and again in backward; no full-precision weight is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedExpertWeight, expert: int) -> torch.Tensor:
        ctx.weight, ctx.expert = weight, expert
        return F.linear(x, weight.dequantize(expert).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.dequantize(ctx.expert).to(grad.dtype), None, None


def _expert_linear(experts: nn.Module, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's projection: the quantised base plus any LoRA peft has parametrised onto the fused parameter."""
    quantized = getattr(experts, f"{name}_quantized")
    if quantized.int8_matmul_fits(x):
        out = quantized.int8_linear(x, expert)
    else:
        out = _DequantizedLinear.apply(x, quantized, expert)
    if not parametrize.is_parametrized(experts, name):
        return out
    for proxy in experts.parametrizations[name]:
        if hasattr(proxy, "lhs"):  # peft's factor proxy: W + scaling * lhs @ rhs, (experts, out, r) @ (experts, r, in)
            out = out + proxy.scaling * F.linear(
                F.linear(x, proxy.rhs[expert].to(x.dtype)), proxy.lhs[expert].to(x.dtype)
            )
        elif hasattr(proxy, "delta_weight"):  # several adapters at once: peft hands over the summed full delta
            out = out + F.linear(x, proxy.delta_weight[expert].to(x.dtype))
        else:
            raise TypeError(f"unsupported parametrization {type(proxy).__name__} on quantised {name}")
    return out


def quantized_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Qwen3-MoE's eager experts loop, with each expert's weights dequantised only while it runs."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit[:, 0].tolist():
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        state = hidden_states[token_idx]
        gate, up = _expert_linear(self, "gate_up_proj", state, expert).chunk(2, dim=-1)
        state = _expert_linear(self, "down_proj", self.act_fn(gate) * up, expert)
        state = state * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, state.to(final.dtype))
    return final


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, quantized_experts_forward)


def _unchecked_on_placeholders(register):
    """torch's `register_parametrization`, with `unsafe` (no trial run at full size) where the tensor is a quantised
    experts' placeholder; every other call as it was."""

    @functools.wraps(register)
    def register_parametrization(module: nn.Module, tensor_name: str, parametrization: nn.Module, *, unsafe=False):
        placeholder = isinstance(getattr(module, f"{tensor_name}_quantized", None), QuantizedExpertWeight)
        return register(module, tensor_name, parametrization, unsafe=unsafe or placeholder)

    return register_parametrization


parametrize.register_parametrization = _unchecked_on_placeholders(parametrize.register_parametrization)


def fused_experts_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that own fused 3-D expert weights (not peft's wrappers, which reach them through base_layer)."""
    return [m for m in model.modules() if all(n in m._parameters for n in EXPERT_PARAMS) and hasattr(m, "num_experts")]


def _placeholder(shape: tuple[int, ...], device: torch.device) -> nn.Parameter:
    """A one-element tensor seen at full shape: peft reads its shape, device and dtype (LoRA weights follow it, so
    fp32) and nothing reads its values. fp32 also keeps peft's kbit preparation from upcasting it to full size."""
    return nn.Parameter(torch.zeros((), device=device).expand(shape), requires_grad=False)


def quantize_experts(model: PreTrainedModel, scheme: Literal["nf4", "int8"], compute_dtype: torch.dtype) -> int:
    """Quantise every fused MoE expert weight in place; returns how many expert tensors were quantised."""
    if scheme not in ("nf4", "int8"):
        raise ValueError(f"scheme must be 'nf4' or 'int8', not {scheme!r}")
    count = 0
    for experts in fused_experts_modules(model):
        for name in EXPERT_PARAMS:
            if hasattr(experts, f"{name}_quantized"):
                continue  # quantised already: what is left is its placeholder
            weight = experts._parameters.pop(name)
            quantized = QuantizedExpertWeight(weight.to(compute_dtype), scheme, compute_dtype)
            experts.add_module(f"{name}_quantized", quantized)
            experts.register_parameter(name, _placeholder(quantized.shape, weight.device))
            count += 1
    if count and model.config._experts_implementation != IMPLEMENTATION:
        model.experts_implementation_before_quantization = model.config._experts_implementation
        model.config._experts_implementation = IMPLEMENTATION
    return count


def keep_out_of_ddp(model: nn.Module) -> None:
    """Tell DDP to leave the quantised experts alone: its start-up broadcast cannot write into a placeholder (one
    element seen at full size), and every rank quantises the same frozen base to the same bytes anyway."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, QuantizedExpertWeight):
            names += [f"{prefix}.{buffer}" for buffer, _ in module.named_buffers()]
            names.append(prefix.removesuffix("_quantized"))  # the placeholder next to it
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def dequantize_experts(model: PreTrainedModel) -> None:
    """Back to plain full-precision expert parameters (for merging an adapter and exporting)."""
    for experts in fused_experts_modules(model):
        for name in EXPERT_PARAMS:
            quantized = getattr(experts, f"{name}_quantized", None)
            if quantized is None:
                continue
            weight = nn.Parameter(quantized.dequantize_all(), requires_grad=False)
            del experts._modules[f"{name}_quantized"]
            experts._parameters[name] = weight
    if model.config._experts_implementation == IMPLEMENTATION:
        model.config._experts_implementation = getattr(model, "experts_implementation_before_quantization", "eager")
