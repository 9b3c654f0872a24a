"""Model presets build, train a step, and report expert load; local directories load like presets."""

from __future__ import annotations

import pytest
import torch

from strata.config import ModelConfig
from strata.config.model import COMMON
from strata.models.moe_stats import ExpertLoadRecorder, expert_load
from strata.models.presets import PRESETS, build_model, count_parameters, preset_config

SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_configs_are_moe_with_expected_sizes(name):
    config = preset_config(name, vocab_size=32000 if name == "moe-1b" else 4096, special_ids=SPECIAL)
    assert config.num_experts > config.num_experts_per_tok >= 2
    assert config.router_aux_loss_coef > 0 and config.decoder_sparse_step == 1


@pytest.mark.parametrize(
    ("name", "vocab", "total", "active"),
    [
        ("tiny", 4096, 1_936_128, 1_346_304),
        ("small", 4096, 48_014_976, 10_856_064),
        ("moe-1b", 32000, 1_019_321_600, 226_598_144),
    ],
)
def test_preset_sizes(name, vocab, total, active):
    """Counted by hand from the preset: untied embeddings, per layer q/k/v/o (no bias), q/k norms, two norms,
    a router and `num_experts` SwiGLU experts (gate, up, down), of which `num_experts_per_tok` run per token."""
    p = {**COMMON, **PRESETS[name]}
    hidden, head_dim, experts = p["hidden_size"], p["head_dim"], p["num_experts"]
    attention = hidden * head_dim * 2 * (p["num_attention_heads"] + p["num_key_value_heads"]) + 2 * head_dim
    dense_per_layer = attention + 2 * hidden + hidden * experts
    expert = 3 * hidden * p["moe_intermediate_size"]
    outside_layers = 2 * vocab * hidden + hidden  # input and output embeddings (untied), final norm
    layers = p["num_hidden_layers"]
    assert not p["tie_word_embeddings"]
    assert outside_layers + layers * (dense_per_layer + experts * expert) == total
    assert outside_layers + layers * (dense_per_layer + p["num_experts_per_tok"] * expert) == active
    with torch.device("meta"):  # counted without allocating the weights
        assert count_parameters(build_model(name, vocab, SPECIAL)) == {"total": total, "active": active}


def test_tiny_forward_backward_includes_load_balancing_loss():
    model = build_model("tiny", 512, SPECIAL, seed=3)
    ids = torch.randint(3, 512, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and len(out.router_logits) == model.config.num_hidden_layers
    out.loss.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0  # the router learns
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_seeded_build_is_reproducible():
    a, b = build_model("tiny", 512, SPECIAL, seed=5), build_model("tiny", 512, SPECIAL, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=False))


def test_expert_load_counts_every_routed_token():
    logits = [torch.tensor([[5.0, 1.0, 0.0, 0.0], [5.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0]])]
    load = expert_load(logits, top_k=2)
    assert load.tokens_per_expert.tolist() == [[2, 1, 2, 1]]
    assert load.tokens_per_expert.sum() == 3 * 2
    assert load.imbalance == pytest.approx(2 / 1.5)
    uniform = expert_load([torch.zeros(10, 4)], top_k=1)
    assert uniform.router_entropy.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-5)


def test_recorder_sees_what_the_forward_pass_routes():
    model = build_model("tiny", 512, SPECIAL).eval()
    recorder = ExpertLoadRecorder(model)
    ids = torch.randint(3, 512, (3, 10))
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    expected = expert_load(out.router_logits, model.config.num_experts_per_tok)
    load = recorder.take()
    assert torch.equal(load.tokens_per_expert, expected.tokens_per_expert)
    assert load.tokens_per_expert.sum() == 3 * 10 * 2 * model.config.num_hidden_layers
    assert torch.allclose(load.router_entropy, expected.router_entropy)
    assert recorder.take().tokens_per_expert.sum() == 0  # `take` starts counting afresh
    recorder.remove()


def test_recorder_counts_only_the_real_tokens_of_a_left_padded_batch():
    """Padding positions go through the routers too; they must not count as routed tokens."""
    model = build_model("tiny", 512, SPECIAL).eval()
    recorder = ExpertLoadRecorder(model)
    lengths = [3, 10, 7]
    ids = torch.randint(3, 512, (len(lengths), max(lengths)))
    mask = torch.tensor([[0] * (max(lengths) - n) + [1] * n for n in lengths])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    real = mask.flatten().bool()
    expected = expert_load([logits[real] for logits in out.router_logits], model.config.num_experts_per_tok)
    load = recorder.take()
    assert load.tokens_per_expert.sum(1).tolist() == [sum(lengths) * 2] * model.config.num_hidden_layers
    assert torch.equal(load.tokens_per_expert, expected.tokens_per_expert)
    assert torch.allclose(load.router_entropy, expected.router_entropy)
    recorder.remove()


def test_local_model_directory_works_wherever_a_preset_does(tmp_path):
    model = build_model("tiny", 512, SPECIAL, seed=2)
    model.save_pretrained(tmp_path / "hf")
    cfg = ModelConfig(name=str(tmp_path / "hf"))
    loaded = build_model(cfg.name, 512, SPECIAL)
    assert all(
        torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values(), strict=False)
    )
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig(name=str(tmp_path))
    assert ModelConfig(name="Qwen/Qwen3-30B-A3B").name == "Qwen/Qwen3-30B-A3B"  # a hub id passes through


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_active_parameters_count_top_k_experts_from_the_config(preset):
    """The config-based count (which a DDP, peft or 4-bit wrapping cannot change) equals counting the model's own
    weights with each layer's experts at top_k / num_experts, embeddings and norms left out."""
    from strata.models.flops import active_parameters, mfu, training_flops_per_token
    from strata.models.presets import build_model

    model = build_model(preset, 1024, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, seed=0)
    config = model.config
    weights = {n: p.numel() for n, p in model.named_parameters() if "norm" not in n and "embed_tokens" not in n}
    experts = sum(n for name, n in weights.items() if ".experts." in name)
    expected = sum(weights.values()) - experts + experts * config.num_experts_per_tok // config.num_experts
    assert active_parameters(config) == expected
    assert active_parameters(config) < sum(weights.values())  # the experts not chosen do no work

    flops = training_flops_per_token(config, 128)
    assert flops == 6 * expected + 12 * config.num_hidden_layers * config.hidden_size * 128
    assert mfu(1000.0, flops, 1e12, 2) == pytest.approx(1000 * flops / 2e12)


def test_models_load_without_hub_kernels(tiny_base):
    """transformers would otherwise swap layers for Hub-downloaded kernels at load and at each train()/eval() on a
    GPU, which fails on an offline node (seen on an H200) and changes the numbers a checkpoint was judged on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert not model.use_kernels
    model.train()
    assert not model.use_kernels
