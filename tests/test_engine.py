"""The continuous-batching engine against transformers `generate`, without Ray."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from openai_reference import model_logprobs, openai_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from strata.serve.engine import Engine, Output, SamplingParams, bucket

PROMPTS = ["def main(", "import os\nimport sys\n", "class Parser:\n    def __init__(self, text):\n", "x = 1", "#"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_base):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)


def reference(model, tokenizer, prompt: str, max_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class Collector:
    def __init__(self):
        self.outputs: list[Output] = []
        self.done = threading.Event()

    def __call__(self, output: Output) -> None:
        self.outputs.append(output)
        if output.finish_reason:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)


def run_engine(engine: Engine, requests: list[tuple[str, SamplingParams]], join_every: int = 0) -> list[Collector]:
    """Submit requests one per `join_every` steps (0: all at once) and step until every one finishes."""
    collectors = []
    pending = list(requests)
    steps = 0
    with torch.inference_mode():
        while pending or any(not c.done.is_set() for c in collectors):
            if pending and (join_every == 0 or steps % join_every == 0):
                batch = pending if join_every == 0 else pending[:1]
                for prompt, params in batch:
                    collectors.append(Collector())
                    engine.submit(engine.tokenizer.encode(prompt, add_special_tokens=False), params, collectors[-1])
                pending = [] if join_every == 0 else pending[1:]
            engine.step()
            steps += 1
            assert steps < 1000
    return collectors


def test_newcomers_join_a_running_batch_in_groups_or_after_a_bounded_wait(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=8, admission_group=3, admission_wait_s=60)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    first, late, lone = Collector(), [Collector() for _ in range(3)], Collector()

    def submit(prompt: str, sink: Collector, params: SamplingParams = greedy) -> None:
        engine.submit(tokenizer.encode(prompt, add_special_tokens=False), params, sink)

    def running_waiting() -> tuple[int, int]:
        stats = engine.stats()
        return stats["running"], stats["waiting"]

    with torch.inference_mode():
        submit(PROMPTS[0], first, SamplingParams(max_tokens=60, temperature=0.0))
        engine.step()
        assert running_waiting() == (1, 0)  # an idle engine admits at once
        for prompt, sink in zip(PROMPTS[1:3], late, strict=False):
            submit(prompt, sink)
        engine.step()
        engine.step()
        assert running_waiting() == (1, 2)  # two newcomers wait for a third: one prefill for the group
        submit(PROMPTS[3], late[2])
        engine.step()
        assert running_waiting() == (4, 0)
        while not all(c.done.is_set() for c in late):
            engine.step()

        engine.admission_wait_s = 0.05
        submit(PROMPTS[4], lone)
        engine.step()
        assert running_waiting() == (1, 1)
        time.sleep(0.06)
        engine.step()
        assert running_waiting() == (2, 0)  # no group came, and it waited long enough
        while not (first.done.is_set() and lone.done.is_set()):
            engine.step()
    for prompt, sink in zip([*PROMPTS[1:4], PROMPTS[4]], [*late, lone], strict=True):
        assert sink.text == reference(model, tokenizer, prompt, greedy.max_tokens), prompt


@pytest.mark.parametrize("join_every", [0, 3])
def test_greedy_matches_generate_while_requests_join_and_leave(model_and_tokenizer, join_every):
    model, tokenizer = model_and_tokenizer
    lengths = [12, 5, 20, 9, 16]  # different max_tokens: rows leave the batch at different steps
    engine = Engine(model, tokenizer, max_batch_size=3)  # fewer slots than requests: some wait in the queue
    requests = [(p, SamplingParams(max_tokens=n, temperature=0.0)) for p, n in zip(PROMPTS, lengths, strict=True)]
    collectors = run_engine(engine, requests, join_every)
    for (prompt, params), collector in zip(requests, collectors, strict=True):
        assert collector.text == reference(model, tokenizer, prompt, params.max_tokens), prompt
        assert collector.outputs[-1].finish_reason in {"length", "stop"}
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["finished"], stats["cancelled"]) == (0, 0, len(PROMPTS), 0)
    assert stats["tokens"] == sum(
        c.outputs[-1].completion_tokens + (c.outputs[-1].finish_reason == "stop") for c in collectors
    )
    assert engine.cache is None


def test_stop_sequences_cut_the_text_and_are_never_streamed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    full = reference(model, tokenizer, PROMPTS[0], 24)
    stop = full[5:8]
    assert stop and full.find(stop) == 5
    [collector] = run_engine(Engine(model, tokenizer), [(PROMPTS[0], SamplingParams(24, 0.0, stop=(stop,)))])
    assert collector.text == full[:5]
    assert collector.outputs[-1].finish_reason == "stop"


def test_sampling_respects_top_p_and_temperature(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    greedy = reference(model, tokenizer, PROMPTS[1], 10)
    engine = Engine(model, tokenizer, seed=1)
    # top_p -> 0 keeps only the most likely token: sampling collapses to greedy.
    nucleus, hot = run_engine(
        engine,
        [(PROMPTS[1], SamplingParams(10, temperature=1.0, top_p=1e-6)), (PROMPTS[1], SamplingParams(10, 5.0))],
    )
    assert nucleus.text == greedy
    assert hot.text != greedy


def reported(collector: Collector) -> list:
    return [logprob for output in collector.outputs for logprob in output.logprobs]


def test_logprobs_are_the_models_own_for_greedy_and_sampled_tokens(model_and_tokenizer):
    """A request's logprobs are log_softmax of the model's raw logits (before temperature, as vLLM reports them),
    with the top k alternatives; requests that ask for none get none, in the same batch."""
    model, tokenizer = model_and_tokenizer
    requests = [
        (PROMPTS[2], SamplingParams(12, 0.0, logprobs=3)),
        (PROMPTS[0], SamplingParams(12, 1.5, seed=7, logprobs=0)),
        (PROMPTS[1], SamplingParams(12, 0.0)),
    ]
    collectors = run_engine(Engine(model, tokenizer), requests)
    assert reported(collectors[2]) == []
    for (prompt, params), collector in zip(requests[:2], collectors[:2], strict=True):
        logprobs = reported(collector)
        tokens = [logprob.token for logprob in logprobs]
        assert len(tokens) == collector.outputs[-1].completion_tokens > 0
        assert tokenizer.decode(tokens, skip_special_tokens=True) == collector.text
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        expected = model_logprobs(model, ids + tokens)[len(ids) - 1 : -1]  # the distribution each token came from
        for logprob, position in zip(logprobs, expected, strict=True):
            assert logprob.logprob == pytest.approx(position[logprob.token].item(), abs=1e-4)
            top_values, top_ids = position.topk(params.logprobs)
            assert [token for token, _ in logprob.top] == top_ids.tolist()
            assert [value for _, value in logprob.top] == pytest.approx(top_values.tolist(), abs=1e-4)
            if params.temperature == 0:
                assert logprob.token == int(position.argmax())


def test_logit_bias_forces_and_bans_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    greedy = openai_greedy(model, ids, 8)
    forced = next(t for t in range(100, 200) if t not in greedy)
    banned = {greedy[0]: -100.0}
    requests = [
        (PROMPTS[0], SamplingParams(8, 0.0, logit_bias={forced: 100.0}, logprobs=0)),
        (PROMPTS[0], SamplingParams(8, 1.0, logit_bias={forced: 100.0}, logprobs=0)),  # sampling obeys it too
        (PROMPTS[0], SamplingParams(8, 0.0, logit_bias=banned, logprobs=0)),
    ]
    forced_greedy, forced_sampled, without = run_engine(Engine(model, tokenizer), requests)
    assert [t.token for t in reported(forced_greedy)] == [forced] * 8
    assert [t.token for t in reported(forced_sampled)] == [forced] * 8
    tokens = [t.token for t in reported(without)]
    assert greedy[0] not in tokens
    assert tokens == openai_greedy(model, ids, 8, bias=banned)


def test_presence_and_frequency_penalties_follow_openai_on_generated_tokens_only(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # A prompt that ends in the model's own greedy loop: its next token is already in the prompt, so penalising
    # prompt tokens (which OpenAI and vLLM do not) would change even the first generated token.
    ids = tokenizer.encode(PROMPTS[4], add_special_tokens=False)
    ids += openai_greedy(model, ids, 12)
    greedy = openai_greedy(model, ids, 16)
    assert greedy[0] in ids and len(set(greedy)) < len(greedy), "the prompt must repeat itself for this test"
    penalties = [(2.0, 0.0), (0.0, 1.5), (-1.0, 0.5)]
    requests = [SamplingParams(16, 0.0, presence_penalty=p, frequency_penalty=f, logprobs=0) for p, f in penalties]
    engine = Engine(model, tokenizer)
    collectors = [Collector() for _ in requests]
    for params, collector in zip(requests, collectors, strict=True):
        engine.submit(ids, params, collector)
    with torch.inference_mode():
        while not all(c.done.is_set() for c in collectors):
            engine.step()
    for (presence, frequency), collector in zip(penalties, collectors, strict=True):
        tokens = [t.token for t in reported(collector)]
        assert tokens == openai_greedy(model, ids, 16, presence, frequency), (presence, frequency)
        assert tokens[0] == greedy[0]
    assert [t.token for t in reported(collectors[0])] != greedy  # the penalty changed the text


def test_a_seed_samples_the_same_tokens_whatever_shares_the_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    seeded = SamplingParams(16, 1.0, seed=1234)
    [alone] = run_engine(Engine(model, tokenizer, seed=0), [(PROMPTS[0], seeded)])
    crowd = [
        (PROMPTS[1], SamplingParams(16, 1.0)),
        (PROMPTS[2], SamplingParams(16, 0.8, seed=5)),
        (PROMPTS[0], seeded),
        (PROMPTS[3], SamplingParams(16, 0.0)),
    ]
    in_a_crowd = run_engine(Engine(model, tokenizer, seed=99), crowd, join_every=2)[2]
    [another_seed] = run_engine(Engine(model, tokenizer, seed=0), [(PROMPTS[0], SamplingParams(16, 1.0, seed=4321))])
    assert in_a_crowd.text == alone.text
    assert another_seed.text != alone.text
    assert alone.text != reference(model, tokenizer, PROMPTS[0], 16)  # it did sample


def test_cancel_frees_the_slot(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=1)
    first, second = Collector(), Collector()
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    long_request = engine.submit(ids, SamplingParams(max_tokens=200, temperature=0.0), first)
    engine.submit(ids, SamplingParams(max_tokens=3, temperature=0.0), second)
    with torch.inference_mode():
        for _ in range(3):
            engine.step()
        assert (engine.stats()["running"], engine.stats()["waiting"]) == (1, 1)
        engine.cancel(long_request)
        for _ in range(5):
            engine.step()
    assert second.done.is_set() and not first.done.is_set()
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["finished"], stats["cancelled"]) == (0, 0, 1, 1)


def test_prompt_over_the_context_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError, match="context length"):
        engine.submit([1] * engine.max_context, SamplingParams(max_tokens=1), Collector())


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 100)] == [1, 2, 4, 4, 8, 8, 16, 128]


def test_a_failing_model_ends_every_request_with_an_error(model_and_tokenizer):
    """A real fault in the model's forward (here: its weights replaced by a wrongly shaped tensor) must not leave
    clients waiting forever: every request in the engine ends with "error" and new ones are refused."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=2)
    collectors = [Collector() for _ in range(3)]
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    for collector in collectors:
        engine.submit(ids, SamplingParams(max_tokens=50, temperature=0.0), collector)
    thread = threading.Thread(target=engine.run)
    layer = model.model.layers[0].self_attn.q_proj
    weight = layer.weight
    with torch.inference_mode():
        engine.step()  # two requests running, one waiting
    layer.weight = torch.nn.Parameter(torch.zeros(3, 3))  # the fault
    try:
        thread.start()
        thread.join(timeout=30)
    finally:
        layer.weight = weight
    assert not thread.is_alive()
    assert all(c.done.is_set() and c.outputs[-1].finish_reason == "error" for c in collectors)
    assert "RuntimeError" in engine.failure
    with pytest.raises(RuntimeError, match="stopped after a failure"):
        engine.submit(ids, SamplingParams(max_tokens=1), Collector())
