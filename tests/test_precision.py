"""Serving precisions without Ray: what `auto` picks, bf16 and int8 replicas against fp32, bad combinations refused."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from strata.config import ServeConfig, VariantConfig
from strata.models.cpu_features import cpu_instructions
from strata.serve.precision import resolve_precision

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 7, 300, 12, 90, 91], [17, 18]]


def test_auto_is_bf16_on_a_gpu_and_on_a_cpu_with_native_bf16():
    native = cpu_instructions()
    auto = resolve_precision("auto", torch.device("cpu"))
    assert auto.dtype == (torch.bfloat16 if native else torch.float32)
    assert (native or "lacks") in auto.reason
    assert resolve_precision("auto", torch.device("cuda")).dtype == torch.bfloat16
    assert resolve_precision("float32", torch.device("cuda")).dtype == torch.float32


def greedy(model, max_tokens: int = 16) -> list[torch.Tensor]:
    """Each prompt with its greedy continuation."""
    with torch.inference_mode():
        return [
            model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_tokens, do_sample=False)[0]
            for ids in PROMPTS
        ]


def agreement(model, sequences: list[torch.Tensor]) -> float:
    """The share of the reference's greedy tokens that `model` picks too, given the same text before each: a
    random model's near-flat logits make free-running paths part at the first near-tie, and never meet again."""
    agree = total = 0
    with torch.inference_mode():
        for ids, sequence in zip(PROMPTS, sequences, strict=True):
            picks = model(sequence[None, :-1]).logits[0, len(ids) - 1 :].argmax(-1)
            agree += int((picks == sequence[len(ids) :]).sum())
            total += len(sequence) - len(ids)
    return agree / total


def weight_bytes(model: torch.nn.Module) -> int:
    """Each storage once: quantised experts leave a one-element placeholder seen at full shape."""
    tensors = (*model.parameters(), *model.buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_bf16_and_int8_replicas_agree_with_fp32_on_most_greedy_tokens(tiny_base):
    from strata.serve.loading import load_for_serving

    def load(dtype: str, quantization: str = "none"):
        engine = {"dtype": dtype, "quantization": quantization}
        model, _, info = load_for_serving(VariantConfig(name="stable", model=str(tiny_base), engine=engine))
        assert (info["dtype"], info["quantization"]) == (dtype, quantization)
        brgemm = dtype == "bfloat16" and quantization == "none" and cpu_instructions() is not None
        assert info["kernels"].startswith("brgemm on") == brgemm, info["kernels"]
        return model

    fp32 = load("float32")
    reference = greedy(fp32)
    assert agreement(fp32, reference) == 1.0
    for model in (load("bfloat16"), load("bfloat16", "int8")):
        # 'Most': this random model's logits are near ties everywhere; the trained one in
        # benchmarks/serve_precision.py agrees on about 98% of held-out tokens
        assert agreement(model, reference) >= 0.8
    # int8 holds the linear layers and experts in a byte per weight; the embeddings and output head stay bf16
    assert weight_bytes(model) < 0.45 * weight_bytes(fp32)


def test_float16_without_a_gpu_is_refused_by_the_config_naming_the_variant():
    """(nf4 on a node where bitsandbytes cannot run is refused at deploy: tests/test_deploy_cluster.py, on a real
    node whose bitsandbytes is broken.)"""
    variant = {"name": "fast", "model": "/nowhere", "engine": {"dtype": "float16"}}
    with pytest.raises(ValidationError, match=r"variant 'fast': engine.dtype float16 needs a GPU"):
        ServeConfig(model_name="m", variants=[variant])
    ServeConfig(model_name="m", variants=[{**variant, "num_gpus": 1}])
