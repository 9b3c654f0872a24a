"""Serving pieces without Ray: keys and rate limits, the split, request validation, loading with an adapter."""

from __future__ import annotations

import collections
import io
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from strata.config import AuthSettings, RateLimit, ServeConfig, VariantConfig
from strata.serve import protocol
from strata.serve.audit import AuditLog
from strata.serve.auth import KEYS_ENV, Authenticator, RateLimiter, hash_key, key_hashes, key_id, read_keys
from strata.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, max_tokens_of, parse_request
from strata.serve.routing import Split, parse_split

ROOT = Path(__file__).resolve().parents[1]


def test_keys_come_from_the_environment_and_the_keys_file(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nsk-file-1\n\nsk-file-2  # ci\n")
    monkeypatch.setenv(KEYS_ENV, "sk-env-1, sk-env-2")
    keys = read_keys(str(keys_file))
    assert sorted(keys) == ["sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"]
    authenticate = Authenticator(map(hash_key, keys))
    assert authenticate("Bearer sk-env-2") == key_id("sk-env-2")
    assert authenticate("bearer sk-file-2") == key_id("sk-file-2")
    for header in (None, "", "Bearer", "Basic sk-env-1", "Bearer sk-nope"):
        with pytest.raises(ApiError) as err:
            authenticate(header)
        assert err.value.status == 401


def test_no_keys_is_refused_unless_anonymous_is_asked_for(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    with pytest.raises(ValueError, match=KEYS_ENV):
        Authenticator(key_hashes(AuthSettings()))
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

    from strata.data.tokenizer import token_bytes

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

    fp32 = {"dtype": "float32"}
    plain, _, info = load_for_serving(VariantConfig(name="stable", model=str(tiny_base), engine=fp32))
    tuned, tokenizer, tuned_info = load_for_serving(
        VariantConfig(name="fast", model=str(tiny_base), adapter=str(tmp_path / "adapter"), engine=fp32)
    )
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        assert torch.allclose(tuned(input_ids=ids).logits, expected, atol=1e-4)
        assert not torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-3)
    assert tuned_info["adapter"] == str(tmp_path / "adapter") and "adapter" not in info
    assert tokenizer.chat_template


def fast_users(split: Split, users: list[str]) -> set[str]:
    return {user for user in users if split.assign(user) == "fast"}


def test_sticky_users_are_drawn_afresh_for_each_experiment():
    """Salted per experiment: another experiment's 10% are not the same users again."""
    users = [f"user-{i}" for i in range(10_000)]
    first = fast_users(Split({"stable": 90, "fast": 10}, ["stable", "fast"], salt="experiment-1"), users)
    second = fast_users(Split({"stable": 90, "fast": 10}, ["stable", "fast"], salt="experiment-2"), users)
    assert abs(len(first) / len(users) - 0.10) < 0.01 and abs(len(second) / len(users) - 0.10) < 0.01
    assert len(first & second) / len(first) < 0.2  # independent draws share ~10% of their users, not all

    # By default a config's experiment is its variants: new versions are a new experiment, a reordering is not.
    variants = [{"name": "stable", "model": "models:/m/1"}, {"name": "fast", "model": "models:/m/2"}]
    config = ServeConfig(model_name="m", variants=variants)
    assert ServeConfig(model_name="m", variants=variants[::-1]).split_salt == config.split_salt
    newer = [variants[0], {"name": "fast", "model": "models:/m/3"}]
    assert ServeConfig(model_name="m", variants=newer).split_salt != config.split_salt
    assert ServeConfig(model_name="m", variants=variants, experiment="exp-7").split_salt == "exp-7"


def test_reordering_the_variants_reassigns_nobody():
    users = [f"user-{i}" for i in range(5_000)]
    weights = {"stable": 70, "fast": 20, "canary": 10}
    listed = Split(weights, ["stable", "fast", "canary"], salt="exp")
    reordered = Split(weights, ["canary", "stable", "fast"], salt="exp")
    assert all(listed.assign(user) == reordered.assign(user) for user in users)
    # Nobody joins a variant whose weight fell, and nobody leaves one whose weight rose.
    shifted = Split({"stable": 60, "fast": 20, "canary": 20}, ["stable", "fast", "canary"], salt="exp")
    moves = {(listed.assign(u), shifted.assign(u)) for u in users} - {(v, v) for v in weights}
    assert ("stable", "canary") in moves and not [m for m in moves if m[1] == "stable" or m[0] == "canary"]


def test_router_replicas_share_the_rate_limit_so_the_application_allows_what_the_config_says(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("strata.serve.auth.time.monotonic", lambda: now[0])
    limit = RateLimit(requests_per_minute=120, burst=4)
    replicas = [RateLimiter(limit, replicas=2), RateLimiter(limit, replicas=2)]

    def admitted() -> int:
        """Requests the two replicas admit now, each sent as many as it lets through."""
        count = 0
        for replica in replicas:
            while True:
                try:
                    replica("key-a")
                except ApiError:
                    break
                count += 1
        return count

    assert admitted() == 4  # the burst, across both replicas
    now[0] += 1.0
    assert admitted() == 2  # 120 a minute = 2 a second, across both replicas
    with pytest.raises(ValidationError, match=r"auth.key_limits.key-x.burst \(1\) must be at least router_replicas"):
        ServeConfig(
            model_name="m",
            variants=[{"name": "stable", "model": "models:/m/1"}],
            router_replicas=2,
            auth={"key_limits": {"key-x": {"burst": 1}}},
        )


def audit_record(i: int) -> SimpleNamespace:
    return SimpleNamespace(
        endpoint="/v1/completions", key_id=f"key-{i:06d}", variant="stable", status=200, prompt_tokens=3,
        completion_tokens=5, ttft=0.01, prompt=None, completion=None,
    )  # fmt: skip


def test_audit_log_rotates_by_size_and_writes_off_the_callers_thread(tmp_path, monkeypatch):
    writers = set()
    emit = RotatingFileHandler.emit

    def recording_emit(handler, record):
        writers.add(threading.current_thread())
        emit(handler, record)

    monkeypatch.setattr(RotatingFileHandler, "emit", recording_emit)
    audit = AuditLog(str(tmp_path / "audit.jsonl"), max_bytes=2_000, backup_count=2)
    for i in range(100):
        audit.write(audit_record(i), latency_s=0.02)
    audit.close()

    assert writers and threading.current_thread() not in writers  # the caller (the event loop) never touches disk
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]  # the oldest deleted
    assert all(f.stat().st_size <= 2_000 for f in files)
    kept = [json.loads(line) for name in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl") for line in
            (tmp_path / name).read_text().splitlines()]  # fmt: skip
    assert [r["key_id"] for r in kept] == [f"key-{i:06d}" for i in range(100 - len(kept), 100)]  # whole, in order


def test_audit_times_are_one_clock_reading_each_and_never_run_backwards(tmp_path, monkeypatch):
    """A clock read twice per record (seconds, then milliseconds) could stamp 12:00:00.001 after 12:00:00.999."""
    clock = itertools.count(1_800_000_000.9990, 0.0003)  # readings that cross a second boundary
    monkeypatch.setattr(time, "time", lambda: next(clock))
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    for i in range(10):
        audit.write(audit_record(i), latency_s=0.02)
    audit.close()
    times = [json.loads(line)["time"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", t) for t in times), times
    parsed = [datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in times]
    assert parsed == sorted(parsed), times
    assert int(parsed[0]) == 1_800_000_000 and int(parsed[-1]) == 1_800_000_001  # it did cross the boundary


def test_keys_are_known_by_their_hashes_and_a_keys_file_lives_under_strata_home(tmp_path, monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    authenticate = Authenticator(key_hashes(AuthSettings(api_key_hashes=[hash_key("sk-hashed")])))
    assert authenticate("Bearer sk-hashed") == key_id("sk-hashed")
    with pytest.raises(ApiError):
        authenticate(f"Bearer {hash_key('sk-hashed')}")  # the hash is not a key
    with pytest.raises(ValidationError, match="api_key_hashes.0"):
        AuthSettings(api_key_hashes=["sk-a-raw-key"])

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    (home / "serve").mkdir(parents=True)
    elsewhere.mkdir()
    (home / "serve/keys.txt").write_text("sk-in-home\n")
    monkeypatch.setenv("STRATA_HOME", str(home))
    monkeypatch.chdir(elsewhere)  # a replica's working directory is not $STRATA_HOME
    assert key_hashes(AuthSettings(api_keys_file="serve/keys.txt")) == [hash_key("sk-in-home")]


def test_strata_keys_makes_keys_and_hashes_them(monkeypatch, capsys):
    from strata.cli import main

    assert main(["keys", "new"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("sk-strata-") and hash_key(key) in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO(f"# team\n{key}\nsk-other  # ci\n"))
    assert main(["keys", "hash"]) == 0
    assert capsys.readouterr().out.split() == [hash_key(key), hash_key("sk-other")]


def test_the_default_deploy_fits_two_cpus():
    """Two variants and the router at `strata deploy`'s defaults fit a fresh `ray start --head --num-cpus 2`."""
    from strata.serve.deploy import DeployRequest, required_resources

    request = DeployRequest(model="m", weights={"stable": 90, "fast": 10})
    variants = [VariantConfig(name=n, model=f"models:/m/{i}", num_cpus=request.num_cpus) for i, n in enumerate("ab")]
    needed = required_resources(ServeConfig(model_name="m", variants=variants))
    assert sum(d["replicas"] * d["CPU"] for d in needed.values()) <= 2
    one = ServeConfig(model_name="m", variants=[{"name": "a", "model": "d"}])
    assert required_resources(one)["model-a"]["CPU"] <= 0.5  # a hand-written variant's default, too


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


def test_deploy_resources_must_be_a_json_object_of_numbers(capsys):
    """`--resources` places replicas on a cluster's serving group; a bad value is refused before anything runs."""
    from strata.cli import main
    from strata.config import ServeConfig
    from strata.serve.app import build_application

    assert main(["deploy", "--model", "m", "--split", "stable=1", "--resources", "[1]"]) == 2
    assert "--resources: expected JSON" in capsys.readouterr().err
    variant = {"name": "stable", "model": "/nowhere", "resources": {"serve_gpu": 1}}
    config = ServeConfig(model_name="m", variants=[variant], router_resources={"driver": 0.1})
    router = build_application(config)._bound_deployment
    assert router.ray_actor_options["resources"] == {"driver": 0.1}
    [model_server] = [d for d in router.init_args[1].values()]
    assert model_server._bound_deployment.ray_actor_options["resources"] == {"serve_gpu": 1}


def test_deploying_loads_neither_torch_nor_the_model_code(tmp_path):
    """The Serve controller builds the application (`serve_apps.ab:build_app`) in a fresh process on every deploy,
    and `strata deploy` checks the config first: torch, transformers and the engine load in the replicas only (here
    that keeps ~6 s off the build and ~6 s off the command)."""
    code = (
        "import sys; import strata.serve.deploy; from serve_apps.ab import build_app; "
        "build_app({'model_name': 'm', 'variants': [{'name': 'stable', 'model': '/nowhere'}]}); "
        "print(sorted(m for m in ('torch', 'transformers', 'strata.serve.engine') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}", "STRATA_HOME": str(tmp_path)}
    built = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.splitlines()[-1] == "[]", built.stdout


def test_an_unpaced_choice_reaches_its_event_loop_once_whole():
    """A plain (non-streaming) completion's tokens stay on the engine thread until the choice finishes: one hand-over,
    carrying all the text and logprobs, and the time the first token came for the reply's TTFT."""
    import asyncio

    from strata.serve.engine import Output, TokenLogprob
    from strata.serve.model_server import _Held

    handed_at: list[float] = []  # when the engine thread hands over each token

    async def main() -> tuple[list, _Held]:
        outputs: asyncio.Queue = asyncio.Queue()
        sink = _Held(asyncio.get_running_loop(), outputs, index=3)
        parts = [("de", None), ("f ", None), ("f():", "length")]
        tokens = [TokenLogprob(token=i, logprob=-0.5 * i, top=()) for i in range(3)]

        def engine() -> None:
            for i, (text, finish) in enumerate(parts):
                handed_at.append(time.perf_counter())
                sink(Output(text, finish, prompt_tokens=4, completion_tokens=i + 1, logprobs=(tokens[i],)))
                time.sleep(0.01)

        thread = threading.Thread(target=engine)
        thread.start()
        got = [await outputs.get()]
        thread.join()
        while not outputs.empty():
            got.append(outputs.get_nowait())
        return got, sink

    got, sink = asyncio.run(main())
    assert len(got) == 1  # no wake-up per token
    index, whole = got[0]
    assert index == 3 and whole.text == "def f():" and whole.finish_reason == "length"
    assert whole.completion_tokens == 3 and [t.token for t in whole.logprobs] == [0, 1, 2]
    assert handed_at[0] <= sink.first_at < handed_at[1]  # the first token's time, not the hand-over's


def test_a_loop_gone_idle_no_longer_adds_its_last_batch_to_the_replicas():
    """The replica's batch size sums every loop's latest: one that finished its rows and sleeps counts 0 from then
    on, not the rows of its last step (8 here), which it would until it woke."""
    from strata.serve.engine import StepStats
    from strata.serve.engine_loops import EngineLoops

    reported: list[StepStats] = []
    loops = object.__new__(EngineLoops)  # its step bookkeeping alone, without models
    loops.on_step, loops._step_lock = reported.append, threading.Lock()
    loops._latest = [StepStats(0, 0, 0, 0, 0), StepStats(0, 0, 0, 0, 0)]
    loops._stepped(0, StepStats(8, 0, 0, 0, 8))  # loop 0 finishes its 8 rows and goes idle
    loops._stepped(1, StepStats(4, 0, 4, 64, 4))
    loops._stepped(1, StepStats(4, 1, 4, 80, 4))
    assert [(s.batch_size, s.running, s.queue_length) for s in reported] == [(8, 0, 0), (4, 4, 0), (4, 4, 1)]


def test_a_fresh_model_server_has_warmed_up_yet_reports_no_traffic(tiny_base):
    """The replica's warm-up generation runs before the constructor returns (Serve's ready), and its tokens reach
    none of what the replica reports: its engine's counters and the expert load it exports."""
    import logging

    import torch

    from strata.serve.model_server import ModelServer
    from strata.serve.sampling import SamplingParams

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("ray.serve").addHandler(handler)
    variant = {"name": "stable", "model": str(tiny_base), "engine": {"torch_threads": torch.get_num_threads()}}
    try:
        server = ModelServer.func_or_class("strata-tiny", variant, None)
    finally:
        logging.getLogger("ray.serve").removeHandler(handler)
    try:
        assert any(line.startswith("warmed up in") for line in said), said
        counted = server.engine.stats()
        assert counted["steps"] == counted["tokens"] == counted["finished"] == counted["busy_seconds"] == 0
        assert server.experts.take().tokens_per_expert.sum() == 0
        done = threading.Event()
        server.engine.submit([5, 6, 7], SamplingParams(max_tokens=4), lambda out: out.finish_reason and done.set())
        deadline = time.monotonic() + 60  # the step that answered counts it just after
        while server.engine.stats()["finished"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done.is_set() and server.engine.stats()["finished"] == 1  # real requests count as ever
    finally:
        server.engine.stop()
