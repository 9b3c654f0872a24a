"""OpenAI conformance on a real Serve HTTP endpoint: every body is validated with the official `openai` types (and
the keys the API marks required), outputs are compared with the model itself, and nothing a client sends gets a 5xx.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import pytest
import torch
from openai.types import Completion, CompletionChoice
from openai.types import completion_create_params as completion_params
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat import completion_create_params as chat_params
from openai_reference import model_logprobs, openai_greedy
from raycluster import free_port

MODEL = "strata-tiny"
KEY = "sk-protocol-0123456789"
PROMPT = "def main(args):\n"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a parser."}]


class StreamedCompletionChoice(CompletionChoice):
    # OpenAI streams legacy completions with "finish_reason": null until a choice's last chunk; its types (made for
    # the whole response) say only the final values.
    finish_reason: Literal["stop", "length", "content_filter"] | None


class StreamedCompletion(Completion):
    choices: list[StreamedCompletionChoice]


@pytest.fixture(scope="module")
def served(ray_session, tiny_base, tmp_path_factory):
    """The tiny model behind the router, as one variant; and the same model in this process, for references."""
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata.config import AuditSettings, AuthSettings, EngineSettings, ServeConfig, VariantConfig
    from strata.serve.app import build_application

    home = tmp_path_factory.mktemp("openai-protocol")
    (home / "keys.txt").write_text(KEY + "\n")
    engine = EngineSettings(max_batch_size=16, max_tokens_limit=64, stream_interval_s=0.0, dtype="float32")
    config = ServeConfig(
        model_name=MODEL,
        variants=[VariantConfig(name="stable", model=str(tiny_base), num_cpus=0.5, engine=engine)],
        auth=AuthSettings(api_keys_file=str(home / "keys.txt"), requests_per_minute=1e6, burst=100_000),
        audit=AuditSettings(path=str(home / "audit.jsonl")),
        router_num_cpus=0.25,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(config), name="openai-protocol", route_prefix="/")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, output_router_logits=False).eval()
    yield {"url": f"http://127.0.0.1:{port}/v1", "model": model, "tokenizer": AutoTokenizer.from_pretrained(tiny_base)}
    serve.delete("openai-protocol")
    serve.shutdown()


def post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(served["url"] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def events(response: httpx.Response) -> list[dict]:
    """The JSON payloads of a server-sent event stream, which must end with [DONE]."""
    assert response.status_code == 200, response.text
    data = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def conforming(chat: bool, body: dict, streamed: bool = False) -> dict:
    """Validate a body with the `openai` types, and check the keys the API requires but the types let be missing."""
    required = {"index", "finish_reason", "logprobs"}
    if chat and streamed:
        ChatCompletionChunk.model_validate(body)
        required |= {"delta"}
    elif chat:
        ChatCompletion.model_validate(body)
        required |= {"message"}
        assert all({"role", "content", "refusal"} <= set(c["message"]) for c in body["choices"]), body
    else:
        (StreamedCompletion if streamed else Completion).model_validate(body)
        required |= {"text"}
    assert all(required <= set(choice) for choice in body["choices"]), body
    for choice in body["choices"]:
        if chat and choice["logprobs"] is not None:
            assert {"content", "refusal"} <= set(choice["logprobs"])
            for token in choice["logprobs"]["content"]:
                assert {"token", "logprob", "bytes", "top_logprobs"} <= set(token)
                assert all({"token", "logprob", "bytes"} <= set(top) for top in token["top_logprobs"])
    if body.get("usage"):
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return body


def ok(served, path: str, body: dict) -> dict:
    response = post(served, path, body)
    assert response.status_code == 200, (body, response.text)
    return conforming(path.startswith("/chat"), response.json())


def streamed(served, path: str, body: dict) -> list[dict]:
    chunks = events(post(served, path, {**body, "stream": True}))
    return [conforming(path.startswith("/chat"), chunk, streamed=True) for chunk in chunks]


def greedy_ids(served, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy `generate`, stopped at EOS as the engine is."""
    tokenizer = served["tokenizer"]
    with torch.no_grad():
        out = served["model"].generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[0, len(ids) :].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def encode(served, text: str) -> list[int]:
    return served["tokenizer"].encode(text, add_special_tokens=False)


def no_special_tokens(tokenizer, ids: list[int]) -> bool:
    return tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def token_count(choice: dict) -> int:
    return len(choice["logprobs"]["tokens"])


@pytest.mark.slow
def test_every_prompt_form_openai_accepts_gets_one_choice_per_prompt_and_n(served):
    """A string, a list of strings, token ids and a list of token id lists: each answered, choice index
    prompt_index * n + i, each text the model's own greedy continuation; empty or unknown-token prompts get 400."""
    tokenizer = served["tokenizer"]
    texts = ["def main(", "import os\n"]
    ids = [encode(served, t) for t in texts]
    expected = {
        text: tokenizer.decode(greedy_ids(served, i, 6), skip_special_tokens=True)
        for text, i in zip(texts, ids, strict=True)
    }
    forms = [(texts[0], [texts[0]]), ([texts[0]], [texts[0]]), (ids[0], [texts[0]]), (ids, texts), (texts, texts)]
    for n in (1, 2):
        for prompt, answered in forms:
            body = ok(
                served, "/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "n": n}
            )
            assert [c["index"] for c in body["choices"]] == list(range(len(answered) * n))
            assert [c["text"] for c in body["choices"]] == [expected[t] for t in answered for _ in range(n)], prompt
            assert body["usage"]["prompt_tokens"] == sum(len(encode(served, t)) for t in answered)

    for prompt in ["", [], [""], [[]], [texts[0], ""], [[5], []]]:
        response = post(served, "/completions", {"model": MODEL, "prompt": prompt})
        assert response.status_code == 400, (prompt, response.text)
        assert response.json()["error"]["param"] == "prompt" and "empty" in response.json()["error"]["message"]
    for prompt in [[5, len(tokenizer)], [[5], [-1]]]:
        response = post(served, "/completions", {"model": MODEL, "prompt": prompt})
        assert response.status_code == 400, (prompt, response.text)
        assert response.json()["error"]["code"] == "invalid_prompt"


def fuzz_values() -> list:
    return [None, True, False, 0, -1, 2, 0.5, 10**20, "", "x", [], ["x"], [0], [[0]], {}, {"0": 1}]


@pytest.mark.slow
def test_nothing_a_client_sends_gets_a_server_error(served):
    """Every field of OpenAI's request types, one at a time, set to values of every JSON kind: 200 (with a
    conforming body or stream) or a 4xx, never a 5xx."""
    cases = []
    for path, params, base in [
        ("/completions", completion_params.CompletionCreateParamsBase, {"prompt": "x"}),
        ("/chat/completions", chat_params.CompletionCreateParamsBase, {"messages": [{"role": "user", "content": "x"}]}),
    ]:
        fields = [*params.__annotations__, "stream"]
        cases += [
            (path, {"model": MODEL, **base, "max_tokens": 2, field: v}) for field in fields for v in fuzz_values()
        ]
    cases += [
        ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": v}]}) for v in fuzz_values()
    ]
    cases += [("/chat/completions", {"model": MODEL, "messages": [{"role": v, "content": "x"}]}) for v in fuzz_values()]

    def check(case: tuple[str, dict]) -> str | None:
        path, body = case
        response = post(served, path, body)
        if response.status_code >= 500:
            return f"{response.status_code} for {body}: {response.text[:200]}"
        if response.status_code == 200:
            chat = path.startswith("/chat")
            if response.headers["content-type"].startswith("text/event-stream"):
                for chunk in events(response):
                    conforming(chat, chunk, streamed=True)
            else:
                conforming(chat, response.json())
        else:
            error = response.json()["error"]
            assert error["message"] and error["type"], body
        return None

    with ThreadPoolExecutor(4) as pool:
        failures = [f for f in pool.map(check, cases) if f]
    assert not failures, failures[:5]


@pytest.mark.slow
def test_openai_documented_example_requests_are_answered(served):
    """The API reference's examples (with this model's name), the spec's nullable fields sent as null, and our own
    answer sent back as the next turn (strict clients echo every field of the message)."""
    completions = [
        {"prompt": "Say this is a test", "max_tokens": 7, "temperature": 0},
        {
            "prompt": "Say this is a test",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 1,
            "n": 1,
            "stream": False,
            "logprobs": None,
            "stop": "\n",
        },
        {
            "prompt": "Say this is a test",
            "suffix": None,
            "echo": False,
            "best_of": 1,
            "seed": 42,
            "logprobs": 2,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "logit_bias": {"5": -100},
            "user": "user-1234",
        },
        {
            "prompt": "Say this is a test",
            "suffix": "",
            "max_tokens": None,
            "temperature": None,
            "top_p": None,
            "n": None,
            "stream": None,
            "stream_options": None,
            "logprobs": None,
            "echo": None,
            "stop": None,
            "presence_penalty": None,
            "frequency_penalty": None,
            "best_of": None,
            "logit_bias": None,
            "seed": None,
        },
    ]
    for body in completions:
        ok(served, "/completions", {"model": MODEL, **body})
    chats = [
        {
            "messages": [
                {"role": "developer", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"},
            ]
        },
        {"messages": [{"role": "user", "content": "Hello!"}], "logprobs": True, "top_logprobs": 2},
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this text?"}]}],
            "max_completion_tokens": 8,
            "n": 2,
            "seed": 7,
            "temperature": 0.7,
            "store": False,
            "metadata": None,
            "tools": None,
            "response_format": {"type": "text"},
            "service_tier": "auto",
            "parallel_tool_calls": True,
        },
    ]
    for body in chats:
        answer = ok(served, "/chat/completions", {"model": MODEL, "max_tokens": 8, **body})
    follow_up = [*chats[0]["messages"], answer["choices"][0]["message"], {"role": "user", "content": "More."}]
    ok(served, "/chat/completions", {"model": MODEL, "messages": follow_up, "max_tokens": 4})
    assert streamed(
        served, "/chat/completions", {"model": MODEL, **chats[0], "stream_options": {"include_usage": True}}
    )


@pytest.mark.slow
def test_greedy_chat_matches_generate_on_the_chat_template_token_for_token(served):
    tokenizer = served["tokenizer"]
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = greedy_ids(served, ids, 16)
    assert no_special_tokens(tokenizer, expected), "pick a prompt whose reference ends no turn, whatever ends one"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logprobs": True}
    chat = ok(served, "/chat/completions", {**body, "top_logprobs": 2})
    [choice] = chat["choices"]
    assert choice["message"]["refusal"] is None and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == tokenizer.decode(expected)
    assert chat["usage"]["prompt_tokens"] == len(ids) and chat["usage"]["completion_tokens"] == len(expected)
    tokens = choice["logprobs"]["content"]
    reference = model_logprobs(served["model"], ids + expected)[len(ids) - 1 : -1]
    assert len(tokens) == len(expected)
    for token, token_id, position in zip(tokens, expected, reference, strict=True):
        assert bytes(token["bytes"]).decode(errors="replace") == tokenizer.decode([token_id])
        assert token["logprob"] == pytest.approx(position[token_id].item(), abs=1e-4)
        assert [t["logprob"] for t in token["top_logprobs"]] == pytest.approx(
            position.topk(2).values.tolist(), abs=1e-4
        )
    assert bytes(b for t in tokens for b in t["bytes"]).decode(errors="replace") == choice["message"]["content"]

    chunks = streamed(served, "/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == choice["message"]["content"]
    streamed_tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
    assert [t["bytes"] for t in streamed_tokens] == [t["bytes"] for t in tokens]
    assert [t["top_logprobs"] for t in streamed_tokens] == [[]] * len(tokens)


@pytest.mark.slow
def test_completion_logprobs_and_text_offsets(served):
    tokenizer = served["tokenizer"]
    prompt = "def main("  # the tiny model continues it with tokens that end inside a character, and no special one
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 2}
    [choice] = ok(served, "/completions", body)["choices"]
    logprobs, text = choice["logprobs"], choice["text"]
    reference = greedy_ids(served, encode(served, prompt), 12)
    assert no_special_tokens(tokenizer, reference)
    assert text == tokenizer.decode(reference)
    columns = ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
    assert [len(logprobs[column]) for column in columns] == [len(reference)] * 4
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0
    for token_id, token, value, top, start in zip(reference, *(logprobs[column] for column in columns), strict=True):
        if token.startswith("bytes:"):  # a token that ends inside a character (the tiny model makes such)
            assert "\ufffd" in tokenizer.decode([token_id])
        else:
            assert token == tokenizer.decode([token_id]) and text[start:].startswith(token), (token, start, text)
        assert top[token] == value and len(top) <= 3 and max(top.values()) == value  # greedy: the chosen is the top
    chunks = streamed(served, "/completions", body)
    for column in columns:
        assert [t for c in chunks for t in c["choices"][0]["logprobs"][column]] == logprobs[column]


@pytest.mark.slow
def test_a_seed_reproduces_sampled_text_and_n_choices_stream_with_their_index(served):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 1234}
    first, again = (ok(served, "/completions", body)["choices"][0]["text"] for _ in range(2))
    other = ok(served, "/completions", {**body, "seed": 4321})["choices"][0]["text"]
    assert first == again != other

    many = {**body, "n": 3, "logprobs": 0}
    whole = ok(served, "/completions", many)
    texts = [c["text"] for c in whole["choices"]]
    assert texts[0] == first and len(set(texts)) == 3  # choice i samples with seed + i
    assert whole["usage"]["completion_tokens"] == sum(token_count(c) for c in whole["choices"])
    chunks = streamed(served, "/completions", {**many, "stream_options": {"include_usage": True}})
    by_index = {i: "" for i in range(3)}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        by_index[choice["index"]] += choice["text"]
    assert list(by_index.values()) == texts
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 9, "n": 2}
    answers = [c["message"]["content"] for c in ok(served, "/chat/completions", chat)["choices"]]
    deltas, roles = {0: "", 1: ""}, {0: 0, 1: 0}
    for chunk in streamed(served, "/chat/completions", chat):
        for choice in chunk["choices"]:
            deltas[choice["index"]] += choice["delta"].get("content") or ""
            roles[choice["index"]] += choice["delta"].get("role") == "assistant"
    assert list(deltas.values()) == answers and roles == {0: 1, 1: 1}


@pytest.mark.slow
def test_best_of_returns_the_candidates_with_the_highest_logprob(served):
    """best_of=4, n=2 generates the four candidates that n=4 returns (same seed), and answers the two most likely."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 77}
    candidates = ok(served, "/completions", {**body, "n": 4, "logprobs": 0})
    # None ended on EOS, whose logprob counts in the score but is never reported: the visible sum is the score.
    assert {c["finish_reason"] for c in candidates["choices"]} == {"length"}
    ranked = sorted(candidates["choices"], key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    best = ok(served, "/completions", {**body, "n": 2, "best_of": 4})
    assert [c["text"] for c in best["choices"]] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1] and best["choices"][0]["logprobs"] is None
    assert best["usage"] == candidates["usage"]  # every candidate was generated


@pytest.mark.slow
def test_logit_bias_and_penalties_reach_the_model(served):
    tokenizer, ids = served["tokenizer"], encode(served, PROMPT)
    forced = next(t for t in range(100, 200) if tokenizer.decode([t]).strip())
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    biased = ok(served, "/completions", {**body, "logit_bias": {str(forced): 100}})
    assert biased["choices"][0]["text"] == tokenizer.decode([forced] * 6)
    penalised = ok(served, "/completions", {**body, "max_tokens": 16, "presence_penalty": 1.0, "frequency_penalty": 2})
    expected = openai_greedy(served["model"], ids, 16, presence=1.0, frequency=2.0)
    assert expected != greedy_ids(served, ids, 16)
    assert penalised["choices"][0]["text"] == tokenizer.decode(
        expected[: penalised["usage"]["completion_tokens"]], skip_special_tokens=True
    )


@pytest.mark.slow
def test_echo_sends_the_prompt_before_its_completion(served):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    plain = ok(served, "/completions", body)["choices"][0]["text"]
    assert ok(served, "/completions", {**body, "echo": True})["choices"][0]["text"] == PROMPT + plain
    ids = encode(served, PROMPT)
    assert ok(served, "/completions", {**body, "prompt": ids, "echo": True})["choices"][0]["text"] == PROMPT + plain
    chunks = streamed(served, "/completions", {**body, "echo": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT + plain


REFUSED = [
    # (what, path, body, param, words the message must contain)
    ("suffix", "/completions", {"prompt": "x", "suffix": "test."}, "suffix", "suffix is not supported"),
    ("best_of < n", "/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of", "at least n"),
    ("best_of streamed", "/completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of", "streamed"),
    ("echo with logprobs", "/completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo", "logprobs"),
    ("logprobs over 5", "/completions", {"prompt": "x", "logprobs": 6}, "logprobs", "5"),
    ("too many completions", "/completions", {"prompt": ["x"] * 50, "n": 3}, "n", "limit of 128"),
    ("bias outside vocab", "/completions", {"prompt": "x", "logit_bias": {"50256": -100}}, "logit_bias", "vocabulary"),
    ("bias not a token id", "/completions", {"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias.x", "integer"),
    ("bias over 100", "/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "100"),
    ("penalty over 2", "/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty", "2"),
    ("top_logprobs alone", "/chat/completions", {"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ("top_logprobs over 20", "/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ("tools", "/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool"),
    ("json mode", "/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "structured"),
    (
        "an image",
        "/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
        "messages.0.content",
        "text only",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("what, path, body, param, words", REFUSED, ids=[r[0] for r in REFUSED])
def test_what_cannot_apply_is_refused_with_a_400_saying_why(served, what, path, body, param, words):
    messages = {"messages": [{"role": "user", "content": "x"}]} if path.startswith("/chat") else {}
    response = post(served, path, {"model": MODEL, **messages, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"], error
