"""Model FLOPs utilisation (MFU): the training FLOPs a run's tokens/s stands for, over what its GPUs could do.

FLOPs per token follow PaLM's appendix B: 6 x the weights a token passes through, plus 12 x layers x hidden x
sequence length for attention. For an MoE a token passes through the attention, the router and `top_k` of each
layer's experts, so only those count: the active parameters, not the total. Embeddings do no matmul and are left
out; the LM head stays in. Fine-tuning counts the same 6x (the usual MFU convention), though LoRA skips most
weight gradients. Peak throughput is the GPU's dense bf16 tensor-core rate from its
datasheet; on another device (a CPU, a GPU not in the table) there is no MFU.
"""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core TFLOP/s per GPU, from NVIDIA's datasheets; the first matching name wins.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of `device`, if it is a GPU in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for gpu, tflops in PEAK_BF16_TFLOPS.items() if gpu in name), None)


def active_parameters(config) -> int:
    """Weights one token's forward pass multiplies by, from a Qwen3-MoE (or dense Qwen3/Llama-style) config: read
    from the config rather than the parameters, so a DDP, peft or 4-bit wrapping does not change the count."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    attention = 2 * hidden * config.num_attention_heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    experts = getattr(config, "num_experts", 0)
    dense_mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    sparse_mlp = 3 * hidden * getattr(config, "moe_intermediate_size", 0) * getattr(config, "num_experts_per_tok", 0)
    sparse_mlp += hidden * experts  # the router
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    total = 0
    for layer in range(layers):
        sparse = experts > 0 and layer not in dense_only and (layer + 1) % step == 0
        total += attention + (sparse_mlp if sparse else dense_mlp)
    return total + hidden * config.vocab_size  # the LM head


def training_flops_per_token(config, seq_len: int) -> float:
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * active_parameters(config) + attention


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float, devices: int) -> float:
    """The fraction of the devices' peak that `tokens_per_s` (across all of them) stands for."""
    return tokens_per_s * flops_per_token / (peak_per_device * devices)
