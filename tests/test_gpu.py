"""The GPU paths on a real CUDA device: bf16 autocast training, bitsandbytes' 4-bit (NF4) CUDA kernels under
QLoRA, NCCL, and the serving engine. Skipped where there is no GPU (as in CI); on a GPU node run
`pytest tests/test_gpu.py`. Needs neither Ray nor MLflow, so it also runs on a bare GPU box."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from strata.config import LoraSettings
from strata.models.adapters import ADAPTER_DIR, merged_model, save_trained, trainable_model
from strata.serve.engine import Engine, Output, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
PROMPTS = ["def main(", "import os\nimport sys\n", "class Parser:\n    def __init__(self, text):\n", "x = 1"]


def token_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 1000, (4, 48), generator=torch.Generator().manual_seed(seed)).to(CUDA)


def train(model, steps: int, lr: float, autocast: bool) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids, losses = token_batch(), []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_autocast_training_learns_with_fp32_weights(tiny_base):
    """What the training loop does on GPU (`precision: auto`): bf16 autocast over fp32 master weights."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).to(CUDA)
    seen: list[torch.dtype] = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    losses = train(model, steps=40, lr=3e-3, autocast=True)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}, "matmuls did not run in bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_qlora_trains_on_nf4_cuda_kernels_and_merges(tiny_base, tmp_path):
    import bitsandbytes as bnb

    settings = LoraSettings(rank=4, dropout=0, target_parameters=["mlp.experts.gate_up_proj"])
    model = trainable_model(str(tiny_base), "qlora", settings, CUDA)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "no layer was quantised"
    for layer in quantized:
        assert layer.weight.device.type == "cuda" and layer.weight.quant_state.quant_type == "nf4"
        assert layer.compute_dtype == torch.bfloat16
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    losses = train(model, steps=40, lr=1e-2, autocast=True)
    assert losses[-1] < 0.8 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items()), "a frozen 4-bit base weight changed"

    save_trained(model, tmp_path, "qlora")
    ids = token_batch()
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            adapted = model.eval()(input_ids=ids).logits.float()
        merged = merged_model(str(tiny_base), "qlora", str(tmp_path / ADAPTER_DIR)).to(CUDA).eval()
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).to(CUDA).eval()
        merged_error = (merged(input_ids=ids).logits - adapted).abs().mean()
        base_error = (base(input_ids=ids).logits - adapted).abs().mean()
    # The merge is fp32 over the dequantised base, training ran NF4 + bf16: not equal, but it must carry what the
    # adapter learned, so it sits far closer to the trained model than the untouched base does.
    assert merged_error < 0.2 * base_error, (merged_error, base_error)


def test_nccl_all_reduce(tmp_path):
    """The collective Ray Train's `TorchConfig(backend="nccl")` sets up, on this node's GPU."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        tensor = torch.arange(4.0, device="cuda:0")
        dist.all_reduce(tensor)
        torch.cuda.synchronize()
        assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert dist.get_backend() == "nccl"
    finally:
        dist.destroy_process_group()


def generate_on_engine(engine: Engine, prompts: list[str], max_tokens: int) -> list[str]:
    texts = {i: "" for i in range(len(prompts))}
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(output: Output) -> None:
            texts[i] += output.text
            if output.finish_reason:
                done.release()

        return sink

    scheduler = threading.Thread(target=engine.run, daemon=True)
    scheduler.start()
    for i, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), sink_for(i))
    for _ in prompts:
        assert done.acquire(timeout=60)
    engine.stop()
    scheduler.join()
    assert engine.failure is None
    return [texts[i] for i in range(len(prompts))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_cuda_matches_generate(tiny_base, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=dtype, output_router_logits=False).to(CUDA).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    got = generate_on_engine(Engine(model, tokenizer, max_batch_size=8), PROMPTS, max_tokens=16)
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(CUDA)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    if dtype == torch.float32:
        assert got == expected
    else:  # bf16 batched vs one at a time round differently: most, not all, continuations agree exactly
        assert sum(g == e for g, e in zip(got, expected, strict=True)) >= len(PROMPTS) // 2, (got, expected)
