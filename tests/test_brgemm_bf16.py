"""The bf16 brgemm kernels: the outputs of torch's linear and transformers' experts, refused where they cannot run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from strata.models.brgemm_bf16 import (
    IMPLEMENTATION,
    BrgemmLinear,
    BrgemmTopKRouter,
    brgemm_unavailable,
    kernel,
    use_brgemm_bf16,
)
from strata.models.cpu_features import cpu_instructions
from strata.models.presets import build_model

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
brgemm = pytest.mark.skipif(cpu_instructions() is None, reason="the kernels need a CPU with AMX or AVX512-BF16")


@pytest.fixture(scope="module")
def tiny_moe():
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return build_model("tiny", 512, special, seed=0).eval()


def reference(x, ids, weights, gate_up, down) -> torch.Tensor:
    """Each token's top-k experts one by one, in fp32 but for the activation's rounding to bf16 (as the kernel)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for token, (experts, shares) in enumerate(zip(ids, weights, strict=True)):
        for expert, share in zip(experts.tolist(), shares, strict=True):
            gate, up = (x[token].float() @ gate_up[expert].float().T).chunk(2)
            hidden = (torch.nn.functional.silu(gate) * up).bfloat16().float()
            out[token] += share * (hidden @ down[expert].float().T)
    return out


@brgemm
def test_every_routing_gives_the_per_expert_result():
    """Rows of one expert beyond one 32-row block, experts with no rows, one token: all as the plain loop computes."""
    generator = torch.Generator().manual_seed(0)
    experts, hidden, inter, k = 8, 128, 96, 2
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.05).bfloat16()
    down = (torch.randn(experts, hidden, inter, generator=generator) * 0.05).bfloat16()
    packed = kernel().pack_weight(gate_up), kernel().pack_weight(down)
    for tokens, ids in [
        (70, torch.stack([torch.zeros(70), torch.arange(70) % 3 + 1], 1)),  # expert 0: 70 rows; 4-7: none
        (1, torch.tensor([[5, 2]])),
        (33, torch.randint(0, experts, (33, k), generator=generator)),
    ]:
        ids = ids.long()
        x = torch.randn(tokens, hidden, generator=generator).bfloat16()
        weights = torch.rand(tokens, k, generator=generator).softmax(-1)
        got = kernel().fused_experts(x, ids, weights, *packed)
        want = reference(x, ids, weights, gate_up, down)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@brgemm
def test_a_packed_linear_gives_torchs_result_for_any_row_count():
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 64, bias=False).bfloat16()
    packed = BrgemmLinear(linear)
    for shape in [(1, 96), (3, 5, 96), (70, 96)]:  # one row, leading dims, more than one 32-row block
        x = torch.randn(shape, generator=generator).bfloat16()
        torch.testing.assert_close(packed(x).float(), linear(x).float(), atol=2e-2, rtol=2e-2)


@brgemm
def test_stacked_lora_on_a_packed_linear_gives_each_row_its_own_adapter():
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 64, bias=False).bfloat16()
    packed = BrgemmLinear(linear)
    lora_a = torch.randn(8, 96, generator=generator) * 0.1  # two adapters of rank 4, stacked
    lora_b_t = torch.randn(8, 64, generator=generator) * 0.1
    lora = packed.pack_lora(lora_a, lora_b_t)
    for batch, seq in [(1, 1), (3, 5), (70, 1), (2, 40)]:  # one row, prefill's, more than one 32-row block
        x = torch.randn(batch, seq, 96, generator=generator).bfloat16()
        mask = torch.zeros(batch, 8)
        mask[0::3, :4] = 1  # the first adapter's sequences; every third from 2 takes none (the base)
        mask[1::3, 4:] = 1
        want = linear(x).float() + ((x.float() @ lora_a.T) * mask[:, None]) @ lora_b_t
        got = packed.with_lora(x, lora, mask)
        assert got.shape == (batch, seq, 64)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
        base_rows = mask.sum(1) == 0
        torch.testing.assert_close(got[base_rows], packed(x)[base_rows], atol=0, rtol=0)


@brgemm
def test_a_bf16_model_on_the_kernels_gives_transformers_logits(tiny_moe):
    plain = copy.deepcopy(tiny_moe).bfloat16()
    fast = copy.deepcopy(plain)
    reason, layers = use_brgemm_bf16(fast)
    assert reason is None and fast.config._experts_implementation == IMPLEMENTATION
    # q, k, v, o, the router and the experts of each of the 2 layers, and the output head
    assert layers == 6 * 2 + 1 and isinstance(fast.lm_head, BrgemmLinear)
    assert isinstance(fast.model.layers[0].mlp.gate, BrgemmTopKRouter)
    assert not any("experts.gate_up_proj" in name for name, _ in fast.named_parameters())  # packed in its place
    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = plain(ids).logits.float(), fast(ids).logits.float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95  # bf16 rounding may flip a near-tie


def test_the_kernels_are_refused_where_they_cannot_run(tiny_moe):
    if cpu_instructions() is None:
        assert brgemm_unavailable(copy.deepcopy(tiny_moe).bfloat16()) == "they need a CPU with AMX or AVX512-BF16"
        return
    assert brgemm_unavailable(tiny_moe) == "the model is float32, not bfloat16"
    adapted = get_peft_model(
        copy.deepcopy(tiny_moe).bfloat16(), LoraConfig(r=2, target_parameters=["mlp.experts.gate_up_proj"])
    )
    assert brgemm_unavailable(adapted) == "the model carries peft adapters (merge them first)"
    odd = build_model("tiny", 512, {}, overrides={"moe_intermediate_size": 100}).bfloat16()
    assert "not a multiple of 32" in brgemm_unavailable(odd)


@brgemm
def test_a_finished_build_is_imported_without_asking_ninja(tmp_path):
    """Whichever ninja is first on PATH (pip's in an activated venv, the system's otherwise) must not rebuild what
    the other built: here the only `ninja` on PATH fails, and a process loading the kernels must not call it."""
    kernel()  # built (by `make setup`, or now)
    (tmp_path / "ninja").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "ninja").chmod(0o755)
    load = "import strata.models.brgemm_bf16 as b; print(b.kernel().__file__)"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHONPATH": str(PLATFORM)}
    done = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == kernel().__file__
