"""Serving pieces without Ray: keys and rate limits, the split, request validation, loading with an adapter."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from strata.config import RateLimit, VariantConfig
from strata.serve import protocol
from strata.serve.auth import KEYS_ENV, Authenticator, RateLimiter, key_id, load_keys
from strata.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, max_tokens_of, parse_request
from strata.serve.routing import Split, parse_split


def test_keys_come_from_the_environment_and_the_keys_file(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nsk-file-1\n\nsk-file-2  # ci\n")
    monkeypatch.setenv(KEYS_ENV, "sk-env-1, sk-env-2")
    keys = load_keys(str(keys_file))
    assert sorted(keys.values()) == ["sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"]
    authenticate = Authenticator(keys)
    assert authenticate("Bearer sk-env-2") == key_id("sk-env-2")
    assert authenticate("bearer sk-file-2") == key_id("sk-file-2")
    for header in (None, "", "Bearer", "Basic sk-env-1", "Bearer sk-nope"):
        with pytest.raises(ApiError) as err:
            authenticate(header)
        assert err.value.status == 401


def test_no_keys_is_refused_unless_anonymous_is_asked_for(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    with pytest.raises(ValueError, match=KEYS_ENV):
        Authenticator(load_keys(None))
    assert Authenticator({}, allow_anonymous=True)(None) == "anonymous"


def test_rate_limit_is_a_token_bucket_per_key(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("strata.serve.auth.time.monotonic", lambda: now[0])
    limiter = RateLimiter(
        RateLimit(requests_per_minute=60, burst=2), {"key-vip": RateLimit(requests_per_minute=600, burst=5)}
    )
    limiter("key-a"), limiter("key-a")
    with pytest.raises(ApiError) as err:
        limiter("key-a")
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    limiter("key-b")  # another key has its own bucket
    for _ in range(5):
        limiter("key-vip")
    now[0] += 1.0  # one request a second refills
    limiter("key-a")
    with pytest.raises(ApiError):
        limiter("key-a")


def test_split_meets_weights_exactly_and_users_stick():
    split = Split({"stable": 90, "fast": 10}, ["stable", "fast"])
    assert collections.Counter(split.assign(None) for _ in range(1000)) == {"stable": 900, "fast": 100}
    users = [f"user-{i}" for i in range(5000)]
    first = {u: split.assign(u) for u in users}
    assert all(split.assign(u) == first[u] for u in users)
    assert abs(sum(v == "fast" for v in first.values()) / len(users) - 0.10) < 0.02
    # Shifting 10 points moves only the users in between: nobody on `fast` goes back to `stable`.
    shifted = Split({"stable": 80, "fast": 20}, ["stable", "fast"])
    assert all(shifted.assign(u) == "fast" for u in users if first[u] == "fast")
    assert Split({"stable": 0, "fast": 1}, ["stable", "fast"]).assign("anyone") == "fast"
    with pytest.raises(ValueError, match="unknown variants"):
        Split({"canary": 1}, ["stable"])
    with pytest.raises(ValueError, match="not all 0"):
        Split({"stable": 0}, ["stable"])
    assert parse_split("stable=90, fast=10") == {"stable": 90.0, "fast": 10.0}
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_split("stable:90")


def test_requests_are_validated_like_openai():
    request = parse_request(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    assert request.messages[0].text() == "hi"
    assert max_tokens_of(request, default=16, limit=64) == 16
    with pytest.raises(ApiError, match="Unrecognized request argument supplied: logprob"):
        parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "logprob": 2}')
    with pytest.raises(ApiError) as err:
        parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "top_p": 1.5}')
    assert err.value.param == "top_p"
    too_many = parse_request(CompletionRequest, b'{"model": "m", "prompt": [1, 2], "max_tokens": 65}')
    with pytest.raises(ApiError, match="over this server's limit of 64"):
        max_tokens_of(too_many, default=16, limit=64)
    stops = parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "stop": ["a", ""]}')
    assert stops.stop_sequences() == ("a",)


@pytest.mark.parametrize(
    "prompt, prompts",
    [("x", ["x"]), (["x"], ["x"]), (["x", "y"], ["x", "y"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_every_prompt_form_openai_accepts_is_read_as_openai_means_it(prompt, prompts):
    request = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode())
    assert request.prompts() == prompts


@pytest.mark.parametrize("prompt", ["", [], [""], [[]], ["x", ""], None, 5, ["x", 1], [[1], "x"], [1.5]])
def test_empty_or_malformed_prompts_are_a_400_naming_the_prompt(prompt):
    with pytest.raises(ApiError) as err:
        parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode())
    assert err.value.status == 400 and err.value.param == "prompt", err.value.message


def test_nullable_fields_sent_as_null_mean_their_defaults():
    nulls = dict.fromkeys(["max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed", "logprobs", "echo"])
    body = {"model": "m", "prompt": "x", "suffix": None, "best_of": None, "logit_bias": None, **nulls}
    request = parse_request(CompletionRequest, json.dumps(body).encode())
    assert (request.temperature, request.top_p, request.n, request.candidates(), request.logit_bias) == (1, 1, 1, 1, {})


def test_protocol_bodies_conform_to_the_openai_types():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    token = {"bytes": b"\xc3", "logprob": -0.5, "top": [(b"\xc3", -0.5), (b"ab", -1.5)], "offset": 0}
    choices = [{"index": i, "text": "ab", "finish_reason": "length", "logprobs": [token]} for i in range(2)]
    usage = protocol.usage(3, 4)
    chat = ChatCompletion.model_validate(protocol.response_body(True, "id", "m", choices, usage))
    assert chat.choices[1].message.refusal is None and chat.choices[1].index == 1
    assert chat.choices[0].logprobs.content[0].bytes == [0xC3]
    assert chat.choices[0].logprobs.content[0].top_logprobs[1].token == "ab"
    completion = Completion.model_validate(protocol.response_body(False, "id", "m", choices, usage))
    assert completion.choices[0].logprobs.tokens == ["bytes:\\xc3"]
    assert completion.choices[0].logprobs.top_logprobs == [{"bytes:\\xc3": -0.5, "ab": -1.5}]
    chunk = {"index": 1, "text": "a", "finish_reason": None, "logprobs": None}
    first = ChatCompletionChunk.model_validate(protocol.chunk_body(True, "id", "m", chunk, first=True))
    assert first.choices[0].index == 1 and first.choices[0].delta.role == "assistant"


def test_token_bytes_are_exact_even_inside_a_multibyte_character(tiny_base):
    from transformers import AutoTokenizer

    from strata.serve.model_server import token_bytes

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    text = "naïve café → ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    raw = token_bytes(tokenizer)
    assert b"".join(raw(i) for i in ids) == text.encode()
    assert any(not raw(i).decode(errors="ignore") for i in ids)  # some token is only part of a character


def test_a_variant_with_a_lora_adapter_serves_the_merged_weights(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from strata.serve.loading import load_for_serving

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])

    plain, _, info = load_for_serving(VariantConfig(name="stable", model=str(tiny_base)))
    tuned, tokenizer, tuned_info = load_for_serving(
        VariantConfig(name="fast", model=str(tiny_base), adapter=str(tmp_path / "adapter"))
    )
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        assert torch.allclose(tuned(input_ids=ids).logits, expected, atol=1e-4)
        assert not torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-3)
    assert tuned_info["adapter"] == str(tmp_path / "adapter") and "adapter" not in info
    assert tokenizer.chat_template


def test_text_offsets_point_at_each_tokens_text_even_around_broken_characters():
    """Offsets index the text as the detokenizer writes it: a byte left alone becomes one U+FFFD, a character split
    between two tokens is where both start."""
    from strata.serve.model_server import _Choice
    from strata.serve.sampling import TokenLogprob

    tokens = [b"ue", b"\xc3", b"ult", b"\xc3", b"\xa9", b"x", b"\xe2\x80", b"\xa6"]
    choice = _Choice(request_id=0, prefix="", logprobs=True)
    offsets = [choice.token(lambda raw: raw, TokenLogprob(raw, 0.0, ()))["offset"] for raw in tokens]
    text = b"".join(tokens).decode(errors="replace")
    assert text == "ue\ufffdultéx…"
    assert offsets == [0, 2, 3, 6, 6, 7, 8, 8]
