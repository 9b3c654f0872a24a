"""bf16 CPU inference on oneDNN's brgemm micro-kernel: linear layers and MoE experts, weights prepacked.

brgemm runs on AMX (Sapphire Rapids and later) and on AVX512-BF16 (Cooper Lake, AMD Zen 4 and later). At decode, on
those CPUs, a bf16 aten::mm costs a fixed ~45-100 us a call whatever the rows, more than fp32's: a batch of 32 tokens
sends most of a layer's experts 1-8 rows, and transformers' experts loop runs three such calls an expert plus the
gathers and adds between them. So bf16 decoded little or no faster than fp32 (on `small`, one thread, 32 rows, on an
AVX512-BF16 EPYC: a decode step ~50 ms in bf16 on torch's kernels, ~60 in fp32, ~20 on these). `csrc/brgemm_bf16.cpp`
packs each weight once for torch's brgemm (the micro-kernel inductor and sglang's CPU kernels use) and runs
  - a linear layer as one call (`BrgemmLinear`; Qwen3-MoE's router too, `BrgemmTopKRouter`);
  - a whole MoE layer as one call: rows sorted by expert, gate_up, SiLU-and-mul and down for every expert, each
    token's top-k outputs summed in fp32 (registered as transformers' experts implementation `strata_brgemm_bf16`);
both with the GIL released.

The extension is built on first use (torch's cpp_extension, cached under TORCH_EXTENSIONS_DIR; `make setup` builds
it) and used only where it applies: inference, a CPU with AMX or AVX512-BF16, bf16 weights without LoRA on them.
Anywhere else, or if the build fails, the model stays on torch's and transformers' own kernels and the reason is
returned.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import PretrainedConfig, PreTrainedModel
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from strata.models.cpu_features import cpu_instructions
from strata.models.quantized_experts import EXPERT_PARAMS, fused_experts_modules

IMPLEMENTATION = "strata_brgemm_bf16"
SOURCE = Path(__file__).parent / "csrc" / "brgemm_bf16.cpp"
BLOCK = 32  # the kernels' column block: output sizes must be multiples of it
# AVX-512 is implied by AMX and AVX512-BF16, the only CPUs this is used on; brgemm itself dispatches inside libtorch.
CFLAGS = ["-O3", "-ffast-math", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]


@functools.cache
def kernel() -> ModuleType:
    """The compiled extension, built once per source, flags and environment (its torch headers). The source is
    copied into its build directory first, named by that hash: a Ray worker imports Strata from a per-job copy, and
    a build from another path would rebuild it.

    A finished build is imported as it is, without asking ninja whether it is up to date: the name already says
    what it was built from, and two ninjas (pip's, on the venv's PATH, and the system's) do not read each other's
    build log, so each rebuilt after the other (~40 s on 2 cores, inside a replica's start)."""
    from torch.utils.cpp_extension import get_default_build_root, load

    source = SOURCE.read_bytes()
    key = source + " ".join([*CFLAGS, sys.prefix, torch.__version__]).encode()
    name = "strata_brgemm_bf16_" + hashlib.sha256(key).hexdigest()[:12]
    directory = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name  # as torch's
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / SOURCE.name
    if not copy.exists():
        partial = directory / f"{SOURCE.name}.{os.getpid()}"
        partial.write_bytes(source)
        partial.replace(copy)  # atomic: processes starting together never see half a file
    built = directory / f"{name}.so"
    if built.exists() and not (directory / "lock").exists():  # torch's lock is there while a build runs
        with contextlib.suppress(ImportError, OSError):  # an unusable file: `load` builds it again
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return load(name=name, sources=[str(copy)], extra_cflags=CFLAGS, build_directory=str(directory), verbose=False)


def build_where_used() -> str:
    """Build the kernels ahead of the first replica (`make setup`) on a CPU that would use them."""
    instructions = cpu_instructions()
    if instructions is None:
        return "bf16 brgemm kernels: not built (this CPU has neither AMX nor AVX512-BF16; bf16 serves on torch's own)"
    started = time.perf_counter()
    kernel()
    return f"bf16 brgemm kernels: ready for {instructions} ({time.perf_counter() - started:.0f} s)"


class BrgemmLinear(nn.Module):
    """A bias-free bf16 linear layer with its weight packed for brgemm."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", kernel().pack_weight(linear.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        return kernel().linear(rows, self.packed_weight).view(*x.shape[:-1], self.out_features)

    def pack_lora(self, lora_a: torch.Tensor, lora_b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked LoRA factors, A (rank, in) and B transposed (rank, out), in bf16 and packed for `with_lora`, the
        rank padded with zeros to the kernels' column block."""
        pad = -lora_a.shape[0] % BLOCK
        a = F.pad(lora_a, (0, 0, 0, pad)).bfloat16()
        b = F.pad(lora_b_t.T, (0, pad)).bfloat16()  # (out, padded rank): packed as a weight of `rank` inputs
        return kernel().pack_weight(a), kernel().pack_weight(b.contiguous())

    def with_lora(self, x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """x @ W.T + ((x @ A.T) * mask) @ B.T in one call, every matmul on brgemm: stacked adapters' factors
        (`pack_lora`, `serve/mixed_lora.py`), `mask` (x.shape[0], rank) keeping each sequence's adapter's columns."""
        rows = x.reshape(-1, self.in_features).contiguous()
        out = kernel().lora_linear(rows, self.packed_weight, *lora, mask)
        return out.view(*x.shape[:-1], self.out_features)


class BrgemmTopKRouter(Qwen3MoeTopKRouter):
    """Qwen3-MoE's top-k router with its matmul on brgemm, the expert count padded to the 32-column block (16
    experts are otherwise the one matmul of a decode step left on torch's ~80 us bf16 floor). A subclass, so
    transformers still records its logits where asked to."""

    def __init__(self, router: Qwen3MoeTopKRouter, config: PretrainedConfig):
        super().__init__(config)
        del self.weight  # the packed copy replaces it
        padded = F.pad(router.weight.detach(), (0, 0, 0, -self.num_experts % BLOCK))
        self.register_buffer("packed_weight", kernel().pack_weight(padded))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `Qwen3MoeTopKRouter.forward`, but for where the logits come from."""
        rows = hidden_states.reshape(-1, self.hidden_dim).contiguous()
        router_logits = kernel().linear(rows, self.packed_weight)[:, : self.num_experts]
        probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index


def brgemm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    return kernel().fused_experts(
        hidden_states.contiguous(), top_k_index, top_k_weights.float(), self.gate_up_packed, self.down_packed
    )


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, brgemm_experts_forward)


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with plain fused 3-D expert weights (quantised experts keep their own implementation)."""
    return [m for m in fused_experts_modules(model) if not any(hasattr(m, f"{n}_quantized") for n in EXPERT_PARAMS)]


def _packable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """bf16, bias-free linear layers of kernel-sized shapes whose weight no other module shares (a tied output
    head keeps the embedding's)."""
    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[parameter.data_ptr()] = owners.get(parameter.data_ptr(), 0) + 1
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and m.bias is None
        and m.weight.dtype == torch.bfloat16
        and m.out_features % BLOCK == 0
        and m.in_features % 2 == 0
        and owners[m.weight.data_ptr()] == 1
    ]


def _carries_peft_layers(model: nn.Module) -> bool:
    """Without importing peft (seconds at a replica's start): a model whose process never imported it has none."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and any(isinstance(m, tuners.BaseTunerLayer) for m in model.modules())


def brgemm_unavailable(model: PreTrainedModel) -> str | None:
    """Why the brgemm kernels cannot run `model`, or None if they can."""
    if model.device.type != "cpu":
        return f"the model is on {model.device.type}; they are CPU kernels"
    if cpu_instructions() is None:
        return "they need a CPU with AMX or AVX512-BF16"
    if model.dtype != torch.bfloat16:
        return f"the model is {str(model.dtype).removeprefix('torch.')}, not bfloat16"
    if _carries_peft_layers(model):
        return "the model carries peft adapters (merge them first)"
    for module in _experts_modules(model):
        if any(parametrize.is_parametrized(module, n) for n in EXPERT_PARAMS):
            return "LoRA is parametrized onto the experts"
        for name in EXPERT_PARAMS:
            weight = module._parameters[name]
            if weight.shape[1] % BLOCK or weight.shape[2] % 2:
                return f"expert weight shape {tuple(weight.shape)} is not a multiple of {BLOCK} (out) and 2 (in)"
    try:
        kernel()
    except Exception as err:  # no compiler, or a failed build: torch's own kernels still work
        return f"the kernels did not build ({type(err).__name__}: {str(err)[-300:]})"
    return None


def use_brgemm_bf16(model: PreTrainedModel) -> tuple[str | None, int]:
    """Run `model`'s linear layers and experts on the brgemm kernels, each packed weight in place of the original (the
    model is for inference from then on). Returns why not (or None) and how many layers now do."""
    reason = brgemm_unavailable(model)
    if reason:
        return reason, 0
    linears = _packable_linears(model)
    for name, linear in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, BrgemmLinear(linear))
    routers = [(n, m) for n, m in model.named_modules() if type(m) is Qwen3MoeTopKRouter]
    for name, router in routers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, BrgemmTopKRouter(router, model.config))
    experts = _experts_modules(model)
    for module in experts:
        for name in EXPERT_PARAMS:
            weight = module._parameters.pop(name)
            module.register_buffer(name.replace("_proj", "_packed"), kernel().pack_weight(weight.detach()))
    if experts:
        model.config._experts_implementation = IMPLEMENTATION
    return None, len(linears) + len(routers) + len(experts)
