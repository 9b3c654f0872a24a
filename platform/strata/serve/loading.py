"""Loading a model version for serving: from the MLflow registry or a directory, optionally with a LoRA adapter."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from strata.config import VariantConfig
from strata.registry import resolve_model
from strata.serve.adapter_sources import fetched_adapter
from strata.serve.precision import to_serving_precision

T = TypeVar("T")


def load_for_serving(variant: VariantConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, str]]:
    """The model (eval mode, on the GPU if there is one, in the variant's precision), its tokenizer, and what it is
    (registry tags, dtype and quantisation)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = resolve_model(variant.model)
    if variant.adapter:
        from strata.models.adapters import merged_model  # peft: seconds to import, for adapter variants only

        with fetched_adapter(variant.adapter) as adapter_dir:
            model = merged_model(base.directory, "lora", adapter_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(base.directory)
    model, precision = to_serving_precision(model, variant, device)
    model.config.output_router_logits = False  # router logits feed training losses only
    tokenizer = AutoTokenizer.from_pretrained(base.directory)
    info = {**base.tags, **({"adapter": variant.adapter} if variant.adapter else {}), **precision}
    return model, tokenizer, info


def on_passing_thread(work: Callable[[], T]) -> T:
    """Run `work` (loading weights, adding an adapter) on a thread that ends with it, and its OpenMP threads too.
    libgomp spins only briefly before sleeping once a process holds more OpenMP threads than CPUs: a team left on
    the loading thread made each engine loop's team sleep and wake at every parallel region (2 cores, `small` in
    bf16, 32 rows on 2 threads, in-process: ~560 tokens/s against ~850 with the loading thread gone)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="strata-load") as pool:
        return pool.submit(work).result()
