"""Real faults in the engine and its model server, without Ray: a failing metric, callback or expert-load hook, an
out-of-memory prefill, a failed engine. Each may cost its own request or its own data, never the other requests."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ray.serve.metrics import Counter, Gauge, Histogram
from test_engine import PROMPTS, Collector, reference, run_engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from strata.models.moe_stats import ExpertLoadRecorder
from strata.serve.engine import Engine, SamplingParams, bucket

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture
def model_and_tokenizer(tiny_base):
    """A fresh copy for each test: the faults below are injected into the model or around it."""
    return AutoModelForCausalLM.from_pretrained(tiny_base).eval(), AutoTokenizer.from_pretrained(tiny_base)


def test_an_on_step_callback_that_raises_fails_no_request(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    calls = []

    def broken_metrics(stats) -> None:
        calls.append(stats)
        raise ZeroDivisionError("a metric exporter bug")

    engine = Engine(model, tokenizer, on_step=broken_metrics)
    collectors = run_engine(engine, [(p, GREEDY) for p in PROMPTS[:3]])
    for prompt, collector in zip(PROMPTS, collectors, strict=False):
        assert collector.text == reference(model, tokenizer, prompt, GREEDY.max_tokens)
    assert engine.failure is None
    assert engine.stats()["observability_errors"] == len(calls) == engine.stats()["steps"]


def test_a_failing_expert_load_hook_fails_no_request(model_and_tokenizer):
    """The recorder is built for a model that routes each token to more experts than this one has: its hooks fail
    inside every forward pass, which goes on undisturbed."""
    model, tokenizer = model_and_tokenizer
    errors = []
    top_k = model.config.num_experts_per_tok
    model.config.num_experts_per_tok = model.config.num_experts + 1
    recorder = ExpertLoadRecorder(model, on_error=errors.append)
    model.config.num_experts_per_tok = top_k
    collectors = run_engine(Engine(model, tokenizer), [(p, GREEDY) for p in PROMPTS[:3]])
    recorder.remove()
    for prompt, collector in zip(PROMPTS, collectors, strict=False):
        assert collector.text == reference(model, tokenizer, prompt, GREEDY.max_tokens)
    assert errors and all(isinstance(e, RuntimeError) for e in errors)


def test_expert_load_counts_the_real_tokens_of_padded_prompts(model_and_tokenizer):
    """Prompts of different lengths in one prefill are left-padded; only their tokens count, top_k times a layer."""
    model, tokenizer = model_and_tokenizer
    recorder = ExpertLoadRecorder(model)
    prompts = ["class Parser:\n", "import os\nimport sys\n", "import os\nimport sys\nimport json\n", PROMPTS[2]]
    lengths = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    assert [bucket(n) for n in lengths] == [8, 8, 16, 16] and len(set(lengths)) == 4  # two padded prefills
    engine = Engine(model, tokenizer, admission_group=len(prompts))
    collectors = run_engine(engine, [(p, GREEDY) for p in prompts])
    load = recorder.take()
    recorder.remove()
    # Each request feeds its prompt, then every sampled token but the last (the one it stopped at is never fed).
    sampled = [c.outputs[-1].completion_tokens + (c.outputs[-1].finish_reason == "stop") for c in collectors]
    fed = sum(lengths) + sum(n - 1 for n in sampled)
    top_k, layers = model.config.num_experts_per_tok, model.config.num_hidden_layers
    assert load.tokens_per_expert.sum(1).tolist() == [fed * top_k] * layers


def test_out_of_memory_while_prefilling_fails_only_the_newcomers(model_and_tokenizer):
    """A real allocation failure (a tensor larger than any machine's memory) during one group's prefill: that group
    fails with a clear error; the request already running goes on and ends as it would have; the engine serves on."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    encode = lambda prompt: tokenizer.encode(prompt, add_special_tokens=False)  # noqa: E731
    running, newcomers, later = Collector(), [Collector(), Collector()], Collector()
    long = SamplingParams(max_tokens=20, temperature=0.0)
    engine.submit(encode(PROMPTS[0]), long, running)
    exhausted = False

    def out_of_memory_when_prefilling(module, args, kwargs) -> None:
        if exhausted and kwargs["input_ids"].shape[1] > 1:
            torch.empty(1 << 62, dtype=torch.uint8)

    hook = model.register_forward_pre_hook(out_of_memory_when_prefilling, with_kwargs=True)
    try:
        with torch.inference_mode():
            engine.step()
            engine.step()
            exhausted = True
            for collector in newcomers:
                engine.submit(encode(PROMPTS[1]), GREEDY, collector)
            engine.step()
            exhausted = False
            assert all(c.outputs[-1].finish_reason == "error" for c in newcomers)
            assert "ran out of memory" in newcomers[0].outputs[-1].error
            assert not running.done.is_set() and engine.failure is None
            engine.submit(encode(PROMPTS[2]), GREEDY, later)
            while not (running.done.is_set() and later.done.is_set()):
                engine.step()
    finally:
        hook.remove()
    assert running.text == reference(model, tokenizer, PROMPTS[0], long.max_tokens)
    assert later.text == reference(model, tokenizer, PROMPTS[2], GREEDY.max_tokens)
    assert (engine.stats()["failed"], engine.stats()["finished"]) == (2, 2)


# -- the model server's accounting (its class, without Serve: real engine, real Ray metric objects) ----------------


@pytest.fixture
def model_server(tiny_base):
    from strata.serve.model_server import ModelServer

    variant = {"name": "stable", "model": str(tiny_base), "engine": {"torch_threads": torch.get_num_threads()}}
    server = ModelServer.func_or_class("strata-tiny", variant, None)
    yield server
    server.engine.stop()


def generate(server, prompt: str | list[dict], max_tokens: int) -> list[dict]:
    """All chunks of one completion (a chat completion, given messages); an exception raised mid-stream is returned
    as the last item."""
    from strata.serve.protocol import ChatCompletionRequest, CompletionRequest
    from strata.serve.router import engine_request

    if isinstance(prompt, list):
        body = ChatCompletionRequest(model="strata-tiny", messages=prompt, temperature=0)
    else:
        body = CompletionRequest(model="strata-tiny", prompt=prompt, temperature=0)
    request = engine_request(body, max_tokens)

    async def collect() -> list:
        chunks = []
        try:
            async for chunk in server.generate(request):
                chunks.append(chunk)
        except RuntimeError as err:
            chunks.append(err)
        return chunks

    return asyncio.run(asyncio.wait_for(collect(), timeout=300))  # a request left without an answer fails, not hangs


def test_an_engine_failure_is_counted_as_an_error_not_a_cancellation(model_server, tiny_base):
    """The fault of test_engine's failing-model test, under the model server: the request metric says "error"."""
    finished = generate(model_server, PROMPTS[0], 4)[-1]["finish_reason"]
    attention = model_server.engine.model.model.layers[0].self_attn
    attention.q_proj = torch.nn.Linear(3, 3)  # the fault (whichever kernel q_proj ran on): every forward fails now
    [failed] = generate(model_server, PROMPTS[0], 4)
    assert failed["status"] == 503 and "generation failed" in failed["error"]
    assert model_server.engine.failure
    assert model_server.finish_reasons == {finished: 1, "error": 1}
    [refused] = generate(model_server, PROMPTS[0], 4)  # until Serve replaces the replica: a 503, not a 500
    assert refused["status"] == 503 and "stopped after a failure" in refused["error"]


def test_a_failed_engine_loop_takes_no_new_request_from_the_healthy_one(tiny_base):
    from strata.serve.model_server import ModelServer

    variant = {"name": "stable", "model": str(tiny_base), "engine": {"loops": 2, "torch_threads": 1}}
    server = ModelServer.func_or_class("strata-tiny", variant, None)
    try:
        attention = server.engine.model.model.layers[0].self_attn
        q_proj, attention.q_proj = attention.q_proj, torch.nn.Linear(3, 3)  # a transient fault: one loop meets it
        [failed] = generate(server, PROMPTS[0], 4)
        assert failed["status"] == 503 and server.engine.failure
        attention.q_proj = q_proj
        for _ in range(3):
            assert generate(server, PROMPTS[0], 4)[-1]["finish_reason"] == "length"  # all on the healthy loop
    finally:
        server.engine.stop()


def test_a_chat_template_that_refuses_the_messages_is_a_400_and_developer_is_system(model_server):
    """Templates may check a conversation (Qwen3's raises "No user query found"): the client's error, not ours."""
    template = model_server.tokenizer.chat_template
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert generate(model_server, messages, 2)[-1]["finish_reason"] == "length"
    model_server.tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role not in ('system', 'user') %}{{ raise_exception('bad role ' + m.role) }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    assert generate(model_server, messages, 2)[-1]["finish_reason"] == "length"  # developer reached it as system
    model_server.tokenizer.chat_template = "{{ raise_exception('No user query found in messages.') }}"
    [refused] = generate(model_server, messages, 2)
    assert refused["status"] == 400 and refused["param"] == "messages" and "No user query" in refused["error"]
    model_server.tokenizer.chat_template = template
    assert generate(model_server, messages, 2)[-1]["finish_reason"] == "length"  # and it serves on


def test_metrics_that_raise_fail_no_request(model_server, tiny_base):
    """Real Ray metrics, misconfigured (tag keys without values): each call raises; requests go on as before."""
    tags = ("model",)
    model_server.ttft = Histogram("strata_test_broken_ttft", boundaries=[1.0], tag_keys=tags)
    model_server.batch_size = Gauge("strata_test_broken_batch_size", tag_keys=tags)
    model_server.requests = Counter("strata_test_broken_requests", tag_keys=tags)
    with pytest.raises(ValueError):
        model_server.requests.inc()
    chunks = generate(model_server, PROMPTS[1], 6)
    assert "".join(c["text"] for c in chunks) == reference(
        model_server.engine.model, model_server.tokenizer, PROMPTS[1], 6
    )
    assert chunks[-1]["finish_reason"] == "length"
    assert model_server.engine.stats()["observability_errors"] >= 3  # ttft, the request count, the batch size
    assert model_server.engine.failure is None


def test_a_request_larger_than_the_kv_cache_budget_gets_a_400(tiny_base):
    from strata.serve.model_server import ModelServer

    engine = {"torch_threads": torch.get_num_threads(), "kv_cache_tokens": 32}
    variant = {"name": "stable", "model": str(tiny_base), "engine": engine}
    server = ModelServer.func_or_class("strata-tiny", variant, None)
    try:
        [refused] = generate(server, PROMPTS[0], 32)
        assert refused["status"] == 400 and refused["code"] == "context_length_exceeded"
        assert "KV cache budget of 32 tokens" in refused["error"]
        assert generate(server, PROMPTS[0], 8)[-1]["finish_reason"] == "length"
    finally:
        server.engine.stop()
