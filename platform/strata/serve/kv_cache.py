"""The KV cache's memory budget and bookkeeping for the engine's running batch.

The batch's cache holds one row per sequence, all rows as long as the longest one (shorter ones left-padded), so
what it costs is rows x longest row, padding included. The engine admits requests while that, at its peak if every
request ran to its max_tokens, stays within `kv_cache_tokens`.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def cache_tokens_in(model: PreTrainedModel, gib: float) -> int:
    """How many tokens' keys and values, over all layers, fit in `gib` GiB at the model's dtype."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize
    return int(gib * 2**30) // per_token


def peak_cache_tokens(rows: list[tuple[int, int]]) -> int:
    """The most tokens a batch's KV cache will hold, padding included, if every row runs to its max_tokens.

    `rows` holds (length now, tokens still to come) per row. Rows are right-aligned, so the cache is as wide as its
    longest row, times the rows still in it: that product peaks just before some row leaves."""
    peak, longest = 0, 0
    for count, (length, remaining) in enumerate(sorted(rows, key=lambda row: -row[1]), start=1):
        longest = max(longest, length)
        peak = max(peak, count * (longest + remaining))
    return peak


def is_out_of_memory(err: Exception) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError saying it can't allocate memory."""
    message = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def stack_right_aligned(first: torch.Tensor, second: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """`first`'s rows, then `second`'s, in one zero-filled tensor `width` long in `dim`, each right-aligned.

    One copy of each: merging newcomers into the running batch copies its cache once, no more."""
    shape = list(first.shape)
    shape[0], shape[dim] = len(first) + len(second), width
    stacked = first.new_zeros(shape)
    stacked[: len(first)].narrow(dim, width - first.shape[dim], first.shape[dim]).copy_(first)
    stacked[len(first) :].narrow(dim, width - second.shape[dim], second.shape[dim]).copy_(second)
    return stacked
