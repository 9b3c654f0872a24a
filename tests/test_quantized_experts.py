"""NF4 / int8 fused MoE experts: faithful round trips, close logits, LoRA on top, frozen base, small storage."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from strata.models.presets import build_model
from strata.models.quantized_experts import (
    INT8_MATMUL_MAX_ROWS,
    QuantizedExpertWeight,
    dequantize_experts,
    quantize_experts,
)

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def tiny_moe():
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # an expert width no other weight has, so the saved-tensor check below can tell expert weights apart
    return build_model("tiny", 512, special, overrides={"moe_intermediate_size": 96}, seed=0).eval()


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_round_trip_errors_stay_within_the_schemes_bounds():
    weight = torch.randn(4, 64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    int8 = QuantizedExpertWeight(weight, "int8", torch.float32).dequantize_all()
    row_step = weight.abs().amax(-1, keepdim=True) / 127
    assert ((int8 - weight).abs() <= row_step / 2 + 1e-7).all()  # rounding to the nearest of 255 levels per row
    nf4 = QuantizedExpertWeight(weight, "nf4", torch.float32).dequantize_all()
    assert ((nf4 - weight).norm() / weight.norm()).item() < 0.12  # 16 levels per block of 64
    assert not torch.equal(nf4, weight)
    with pytest.raises(ValueError, match="scheme must be 'nf4' or 'int8'"):
        QuantizedExpertWeight(weight, "fp8", torch.float32)


def test_quantised_storage_is_a_fraction_of_fp32():
    weight = torch.randn(8, 256, 128)
    fp32_bytes = weight.numel() * 4
    for scheme, most in (("nf4", 0.14), ("int8", 0.27)):  # 4 bits + block scales; 8 bits + a scale per row
        quantized = QuantizedExpertWeight(weight, scheme, torch.float32)
        stored = sum(b.numel() * b.element_size() for b in quantized.buffers())
        assert stored < most * fp32_bytes, (scheme, stored / fp32_bytes)


def test_few_rows_run_on_the_int8_weights_as_the_dequantised_linear_would():
    weight = torch.randn(3, 192, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    quantized = QuantizedExpertWeight(weight, "int8", torch.bfloat16)
    few = torch.randn(INT8_MATMUL_MAX_ROWS, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        assert quantized.int8_matmul_fits(few)
        assert not quantized.int8_matmul_fits(torch.cat([few, few[:1]]))  # more rows: dequantise, bf16 kernel
        expected = torch.nn.functional.linear(few.float(), quantized.dequantize(2).float())
        torch.testing.assert_close(quantized.int8_linear(few, 2).float(), expected, atol=2e-3, rtol=2e-2)
    assert not quantized.int8_matmul_fits(few)  # with autograd on, backward needs the dequantised path


@pytest.mark.parametrize(("scheme", "tolerance"), [("nf4", 0.05), ("int8", 0.005)])
def test_quantised_moe_logits_stay_close_and_dequantise_back(tiny_moe, scheme, tolerance):
    ids = tokens()
    with torch.no_grad():
        expected = tiny_moe(ids).logits
        model = copy.deepcopy(tiny_moe)
        assert quantize_experts(model, scheme, torch.float32) == 2 * model.config.num_hidden_layers
        assert quantize_experts(model, scheme, torch.float32) == 0  # a second call leaves quantised experts alone
        quantized = model(ids).logits
        error = (quantized - expected).norm() / expected.norm()
        assert 0 < error < tolerance, error
        dequantize_experts(model)
        assert model.config._experts_implementation == tiny_moe.config._experts_implementation
        assert all(p.stride(0) > 0 for p in model.parameters() if p.ndim == 3)  # real weights again
        torch.testing.assert_close(model(ids).logits, quantized, atol=1e-5, rtol=1e-5)


class Allocations(TorchDispatchMode):
    """The shapes of the tensors every op inside makes (not views of a one-element placeholder)."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > tensor.element_size():
                self.shapes.add(tuple(tensor.shape))
        return out


def lora_on_experts(model):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], target_parameters=EXPERTS)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return peft_model


def test_lora_on_quantised_experts_trains_like_lora_on_their_dequantised_weights(tiny_moe):
    quantized = copy.deepcopy(tiny_moe)
    quantize_experts(quantized, "nf4", torch.float32)
    reference = copy.deepcopy(quantized)
    dequantize_experts(reference)  # the same numbers, held as plain parameters and run by transformers' own code
    quantized, reference = lora_on_experts(quantized), lora_on_experts(reference)
    lora_weights = {k: v for k, v in quantized.state_dict().items() if "lora_" in k}
    assert not reference.load_state_dict(lora_weights, strict=False).unexpected_keys  # the same LoRA weights
    frozen_before = {k: v.clone() for k, v in quantized.state_dict().items() if "lora_" not in k}

    saved = []  # what autograd keeps for backward
    stacks = {tuple(p.shape) for n, p in tiny_moe.named_parameters() if "experts" in n}  # (experts, out, in)
    with Allocations() as made:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = quantized(tokens(1), labels=tokens(1)).loss
        loss.backward()
    assert not (stacks | {shape[1:] for shape in stacks}) & set(saved)  # no expert's weight kept, nor all of them
    assert not stacks & made.shapes, "a full-size expert stack was computed (peft's merged delta?)"
    reference_loss = reference(tokens(1), labels=tokens(1)).loss
    reference_loss.backward()

    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert any("experts" in n and "lora_A" in n for n in grads)
    assert grads.keys() == reference_grads.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not [n for n, p in quantized.named_parameters() if not p.requires_grad and p.grad is not None]
    after = quantized.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen_before.items())


def test_a_qlora_export_merges_into_the_base_as_training_quantised_it(tiny_base, tmp_path):
    """QLoRA on a GPU loads the base in bf16 and quantises it from there; its export, merged on a CPU, must start
    from the same rounded weights (an fp32 base's embeddings, norms and experts alike), and from fp32 after a CPU
    run."""
    from lora_adapters import make_adapter

    from strata.models.adapters import merged_model

    adapter = make_adapter(tiny_base, tmp_path / "adapter", 1)
    embeddings = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).get_input_embeddings().weight
    assert not torch.equal(embeddings, embeddings.bfloat16().float()), "the base must not be bf16 already"
    for trained_on_gpu, expected in ((False, embeddings), (True, embeddings.bfloat16().float())):
        merged = merged_model(str(tiny_base), "qlora", str(adapter), trained_on_gpu=trained_on_gpu)
        assert all(p.dtype == torch.float32 for p in merged.parameters())
        assert torch.equal(merged.get_input_embeddings().weight, expected), trained_on_gpu
