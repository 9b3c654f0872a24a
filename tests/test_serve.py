"""Serving on a real Serve HTTP endpoint: the OpenAI API, auth, rate limits, bad input, the A/B split, live weight
changes and client disconnects. One application (two registered versions of the tiny MoE) is deployed the
declarative way, as `serve deploy` does, and shared by the tests of this module."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from raycluster import free_port

ROOT = Path(__file__).resolve().parents[1]
APP = "strata-test"
MODEL = "strata-tiny"
KEYS = {"main": "sk-main-0123456789", "other": "sk-other-0123456789", "limited": "sk-limited-0123456789"}


@pytest.fixture(scope="module")
def served(ray_session, tiny_base, module_home):
    """Two registered versions (`stable` = the tiny base, `fast` = another initialisation) behind the router."""
    import ray
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata import registry, tracking
    from strata.config import AuditSettings, AuthSettings, EngineSettings, ServeConfig
    from strata.serve import deploy
    from strata.serve.auth import key_id

    home = module_home
    uri = tracking.use_store()

    other = home / "tiny-other"
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.05, generator=torch_generator(1))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(other)
    with tracking.start_run("serve-test", "versions", {}):
        stable = registry.log_model(tiny_base, MODEL)
        fast = registry.log_model(other, MODEL)
    registry.set_alias(MODEL, "stable", stable.version)
    registry.set_alias(MODEL, "fast", fast.version)

    keys_file = home / "keys.txt"
    keys_file.write_text("# test keys\n" + "\n".join(KEYS.values()) + "\n")
    # fp32: replies are compared token for token with an fp32 `generate` in this process
    engine = EngineSettings(max_batch_size=16, max_tokens_limit=480, stream_interval_s=0.0, dtype="float32")
    config = ServeConfig(
        model_name=MODEL,
        variants=deploy.variants_from_aliases(MODEL, ["stable", "fast"], num_cpus=0.5, engine=engine),
        weights={"stable": 90, "fast": 10},
        tracking_uri=uri,
        auth=AuthSettings(
            api_keys_file=str(keys_file),
            requests_per_minute=100_000,
            burst=5_000,
            key_limits={key_id(KEYS["limited"]): {"requests_per_minute": 6, "burst": 3}},
        ),
        audit=AuditSettings(path=str(home / "audit.jsonl")),
        router_num_cpus=0.25,
    )
    port = free_port()
    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy.deploy(dashboard, {"applications": [deploy.application(config, APP)]})
    deploy.wait_until_running(dashboard, APP, timeout_s=300)
    yield {
        "url": f"http://127.0.0.1:{port}",
        "dashboard": dashboard,
        "home": home,
        "stable_dir": tiny_base,
        "fast_dir": other,
        "config": config,
    }
    serve.shutdown()


def torch_generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def client(served, key: str = KEYS["main"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0)


def auth(key: str = KEYS["main"]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def model_stats(variant: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(f"model-{variant}", app_name=APP).stats.remote().result()


def reference(model_dir: Path, prompt: str, max_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata.registry import generate_text

    model = AutoModelForCausalLM.from_pretrained(model_dir, output_router_logits=False).eval()
    return generate_text(model, AutoTokenizer.from_pretrained(model_dir), prompt, max_tokens)


@pytest.mark.slow
def test_openai_client_completions_chat_and_streaming(served):
    api = client(served)
    prompt = "def main(args):\n"
    raw = api.completions.with_raw_response.create(model=f"{MODEL}:stable", prompt=prompt, max_tokens=12, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-strata-variant"] == "stable"
    assert completion.model == f"{MODEL}:stable"
    assert completion.choices[0].text == reference(served["stable_dir"], prompt, 12)
    info = model_stats("stable")["info"]
    assert (info["dtype"], info["quantization"]) == ("float32", "none") and "engine settings" in info["dtype_reason"]
    assert completion.usage.prompt_tokens > 0 and 0 < completion.usage.completion_tokens <= 12

    streamed = api.completions.create(
        model=f"{MODEL}:stable",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a parser."}]
    chat = api.chat.completions.create(model=f"{MODEL}:fast", messages=messages, max_tokens=8, temperature=0)
    assert chat.model == f"{MODEL}:fast"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in {"stop", "length"}
    deltas = api.chat.completions.create(
        model=f"{MODEL}:fast", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == chat.choices[0].message.content

    sampled = api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.9, top_p=0.9, stop=["\n"])
    assert "\n" not in sampled.choices[0].text

    assert [m.id for m in api.models.list()] == [MODEL, f"{MODEL}:stable", f"{MODEL}:fast"]
    health = httpx.get(served["url"] + "/health").json()
    assert health["status"] == "ok"


BAD_REQUESTS = [
    # (what, path, body bytes, expected status, expected param or code)
    ("malformed JSON", "/v1/completions", b'{"model": "strata-tiny", "prompt": ', 400, "invalid_json"),
    ("not an object", "/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("nested too deeply", "/v1/completions", b'{"prompt": ' + b"[" * 9_999 + b"]" * 9_999 + b"}", 400, "invalid_json"),
    ("lone surrogate", "/v1/completions", b'{"model": "strata-tiny", "prompt": "\\ud800"}', 400, "invalid_json"),
    ("a 5,000-digit integer", "/v1/completions", b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", 400, "invalid_json"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model_not_found"),
    ("unknown variant", "/v1/completions", {"model": "strata-tiny:nope", "prompt": "x"}, 404, "model_not_found"),
    (
        "prompt too long",
        "/v1/completions",
        {"model": MODEL, "prompt": "x = 1\n" * 2000},
        400,
        "context_length_exceeded",
    ),
    ("max_tokens 0", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over limit", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 481}, 400, "max_tokens"),
    ("wrong type", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("bool as int", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("unknown field", "/v1/completions", {"model": MODEL, "prompt": "x", "best_off": 3}, 400, "best_off"),
    ("n over the limit", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 129}, 400, "n"),
    ("no prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    (
        "max_completion_tokens 0",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("no messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    (
        "bad role",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "x", "content": "y"}]},
        400,
        "messages.0.role",
    ),
    ("oversized body", "/v1/completions", {"model": MODEL, "prompt": "x" * 1_100_000}, 413, None),
]


@pytest.mark.slow
def test_bad_input_gets_an_openai_error_and_never_reaches_the_engine(served):
    before = {v: model_stats(v) for v in ("stable", "fast")}
    for what, path, body, status, field in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(served["url"] + path, content=content, headers=auth(), timeout=30)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], what
        if field:
            assert field in {error["param"], error["code"]}, (what, error)
    after = {v: model_stats(v) for v in ("stable", "fast")}
    for variant in before:
        for counter in ("running", "waiting", "finished", "cancelled"):
            assert after[variant][counter] == before[variant][counter], (variant, counter)
    # ... and the server still answers well-formed requests.
    ok = httpx.post(
        served["url"] + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, headers=auth()
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_api_keys_rate_limits_and_the_audit_log(served):
    url = served["url"] + "/v1/completions"
    body = {"model": MODEL, "prompt": "import os", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEYS["main"]}):
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(served, "sk-wrong").models.list()

    statuses = [httpx.post(url, json=body, headers=auth(KEYS["limited"])) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert statuses[-1].json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(statuses[-1].headers["Retry-After"]) <= 10
    assert httpx.post(url, json=body, headers=auth(KEYS["other"])).status_code == 200  # other keys are unaffected

    from strata.serve.auth import key_id

    deadline = time.monotonic() + 30
    while True:  # a background thread writes each line just after its reply
        audit = (served["home"] / "audit.jsonl").read_text()
        lines = [json.loads(line) for line in audit.splitlines(keepends=True) if line.endswith("\n")]
        limited = [line for line in lines if line["key_id"] == key_id(KEYS["limited"])]
        if len(limited) >= 4:
            break
        assert time.monotonic() < deadline, lines[-4:]
        time.sleep(0.1)
    for key in KEYS.values():
        assert key not in audit
    assert [line["status"] for line in limited[-4:]] == [200, 200, 200, 429]
    assert {"time", "variant", "prompt_tokens", "completion_tokens", "latency_ms"} <= set(limited[-1])
    assert "prompt" not in limited[-1]


async def _send(url: str, bodies: list[dict], concurrency: int, headers: dict | None = None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(body: dict) -> httpx.Response:
            async with semaphore:
                return await http.post(url, json=body, headers={**auth(), **(headers or {})})

        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.mark.slow
def test_split_follows_the_weights_and_users_stick_to_a_variant(served):
    url = served["url"] + "/v1/completions"
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    responses = asyncio.run(_send(url, [body] * 2000, concurrency=16))
    assert all(r.status_code == 200 for r in responses)
    counts = collections.Counter(r.headers["x-strata-variant"] for r in responses)
    assert abs(counts["stable"] / 2000 - 0.9) <= 0.03, counts
    assert all(r.json()["model"] == f"{MODEL}:{r.headers['x-strata-variant']}" for r in responses)

    users = [f"user-{i}" for i in range(60)]
    sticky = asyncio.run(_send(url, [{**body, "user": u} for u in users * 4], concurrency=16))
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for user, response in zip(users * 4, sticky, strict=True):
        seen[user].add(response.headers["x-strata-variant"])
    assert all(len(variants) == 1 for variants in seen.values()), seen
    assert {v for variants in seen.values() for v in variants} == {"stable", "fast"}

    session = asyncio.run(_send(url, [body] * 8, concurrency=4, headers={"x-session-id": "session-42"}))
    assert len({r.headers["x-strata-variant"] for r in session}) == 1
    pinned = asyncio.run(_send(url, [body] * 10, concurrency=4, headers={"x-strata-variant": "fast"}))
    assert {r.headers["x-strata-variant"] for r in pinned} == {"fast"}


def apply_split(served, weights: dict[str, float]) -> None:
    """Change the split live and wait until the router serves it."""
    from strata.serve import deploy

    deploy.set_weights(served["dashboard"], APP, weights)
    shares = {name: weight / sum(weights.values()) for name, weight in weights.items()}
    deadline = time.monotonic() + 60
    while httpx.get(served["url"] + "/health").json()["split"] != shares:
        assert time.monotonic() < deadline, "the new split never arrived"
        time.sleep(0.2)


def no_end_of_text(served) -> dict[str, dict[str, int]]:
    """A logit bias that bans the model's end-of-text tokens: a sampled request runs to its max_tokens, however the
    dice fall (this tiny model draws one about every 500 tokens)."""
    from transformers import AutoTokenizer

    from strata.data.tokenizer import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(served["stable_dir"])
    return {"logit_bias": {str(token): -100 for token in stop_token_ids(tokenizer)}}


@dataclasses.dataclass
class Sent:
    client: int
    variant: str | None
    replied_at: float  # when its reply began: the router had chosen its variant by then
    finished_at: float
    error: str | None


def move_all_traffic_while_streaming(served, url: str) -> list[Sent]:
    """Move every request from `stable` to `fast` while 4 clients stream and one probes with 1-token completions;
    what each client sent, until every one of them has had a `fast` reply."""
    sent: list[Sent] = []
    stop = threading.Event()

    def send_until_stopped(client: int, stream: bool) -> None:
        """Long streams, or, as a probe of the new split, one-token completions. A stream runs longer than the split
        takes to land, and each client's streams have their own length, so the streams (batched together) do not
        end and restart in step: one is nearly always in flight when the change lands."""
        max_tokens = 240 + 80 * client if stream else 1
        body = {"model": MODEL, "prompt": "class A:\n", "max_tokens": max_tokens, **no_end_of_text(served)}
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                variant, error = None, None
                try:
                    with http.stream("POST", url, json={**body, "stream": stream}, headers=auth()) as response:
                        replied_at, variant = time.monotonic(), response.headers.get("x-strata-variant")
                        text = "".join(response.iter_text())
                    done = not stream or text.rstrip().endswith("data: [DONE]")
                    if response.status_code != 200 or not done:
                        error = f"{response.status_code}: {text[-200:]}"
                except Exception as err:  # noqa: BLE001 - any failure of a request fails the test
                    replied_at, error = time.monotonic(), repr(err)
                sent.append(Sent(client, variant, replied_at, time.monotonic(), error))

    streams = 4
    threads = [threading.Thread(target=send_until_stopped, args=(i, i < streams)) for i in range(streams + 1)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 120
        while {s.client for s in sent} != set(range(streams + 1)):  # every client has been served once
            assert time.monotonic() < deadline, sent[-3:]
            time.sleep(0.1)
        apply_split(served, {"stable": 0, "fast": 1})
        while {s.client for s in sent if s.variant == "fast"} != set(range(streams + 1)):
            assert time.monotonic() < deadline, sent[-3:]  # each client's stable stream has ended by then
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return sent


@pytest.mark.slow
def test_live_weight_change_restarts_nothing_and_fails_no_request_in_flight(served):
    """All traffic moves from `stable` to `fast` while streams run. A request's variant says which split the router
    gave it, so a `stable` stream that ends after a `fast` reply began was in flight when the change landed: the test
    finds such streams by the order of events, on any machine, and every request must succeed."""
    from strata.serve import deploy

    url = served["url"] + "/v1/completions"
    apply_split(served, {"stable": 1, "fast": 0})
    replicas_before = {v: model_stats(v)["replica"] for v in ("stable", "fast")}
    router_before = httpx.get(served["url"] + "/health").json()["replica"]
    for _ in range(3):  # move the traffic again until a stream spans the change (the first change nearly always)
        apply_split(served, {"stable": 1, "fast": 0})
        sent = move_all_traffic_while_streaming(served, url)
        assert not [s for s in sent if s.error], [s for s in sent if s.error][:3]
        first_on_new_split = min(s.replied_at for s in sent if s.variant == "fast")
        in_flight = [s for s in sent if s.variant == "stable" and s.finished_at > first_on_new_split]
        if in_flight:
            break
    assert in_flight, "in 3 changes of the split, no request was in flight while it changed"

    after = asyncio.run(_send(url, [{"model": MODEL, "prompt": "x", "max_tokens": 1}] * 40, concurrency=8))
    assert {r.headers["x-strata-variant"] for r in after} == {"fast"}
    assert {v: model_stats(v)["replica"] for v in ("stable", "fast")} == replicas_before
    assert httpx.get(served["url"] + "/health").json()["replica"] == router_before

    apply_split(served, {"stable": 90, "fast": 10})
    with pytest.raises(ValueError, match="unknown variants"):
        deploy.set_weights(served["dashboard"], APP, {"stable": 50, "canary": 50})


def wait_until_cancelled(variant: str, cancelled_before: int) -> None:
    """Until the variant's replica has counted a cancelled request more and runs none."""
    deadline = time.monotonic() + 30
    while True:
        stats = model_stats(variant)
        if stats["cancelled"] > cancelled_before and stats["running"] == 0:
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_frees_its_batch_slot(served):
    cancelled_before = model_stats("stable")["cancelled"]
    # 480 tokens take the tiny model seconds: the request is still running when the client goes.
    body = {"model": f"{MODEL}:stable", "prompt": "def f():\n", "max_tokens": 480, "stream": True}
    body |= no_end_of_text(served)  # it must still run when the client goes, not have drawn its end-of-text
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", served["url"] + "/v1/completions", json=body, headers=auth()) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        # leaving the block closes the connection mid-stream
    wait_until_cancelled("stable", cancelled_before)


@pytest.mark.slow
def test_a_client_that_gives_up_on_a_plain_completion_frees_its_batch_slot(served):
    """Without streaming the router waits on one reply from the replica; a client gone meanwhile cancels it."""
    cancelled_before = model_stats("stable")["cancelled"]
    body = {"model": f"{MODEL}:stable", "prompt": "def f():\n", "max_tokens": 480, **no_end_of_text(served)}
    body = json.dumps(body)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {auth()['Authorization']}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    url = httpx.URL(served["url"])
    with socket.create_connection((url.host, url.port)) as client:
        client.sendall((head + body).encode())
        deadline = time.monotonic() + 30
        while model_stats("stable")["running"] == 0:  # the client leaves once its request is generating
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    wait_until_cancelled("stable", cancelled_before)


@pytest.mark.slow
def test_a_killed_model_replica_fails_its_streams_cleanly_and_is_replaced(served):
    """A real fault: SIGKILL the `fast` replica while it streams. Its clients get an error event (no hang),
    `stable` keeps serving, and Serve brings up a new `fast` replica that serves again."""
    url = served["url"] + "/v1/completions"
    old = model_stats("fast")
    body = {"model": f"{MODEL}:fast", "prompt": "def f():\n", "max_tokens": 64, "stream": True, "stop": ["never!"]}
    endings, started = [], threading.Barrier(9)

    def stream() -> None:
        with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body, headers=auth()) as response:
            lines = response.iter_lines()
            next(lines)
            started.wait()
            endings.append([line for line in lines if line.startswith("data: ")][-1])

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    os.kill(old["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a stream hung after its replica died"
    assert len(endings) == 8
    errors = [json.loads(e.removeprefix("data: ")) for e in endings if e != "data: [DONE]"]
    assert errors, endings  # the kill landed mid-stream
    assert all(e["error"]["type"] == "server_error" for e in errors)

    stable = httpx.post(url, json={"model": f"{MODEL}:stable", "prompt": "x", "max_tokens": 2}, headers=auth())
    assert stable.status_code == 200
    deadline = time.monotonic() + 120
    while True:  # requests wait in Serve's queue for the replacement replica, or fail fast while it is dead
        response = httpx.post(url, json={**body, "stream": False}, headers=auth(), timeout=120)
        if response.status_code == 200:
            break
        assert response.json()["error"]["type"] == "server_error"
        assert time.monotonic() < deadline, "no new fast replica"
        time.sleep(1)
    assert model_stats("fast")["pid"] != old["pid"]


@pytest.mark.slow
def test_metrics_reach_prometheus_format(served):
    """Per-variant router metrics and per-replica engine metrics, as Ray exports them for Prometheus."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = [
        "ray_strata_router_requests_total{",
        "ray_strata_router_time_to_first_token_seconds_bucket",
        "ray_strata_serve_time_to_first_token_seconds_bucket",
        "ray_strata_serve_time_per_output_token_seconds_bucket",
        "ray_strata_serve_batch_size",
        "ray_strata_serve_queue_length",
        "ray_strata_serve_generated_tokens_total",
        "ray_strata_serve_expert_tokens_total",
    ]
    httpx.post(served["url"] + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}, headers=auth())
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        missing = [name for name in wanted if name not in text]
        if not missing:
            break
        assert time.monotonic() < deadline, missing
        time.sleep(2)
    assert 'variant="stable"' in text and 'expert="0"' in text


@pytest.mark.slow
def test_an_autoscaled_base_plus_adapter_variant_serves_the_merged_model_and_scales_with_load(served, tmp_path):
    """A variant given as a registered base plus a LoRA adapter, with autoscaling: it answers as base and adapter
    merged do, Serve adds a replica while requests pile up, and takes it away once they stop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata.config import ServeConfig
    from strata.models.adapters import merged_model
    from strata.registry import generate_text
    from strata.serve import deploy

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0
    get_peft_model(AutoModelForCausalLM.from_pretrained(served["stable_dir"]), lora).save_pretrained(tmp_path)
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2}
    autoscaling |= {"upscale_delay_s": 1, "downscale_delay_s": 2, "look_back_period_s": 11}
    variant = {"name": "tuned", "model": f"models:/{MODEL}/1", "adapter": str(tmp_path), "num_cpus": 0.1}
    variant |= {
        "autoscaling": autoscaling,
        "engine": {"max_batch_size": 4, "stream_interval_s": 0.0, "dtype": "float32"},
    }
    base = served["config"]
    config = ServeConfig(
        model_name="strata-tuned",
        variants=[variant],
        tracking_uri=base.tracking_uri,
        auth=base.auth,
        audit=base.audit,
        router_num_cpus=0.1,
    )

    def replicas() -> int:
        deployment = serve.status().applications["tuned"].deployments["model-tuned"]
        return sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING"))

    deploy.deploy_application(served["dashboard"], deploy.application(config, "tuned", "/tuned"))
    try:
        deploy.wait_until_running(served["dashboard"], "tuned", timeout_s=300)
        url = served["url"] + "/tuned/v1/completions"
        prompt = "def main(args):\n"
        body = {"model": "strata-tuned", "prompt": prompt, "max_tokens": 12, "temperature": 0}
        response = httpx.post(url, json=body, headers=auth(), timeout=60)
        assert response.status_code == 200, response.text
        merged = merged_model(str(served["stable_dir"]), "lora", str(tmp_path)).eval()
        merged.config.output_router_logits = False
        expected = generate_text(merged, AutoTokenizer.from_pretrained(served["stable_dir"]), prompt, 12)
        assert response.json()["choices"][0]["text"] == expected
        assert expected != reference(served["stable_dir"], prompt, 12), "the adapter changed nothing"

        assert replicas() == 1
        stop, failures = threading.Event(), []

        def load() -> None:
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    reply = http.post(url, json={**body, "max_tokens": 48}, headers=auth())
                    if reply.status_code != 200:
                        failures.append(reply.text)

        clients = [threading.Thread(target=load) for _ in range(8)]
        for thread in clients:
            thread.start()
        try:
            deadline = time.monotonic() + 120
            while replicas() < 2:
                assert time.monotonic() < deadline, "no replica was added under load"
                time.sleep(1)
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        assert not failures, failures[:3]
        deadline = time.monotonic() + 120
        while replicas() > 1:
            assert time.monotonic() < deadline, "the added replica was not removed once the load stopped"
            time.sleep(1)
    finally:
        serve.delete("tuned")


@pytest.mark.slow
def test_two_adapters_share_one_replica_and_answer_as_their_merged_models(served, tmp_path, capsys):
    """A 50/50 split of two LoRA adapters of one registered base, both served by one replica (a replica group): under
    concurrent mixed traffic each variant answers as its merged model does, greedy, token for token. A third adapter
    added to the running group (`strata add-variant`) is served by the same replica, which never restarts."""
    from lora_adapters import make_adapter, misfit_adapter
    from ray import serve
    from transformers import AutoTokenizer

    from strata.cli import main
    from strata.config import ServeConfig
    from strata.models.adapters import merged_model
    from strata.registry import generate_text
    from strata.serve import deploy
    from strata.serve.protocol import CompletionRequest, parse_request
    from strata.serve.router import engine_request

    base_dir = served["stable_dir"]
    adapters = {name: make_adapter(base_dir, tmp_path / name, seed) for seed, name in enumerate(("a", "b", "c"), 1)}
    shared = {"model": f"models:/{MODEL}/1", "replica_group": "lora", "num_cpus": 0.25}
    # fp32 as the references; two engine loops decoding at once on the one base
    shared["engine"] = {"max_batch_size": 16, "stream_interval_s": 0.0, "dtype": "float32", "loops": 2}
    base = served["config"]
    config = ServeConfig(
        model_name="strata-lora",
        variants=[{"name": n, "adapter": str(adapters[n]), **shared} for n in ("a", "b")],
        weights={"a": 50, "b": 50},
        tracking_uri=base.tracking_uri,
        auth=base.auth,
        audit=base.audit,
        router_num_cpus=0.1,
    )
    prompts = ["def main(args):\n", "import os\n", "class Parser:\n", "x = 1"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    expected = {}
    for name, adapter in adapters.items():
        merged = merged_model(str(base_dir), "lora", str(adapter)).eval()
        merged.config.output_router_logits = False
        expected |= {(name, p): generate_text(merged, tokenizer, p, 10) for p in prompts}
    assert len({expected[(n, prompts[0])] for n in adapters}) == 3, "the adapters are too alike to tell apart"

    deploy.deploy_application(served["dashboard"], deploy.application(config, "lora", "/lora"))
    try:
        deploy.wait_until_running(served["dashboard"], "lora", timeout_s=300)
        assert set(serve.status().applications["lora"].deployments) == {"Router", "group-lora"}
        group = serve.get_deployment_handle("group-lora", app_name="lora")
        pid = group.stats.remote().result()["pid"]
        url = served["url"] + "/lora/v1/completions"
        bodies = [
            {"model": "strata-lora", "prompt": p, "max_tokens": 10, "temperature": 0, "user": f"user-{i}"}
            for i in range(12)
            for p in prompts
        ]
        responses = asyncio.run(_send(url, bodies, concurrency=12))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        served_by = [r.headers["x-strata-variant"] for r in responses]
        assert set(served_by) == {"a", "b"}
        for body, variant, response in zip(bodies, served_by, responses, strict=True):
            assert response.json()["choices"][0]["text"] == expected[(variant, body["prompt"])], (variant, body)

        add = ["add-variant", "c", "--app", "lora", "--group", "lora", "--adapter", str(adapters["c"])]
        assert main([*add[:4], "--group", "nope", *add[6:]]) == 2  # no such group: refused before Serve sees it
        assert "error: application 'lora' has no replica group 'nope'" in capsys.readouterr().err
        dora = make_adapter(base_dir, tmp_path / "dora", 4, use_dora=True)
        assert main(["add-variant", "d", *add[2:6], "--adapter", str(dora)]) == 2  # refused before Serve sees it
        assert "error: variant 'd': a DoRA adapter; serve it without replica_group" in capsys.readouterr().err
        # An adapter of another base: only the replica finds it out, and leaves it out; the router never hears of it.
        misfit = misfit_adapter(adapters["c"], tmp_path / "misfit")
        assert main(["add-variant", "m", *add[2:6], "--adapter", str(misfit)]) == 2
        assert "error: variant 'm': replica group 'lora' failed to load its adapter" in capsys.readouterr().err
        body = {"model": "strata-lora:m", "prompt": prompts[0], "max_tokens": 10, "temperature": 0}
        assert httpx.post(url, json=body, headers=auth(), timeout=60).status_code == 404
        # The replica asked to serve it says so: with several replicas, a router told of the variant by one that
        # loaded it may send its rows to one that failed, which answers 503 (the server's fault), never 404.
        request = engine_request(parse_request(CompletionRequest, json.dumps(body).encode()), max_tokens=10)
        reply = group.complete.remote({**request, "variant": "m"}).result()
        assert reply["status"] == 503 and "'m' failed to load on this replica" in reply["error"], reply
        [entry] = [a for a in deploy.running_config(served["dashboard"])["applications"] if a["name"] == "lora"]
        [server] = [d for d in entry["deployments"] if d["name"] == "group-lora"]
        assert [v["name"] for v in server["user_config"]["variants"]] == ["a", "b"], "the refused adapter stayed"

        assert main(add) == 0  # served as soon as the command returns: the router learns of it last
        body = {"model": "strata-lora:c", "prompt": prompts[0], "max_tokens": 10, "temperature": 0}
        reply = httpx.post(url, json=body, headers=auth(), timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected[("c", prompts[0])]
        for name in ("a", "b"):
            body = {"model": f"strata-lora:{name}", "prompt": prompts[1], "max_tokens": 10, "temperature": 0}
            reply = httpx.post(url, json=body, headers=auth(), timeout=60)
            assert reply.json()["choices"][0]["text"] == expected[(name, prompts[1])], name
        assert group.stats.remote().result()["pid"] == pid, "the replica restarted"

        # The replica dies (SIGKILL) while c's adapter cannot be read (its weights moved away): the new replica
        # serves a and b, answers 503 for c, and loads c on its own once the file is back.
        weights = adapters["c"] / "adapter_model.safetensors"
        weights.rename(weights.with_suffix(".away"))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while not ((new := _stats_or_none(group)) and new["pid"] != pid and "c" in new["refused"]):
            assert time.monotonic() < deadline, new
            time.sleep(1)
        body = {"model": "strata-lora:c", "prompt": prompts[0], "max_tokens": 10, "temperature": 0}
        reply = httpx.post(url, json=body, headers=auth(), timeout=60)
        assert reply.status_code == 503 and "'c' failed to load on this replica" in reply.text, reply.text
        reply = httpx.post(url, json={**body, "model": "strata-lora:a"}, headers=auth(), timeout=60)
        assert reply.json()["choices"][0]["text"] == expected[("a", prompts[0])]
        weights.with_suffix(".away").rename(weights)
        while (reply := httpx.post(url, json=body, headers=auth(), timeout=60)).status_code != 200:
            assert reply.status_code == 503 and time.monotonic() < deadline, reply.text
            time.sleep(1)
        assert reply.json()["choices"][0]["text"] == expected[("c", prompts[0])]
    finally:
        serve.delete("lora")


@pytest.mark.slow
def test_an_adapter_added_live_is_kept_only_once_every_replica_of_its_group_loaded_it(served, tmp_path, capsys):
    """A group of two replicas, one of which the kernel refuses the new adapter's weights (fanotify: a real fault,
    as on a node that cannot read the path): the variant added live loads on one replica and fails on the other,
    and is taken back out, naming how many replicas failed. Once the file opens again, the same add is served by
    both."""
    from lora_adapters import make_adapter
    from open_denied import open_denied
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from strata.cli import main
    from strata.config import ServeConfig
    from strata.serve import deploy

    adapters = {n: make_adapter(served["stable_dir"], tmp_path / n, seed) for seed, n in enumerate(("a", "c"), 1)}
    engine = {"max_batch_size": 4, "stream_interval_s": 0.0, "dtype": "float32"}
    variant = {"model": f"models:/{MODEL}/1", "replica_group": "duo", "num_cpus": 0.2, "num_replicas": 2}
    base = served["config"]
    config = ServeConfig(
        model_name="strata-duo",
        variants=[{"name": "a", "adapter": str(adapters["a"]), "engine": engine, **variant}],
        tracking_uri=base.tracking_uri,
        auth=base.auth,
        audit=base.audit,
        router_num_cpus=0.1,
    )
    deploy.deploy_application(served["dashboard"], deploy.application(config, "duo", "/duo"))
    try:
        deploy.wait_until_running(served["dashboard"], "duo", timeout_s=300)
        details = ServeSubmissionClient(served["dashboard"]).get_serve_details()
        replicas = details["applications"]["duo"]["deployments"]["group-duo"]["replicas"]
        assert len(replicas) == 2
        add = ["add-variant", "c", "--app", "duo", "--group", "duo", "--adapter", str(adapters["c"])]
        with open_denied(adapters["c"] / "adapter_model.safetensors", replicas[0]["pid"]) as refused:
            assert main(add) == 2
        assert refused, "the replica never tried to open the adapter"
        err = " ".join(capsys.readouterr().err.split())  # unwrapped: the console folds long lines
        assert "variant 'c': replica group 'duo' failed to load its adapter on 1 of 2 replicas" in err, err
        [entry] = [a for a in deploy.running_config(served["dashboard"])["applications"] if a["name"] == "duo"]
        [server] = [d for d in entry["deployments"] if d["name"] == "group-duo"]
        assert [v["name"] for v in server["user_config"]["variants"]] == ["a"], "the refused adapter stayed"

        assert main(add) == 0
        assert "variant 'c' served by replica group 'duo' (2 replicas)" in " ".join(capsys.readouterr().err.split())
        group = serve.get_deployment_handle("group-duo", app_name="duo")
        seen = {}
        for _ in range(40):  # each call reaches one replica: both answer within a few
            stats = group.stats.remote().result()
            seen[stats["pid"]] = "c" in stats["info"] and "c" not in stats["refused"]
        assert seen == {r["pid"]: True for r in replicas}, seen
    finally:
        serve.delete("duo")


def _stats_or_none(handle) -> dict | None:
    """A deployment's stats, or None while its replica is being replaced."""
    try:
        return handle.stats.remote().result(timeout_s=10)
    except Exception:
        return None


def test_checked_in_ab_config_is_valid():
    from strata.config import ServeConfig
    from strata.serve.routing import Split

    config = yaml.safe_load((ROOT / "serve_apps/ab.yaml").read_text())
    [app] = config["applications"]
    assert app["import_path"] == "serve_apps.ab:build_app"
    parsed = ServeConfig.model_validate(app["args"])
    # Versions, not aliases: a replica started later must load its siblings' weights.
    assert all(re.fullmatch(r"models:/[\w.-]+/\d+", v.model) for v in parsed.variants), parsed.variants
    [router] = [d for d in app["deployments"] if d["name"] == "Router"]
    Split(router["user_config"]["weights"], [v.name for v in parsed.variants])


def test_serve_config_errors_name_the_field():
    from pydantic import ValidationError

    from strata.config import ServeConfig

    variants = [{"name": "stable", "model": "models:/m/1"}]
    with pytest.raises(ValidationError, match="variants.0.num_replicas"):
        ServeConfig.model_validate({"model_name": "m", "variants": [{**variants[0], "num_replicas": 0}]})
    with pytest.raises(ValidationError, match="unknown variants"):
        ServeConfig.model_validate({"model_name": "m", "variants": variants, "weights": {"canary": 1}})
    with pytest.raises(ValidationError, match="variants.0.engine.max_batch_sise"):
        ServeConfig.model_validate({"model_name": "m", "variants": [{**variants[0], "engine": {"max_batch_sise": 4}}]})
    too_short = {**variants[0], "autoscaling": {"look_back_period_s": 2}}
    with pytest.raises(ValidationError, match=r"variants.0.autoscaling.look_back_period_s\n.*greater than 10"):
        ServeConfig.model_validate({"model_name": "m", "variants": [too_short]})


@pytest.mark.slow
def test_deploy_and_split_commands(served, capsys):
    """`jobs/deploy.py` (= `strata deploy`) pins the aliases' versions, deploys beside running apps, and `strata
    split` moves all traffic live. Runs last: it replaces the module's application on the same route."""
    from ray import serve

    from strata.cli import main
    from strata.serve.auth import hash_key

    serve.delete(APP)
    keys_file = served["home"] / "keys.txt"
    out = served["home"] / "deployed.yaml"
    argv = ["deploy", "--model", MODEL, "--split", "stable=50,fast=50", "--app", "cli", "--num-cpus", "0.5"]
    assert main([*argv, "--keys-file", str(keys_file), "--torch-threads", "0"]) == 2
    assert "torch_threads" in capsys.readouterr().err  # refused, naming the field, before anything deploys
    assert (
        main([*argv, "--keys-file", str(keys_file), "--out", str(out), "--max-batch-size", "8", "--torch-threads", "1"])
        == 0
    )
    [app] = yaml.safe_load(out.read_text())["applications"]
    assert {v["engine"]["torch_threads"] for v in app["args"]["variants"]} == {1}
    assert [v["model"] for v in app["args"]["variants"]] == [f"models:/{MODEL}/1", f"models:/{MODEL}/2"]
    assert app["args"]["auth"]["api_key_hashes"] == [hash_key(key) for key in KEYS.values()]
    assert "api_keys_file" not in app["args"]["auth"] and not [k for k in KEYS.values() if k in out.read_text()]
    assert app["deployments"] == [{"name": "Router", "user_config": {"weights": {"stable": 50.0, "fast": 50.0}}}]

    url = served["url"] + "/v1/completions"
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    counts = collections.Counter(r.headers["x-strata-variant"] for r in asyncio.run(_send(url, [body] * 40, 8)))
    assert counts == {"stable": 20, "fast": 20}

    assert main(["split", "--app", "cli", "stable=0,fast=1"]) == 0
    deadline = time.monotonic() + 60
    while httpx.get(served["url"] + "/health").json()["split"]["fast"] != 1.0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert {r.headers["x-strata-variant"] for r in asyncio.run(_send(url, [body] * 20, 8))} == {"fast"}

    assert main(["split", "--app", "cli", "stable=1,nope=1"]) == 2
    assert "unknown variants" in capsys.readouterr().err
