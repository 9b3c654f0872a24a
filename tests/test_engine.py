"""The continuous-batching engine against transformers `generate`, without Ray."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from openai_reference import model_logprobs, openai_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from strata.serve.engine import Engine, Output, SamplingParams, bucket
from strata.serve.engine_loops import WARM_UP_LONGEST_PROMPT, EngineLoops

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

        engine.admission_wait_s = 1.0  # long enough that no pause of this machine's admits it early
        submit(PROMPTS[4], lone)
        engine.step()
        assert running_waiting() == (1, 1)
        time.sleep(1.05)
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


def test_the_cumulative_logprob_counts_the_eos_that_ended_a_request(model_and_tokenizer):
    """best_of ranks by it: a candidate that ends at once has paid for its EOS, so it does not score a perfect 0."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    eos = min(engine.eos_token_ids)
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    [ended] = run_engine(engine, [(PROMPTS[0], SamplingParams(8, 0.0, logit_bias={eos: 100.0}, logprobs=0))])
    last = ended.outputs[-1]
    assert (last.finish_reason, last.completion_tokens, reported(ended)) == ("stop", 0, [])
    expected = model_logprobs(model, ids)[-1][eos].item()  # the model's own, before the bias
    assert expected < 0 and last.cumulative_logprob == pytest.approx(expected, abs=1e-4)
    [running] = run_engine(engine, [(PROMPTS[0], SamplingParams(6, 0.0, logprobs=0))])
    assert running.outputs[-1].cumulative_logprob == pytest.approx(sum(t.logprob for t in reported(running)))


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


def test_stopping_the_engine_answers_what_it_still_holds(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=1)
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    running, waiting = Collector(), Collector()
    for collector in (running, waiting):
        engine.submit(ids, SamplingParams(50, 0.0), collector)
    loop = threading.Thread(target=engine.run)
    loop.start()
    engine.stop()  # between two steps at the latest: 50 tokens take more than one
    loop.join(timeout=60)
    for collector in (running, waiting):
        assert collector.done.is_set() and collector.outputs[-1].finish_reason == "error"
        assert "stopped" in collector.outputs[-1].error
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(ids, SamplingParams(4, 0.0), Collector())


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


def test_the_warm_up_generates_on_every_loops_thread_and_leaves_no_trace(model_and_tokenizer):
    """A replica's warm-up runs forwards on each loop's own thread (whose lazy set-up it is there to pay), a
    prefill of every power-of-two prompt length among them, yet neither the step callback (the replica's metrics)
    nor the engine's counters see it; real requests count as ever."""
    model, tokenizer = model_and_tokenizer
    widths: dict[str, set[int]] = {}

    def record(module, args, kwargs) -> None:
        widths.setdefault(threading.current_thread().name, set()).add(kwargs["input_ids"].shape[1])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    reported: list = []
    loops = EngineLoops(model, tokenizer, loops=2, max_batch_size=4, on_step=reported.append, torch_threads=1)
    loops.start()
    try:
        assert loops.warm_up([None]) > 0
        longest = min(WARM_UP_LONGEST_PROMPT, loops.max_context - 1)
        ladder = {1 << k for k in range(longest.bit_length())}
        assert len(ladder) >= 6, ladder  # up to 32 tokens at least: the test model's context is long enough
        assert sorted(widths) == ["strata-engine-0", "strata-engine-1"]
        assert all(ladder <= seen for seen in widths.values()), widths
        counted = loops.stats()
        assert reported == [] and counted["steps"] == counted["tokens"] == counted["finished"] == 0
        collector = Collector()
        loops.submit(tokenizer.encode(PROMPTS[0], add_special_tokens=False), SamplingParams(4, 0.0), collector)
        assert collector.done.wait(60)
        deadline = time.monotonic() + 60  # the step that answered counts it, and reports, just after
        while not (reported and loops.stats()["finished"] == 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reported and loops.stats()["finished"] == 1
    finally:
        hook.remove()
        loops.stop()


def test_the_warm_up_fits_a_kv_cache_budget_smaller_than_its_prompt_and_tokens(model_and_tokenizer):
    """A replica with a tiny KV budget (3 tokens a loop here) still serves short requests: its warm-up must fit."""
    model, tokenizer = model_and_tokenizer
    loops = EngineLoops(model, tokenizer, loops=1, max_batch_size=2, kv_cache_tokens=3)
    loops.start()
    try:
        loops.warm_up([None])
        collector = Collector()
        loops.submit([5], SamplingParams(2, 0.0), collector)
        assert collector.done.wait(60) and collector.outputs[-1].finish_reason == "length"
    finally:
        loops.stop()


def test_a_model_that_cannot_generate_fails_its_warm_up_naming_why(model_and_tokenizer):
    """The replica calls this before it is ready: a model whose forward fails must never take a request."""
    model, tokenizer = model_and_tokenizer
    loops = EngineLoops(model, tokenizer, loops=1, max_batch_size=2)
    layer = model.model.layers[0].self_attn.q_proj
    weight = layer.weight
    layer.weight = torch.nn.Parameter(torch.zeros(3, 3))  # the fault
    try:
        loops.start()
        with pytest.raises(RuntimeError, match="failed its warm-up generation: RuntimeError"):
            loops.warm_up([None])
    finally:
        layer.weight = weight
        loops.stop()


# -- the end of a chat turn ends generation ---------------------------------------------------------------------------


def greedy_ids(model, prompt_ids: list[int], count: int) -> list[int]:
    """`count` greedy tokens, with no stop token at all (a plain loop over the model's forward)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def model_that_ends_its_turn_at(tiny_base, prompt_ids: list[int], step: int):
    """The tiny model, changed so that its greedy continuation says <|im_end|> at `step` and then goes on (as a
    fine-tuned model does when nothing stops it), with a generation config that stops at EOS only (a model from
    elsewhere): the chat template is all that says where a turn ends.

    im_end's row of the lm_head becomes the part of the hidden state at `step` that no earlier step shares, scaled
    so its logit tops that step's best by 1: im_end scores 0 at every earlier step and wins at `step`."""
    from strata.data.tokenizer import end_of_turn_id

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    im_end = end_of_turn_id(tokenizer)
    before = greedy_ids(model, prompt_ids, step)
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids + before]), output_hidden_states=True)
        hidden = out.hidden_states[-1][0, len(prompt_ids) - 1 :]  # (step + 1, hidden): the states choosing each token
        earlier, now = hidden[:-1], hidden[-1]
        basis = torch.linalg.qr(earlier.T).Q
        own = now - basis @ (basis.T @ now)
        model.lm_head.weight[im_end] = own * (out.logits[0, -1].max() + 1) / own.dot(now)
    continuation = greedy_ids(model, prompt_ids, step + 8)
    assert continuation.index(im_end) == step and tokenizer.eos_token_id not in continuation  # what would happen
    return model, tokenizer, continuation


def test_generation_stops_at_the_end_of_the_assistant_turn(tiny_base):
    from strata.registry import generate_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    messages = [{"role": "user", "content": "def main("}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    step = 3
    model, tokenizer, continuation = model_that_ends_its_turn_at(
        tiny_base, tokenizer.encode(chat, add_special_tokens=False), step
    )
    turn = tokenizer.decode(continuation[:step], skip_special_tokens=True)
    assert turn != tokenizer.decode(continuation, skip_special_tokens=True)  # the invented next turn has text

    [collector] = run_engine(Engine(model, tokenizer), [(chat, SamplingParams(max_tokens=step + 8, temperature=0))])
    assert (collector.text, collector.outputs[-1].finish_reason) == (turn, "stop")
    assert collector.outputs[-1].completion_tokens == step
    assert generate_text(model, tokenizer, chat, max_new_tokens=step + 8) == turn


def test_a_chat_template_with_another_end_of_turn_token_stops_there(tiny_base):
    """A model from elsewhere (here: Llama 3's template) ends turns with its own special token."""
    from strata.data.tokenizer import end_of_turn_id, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}"
    )
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_id(tokenizer) == eot
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, eot]
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert eot in Engine(model, tokenizer).eos_token_ids
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_id(tokenizer) is None  # turns that end in plain text: EOS alone


def test_pretraining_checkpoints_stop_at_the_end_of_a_turn(tiny_base, tmp_path):
    """What pretraining exports (and so registers) stops at EOS and <|im_end|> in any transformers `generate`."""
    from transformers import GenerationConfig

    from strata.config import PretrainConfig
    from strata.data.packing import DataCursor
    from strata.data.tokenizer import IM_END
    from strata.train.pretrain_loop import MODEL_DIR, save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # as a freshly built preset has it
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path, model, tokenizer, optimizer, scheduler, 1, DataCursor(), PretrainConfig(run_name="eot"))
    saved = GenerationConfig.from_pretrained(tmp_path / MODEL_DIR)
    assert saved.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]


# -- the KV cache budget --------------------------------------------------------------------------------------------


def test_peak_cache_counts_every_row_at_the_width_of_the_longest():
    from strata.serve.kv_cache import peak_cache_tokens

    assert peak_cache_tokens([(10, 5)]) == 15
    # Both rows run 5 more steps: 2 rows x (12 + 5) columns, the short row left-padded.
    assert peak_cache_tokens([(10, 5), (12, 5)]) == 34
    # The long-lived short row outlasts the long one: 2 x 15 while both run, then 1 x (3 + 20) alone.
    assert peak_cache_tokens([(10, 5), (3, 20)]) == 30
    assert peak_cache_tokens([(10, 5), (3, 40)]) == 43


def test_requests_wait_for_room_in_the_kv_cache_budget(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:4]]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    need = [len(p) + params.max_tokens for p in prompts]
    budget = sorted(need)[-1] + sorted(need)[-2]  # room for about two at a time, never for all four
    engine = Engine(model, tokenizer, kv_cache_tokens=budget)
    collectors = [Collector() for _ in prompts]
    for ids, collector in zip(prompts, collectors, strict=True):
        engine.submit(ids, params, collector)
    waited = False
    with torch.inference_mode():
        while not all(c.done.is_set() for c in collectors):
            engine.step()
            stats = engine.stats()
            assert stats["cache_tokens"] <= budget
            waited = waited or (stats["running"] > 0 and stats["waiting"] > 0)
    assert waited
    for prompt, collector in zip(PROMPTS, collectors, strict=False):
        assert collector.text == reference(model, tokenizer, prompt, params.max_tokens), prompt


def test_a_request_larger_than_the_whole_kv_cache_budget_is_refused_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, kv_cache_tokens=40)
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    with pytest.raises(ValueError, match="KV cache budget of 40 tokens"):
        engine.submit(ids, SamplingParams(max_tokens=40 - len(ids) + 1), Collector())
    [collector] = run_engine(engine, [(PROMPTS[0], SamplingParams(max_tokens=40 - len(ids), temperature=0.0))])
    assert collector.text == reference(model, tokenizer, PROMPTS[0], 40 - len(ids))
