"""Training machinery without Ray: the token-weighted SFT loss under accumulation and DDP (a real 2-process gloo
group), cross-rank means, preemption checks after a cancelled reclaim, and a pretrained model's vocabulary
checked against the tokenizer before any Ray work."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ray.train import PreemptionInfo

from strata.config import ConfigError, ModelConfig, PretrainConfig
from strata.data.sft import IGNORE_INDEX, SFTExample, collate
from strata.data.tokenizer import load_tokenizer
from strata.models.presets import build_model, check_tokenizer_fits
from strata.train.pretrain import run_pretraining
from strata.train.sft_loop import accumulate_gradients, response_loss
from strata.train.trainer import PreemptionGuard, mean_across_ranks, sum_across_ranks

VOCAB, PAD = 512, 0
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)


def example(prompt_len: int, response_len: int, seed: int) -> SFTExample:
    ids = torch.randint(3, VOCAB, (prompt_len + response_len,), generator=torch.Generator().manual_seed(seed))
    ids = ids.tolist()
    return SFTExample(ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:])


# Very different response lengths: a per-micro-batch mean would weigh the 2 tokens of one like the 40 of another.
EXAMPLES = [example(6, 2, 0), example(4, 40, 1), example(9, 5, 2), example(3, 25, 3)]


def dense_loss_model() -> torch.nn.Module:
    """The tiny MoE without its load-balancing loss, which depends on how tokens are grouped into batches."""
    model = build_model("tiny", VOCAB, SPECIAL, seed=0)
    model.config.output_router_logits = False
    return model


def one_batch_reference() -> tuple[float, dict[str, torch.Tensor]]:
    """Token-mean loss of all EXAMPLES as one batch, and its gradients."""
    model = dense_loss_model()
    token_losses, _ = response_loss(model, collate(EXAMPLES, PAD))
    loss = token_losses / sum(e.loss_tokens for e in EXAMPLES)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_sft_gradient_is_the_token_mean_of_the_whole_batch():
    expected_loss, expected_grads = one_batch_reference()
    model = dense_loss_model()
    micro_batches = [collate(EXAMPLES[:1], PAD), collate(EXAMPLES[1:2], PAD), collate(EXAMPLES[2:], PAD)]
    global_tokens = sum(e.loss_tokens for e in EXAMPLES)
    loss, _ = accumulate_gradients(model, micro_batches, global_tokens, world_size=1, aux_coef=0.0)

    assert loss == pytest.approx(expected_loss, rel=1e-5)  # the logged train loss is the token mean
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_sft_forward_runs_in_bf16_under_autocast_and_keeps_fp32_gradients():
    """`scaling.precision: bf16` (what `auto` picks on a GPU) reaches the fine-tuning forward, as in pretraining."""
    expected_loss, _ = one_batch_reference()
    model = dense_loss_model()
    seen: set[torch.dtype] = set()
    model.lm_head.register_forward_hook(lambda _module, _inputs, out: seen.add(out.dtype))
    global_tokens = sum(e.loss_tokens for e in EXAMPLES)
    loss, _ = accumulate_gradients(
        model, [collate(EXAMPLES, PAD)], global_tokens, world_size=1, aux_coef=0.0, autocast_bf16=True
    )
    assert seen == {torch.bfloat16}
    assert loss == pytest.approx(expected_loss, rel=0.02)
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        values = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
        means = mean_across_ranks(values.clone())
        sums = sum_across_ranks(values.clone())
        # Each rank takes two micro-batches of the global batch (all-reduce on the last one only).
        model = torch.nn.parallel.DistributedDataParallel(dense_loss_model())
        mine = [EXAMPLES[rank], EXAMPLES[rank + 2]]
        global_tokens = sum(e.loss_tokens for e in EXAMPLES)
        micro_batches = [collate([e], PAD) for e in mine]
        share, _ = accumulate_gradients(model, micro_batches, global_tokens, world_size=2, aux_coef=0.0)
        loss = sum_across_ranks(torch.tensor([share])).item()  # what the loop logs
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
        torch.save({"means": means, "sums": sums, "loss": loss, "grads": grads}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_group_means_and_token_weighted_ddp_gradients(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    expected_loss, expected_grads = one_batch_reference()
    for result in results:
        assert result["means"].tolist() == [1.5, 15.0]
        assert result["sums"].tolist() == [3.0, 30.0]
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert result["grads"].keys() == expected_grads.keys()
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_cancelled_reclaim_lets_preemption_checks_resume():
    past = int(time.time() * 1000) - 60_000  # deadlines already over: the hold ends at once
    cancelled = PreemptionInfo(deadline_ms=past, preempted_node_to_ranks={"node-a": [1]})
    later = PreemptionInfo(deadline_ms=past + 1, preempted_node_to_ranks={"node-a": [1]})
    # What get_preemption_info returns at steps 1..7: a worker keeps the last notice it was sent.
    answers = iter([None, cancelled, cancelled, cancelled, later, later, later])
    guard = PreemptionGuard(every_steps=1, slack_s=0, poll=lambda: next(answers))
    checkpoints = []
    for step in range(1, 8):
        guard.check(step, lambda metrics: checkpoints.append(metrics["preemption_checkpoint_step"]))
    assert checkpoints == [2, 5]  # one checkpoint per notice; the cancelled one did not stop the checks


def test_preemption_is_asked_only_every_n_steps():
    asked = []
    guard = PreemptionGuard(every_steps=3, poll=lambda: asked.append(True))
    wrote = [guard.check(step, lambda metrics: None) for step in range(1, 10)]
    assert len(asked) == 3 and not any(wrote)


def test_a_pretrained_model_with_another_vocabulary_stops_pretraining_before_ray(small_data, tiny_base, tmp_path):
    """A local HF directory stands in for a hub model: its vocabulary is not the trained tokenizer's."""
    data_cfg, prepared = small_data
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    other = tmp_path / "other-vocab"
    build_model("tiny", 2 * len(tokenizer), SPECIAL, seed=0).save_pretrained(other)  # no tokenizer of its own
    config = PretrainConfig(run_name="other-vocab", model={"name": str(other)}, data=data_cfg)

    with pytest.raises(ConfigError) as err:
        run_pretraining(config)  # raises before Ray starts: no Ray in this test
    assert f"model.name '{other}' does not fit the tokenizer" in str(err.value)
    assert f"data.vocab_size={data_cfg.vocab_size}" in str(err.value)
    assert f"a {2 * len(tokenizer)}-token vocabulary, the tokenizer {len(tokenizer)} tokens" in str(err.value)

    # Its own tokenizer fits; asked to, the other model is resized to the tokenizer, with its special ids.
    check_tokenizer_fits(ModelConfig(name=str(tiny_base)), data_cfg, tokenizer)
    check_tokenizer_fits(ModelConfig(name=str(other), resize_embeddings=True), data_cfg, tokenizer)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    resized = build_model(str(other), len(tokenizer), special, resize_embeddings=True)
    assert resized.get_input_embeddings().weight.shape[0] == len(tokenizer) == resized.config.vocab_size
    assert resized.config.bos_token_id == tokenizer.bos_token_id
    assert resized.config.eos_token_id == tokenizer.eos_token_id
