"""Which native bf16 instructions this CPU has: what `dtype: auto` and the brgemm kernels both decide on."""

from __future__ import annotations

import torch


def cpu_instructions() -> str | None:
    """The CPU's native bf16 matmul instructions (AMX, else AVX512-BF16), or None: oneDNN would emulate bf16, slower
    than fp32, and the brgemm kernels cannot run."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None
