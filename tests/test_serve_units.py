"""Serving pieces without Ray: keys and rate limits, the split, request validation, loading with an adapter."""

from __future__ import annotations

import collections

import pytest
import torch

from strata.config import RateLimit, VariantConfig
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
    with pytest.raises(ApiError, match="Unrecognized request argument supplied: logprobs"):
        parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "logprobs": 2}')
    with pytest.raises(ApiError) as err:
        parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "top_p": 0}')
    assert err.value.param == "top_p"
    too_many = parse_request(CompletionRequest, b'{"model": "m", "prompt": [1, 2], "max_tokens": 65}')
    with pytest.raises(ApiError, match="over this server's limit of 64"):
        max_tokens_of(too_many, default=16, limit=64)
    stops = parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "stop": ["a", ""]}')
    assert stops.stop_sequences() == ("a",)


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
