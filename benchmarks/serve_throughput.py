"""Serving throughput: Strata's continuous batching behind the real HTTP endpoint, against transformers `generate`.

On the same model (an MoE preset, `small` by default, with a locally trained tokenizer) and the same requests
(greedy, varied prompt lengths, up to --max-tokens new tokens each, so every side generates exactly the same
tokens), at 1, 8 and 32 concurrent clients:

  (a) transformers `generate`, one request at a time, in this process;
  (b) `generate` on static batches of the same requests (one batch per round of clients): the upper bound for
      batched decoding, since it has no scheduler, no HTTP and no streaming;
  (c) Strata: `concurrency` streaming clients on the OpenAI endpoint (router -> model replica), each sending
      --rounds requests one after another. TTFT is what the clients see: the time to the first streamed token.

Generated tokens/s counts real tokens (up to EOS) on every side. Target at 32 clients: (c) >= 0.8x (b); (a) is a
reference, not a target. It also measures the router's added latency: one-token completions through the router
(with auth, split and audit), through a bare Serve hop (an ingress that only forwards to the model deployment: the
floor any router deployment pays) and straight to a model deployment, interleaved. Target: the router's own work,
router minus bare hop, <= 2 ms p50.

The baselines run in this process with all the machine's threads; the model replica shares the machine with the
HTTP proxy, the router and the clients. Timings are reported, never asserted.

    python benchmarks/serve_throughput.py [--max-tokens 64] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import httpx  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from fastapi import Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from generation import build_base, compare_level, levels_table, make_prompts, percentile  # noqa: E402
from ray import serve  # noqa: E402
from reporting import RESULTS_DIR, check, verdict, write_results  # noqa: E402
from rich.console import Console  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from strata.config import EngineSettings, ServeConfig  # noqa: E402
from strata.runtime import strata_runtime_env  # noqa: E402
from strata.serve import protocol  # noqa: E402
from strata.serve.app import build_application  # noqa: E402
from strata.serve.model_server import ModelServer  # noqa: E402
from strata.serve.protocol import CompletionRequest  # noqa: E402
from strata.serve.router import engine_request  # noqa: E402

THREADS = 2  # torch threads for the baselines and for the model replica
CONCURRENCY = (1, 8, 32)
TARGET_VS_STATIC = 0.8
TARGET_ROUTER_MS = 2.0
API_KEY = "sk-bench-0123456789abcdef"


async def strata_clients(
    url: str, prompts: list[str], concurrency: int, max_tokens: int, model: str = "bench:stable"
) -> dict[str, Any]:
    """`concurrency` streaming clients, each sending its share of `prompts` one after another to `model`."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ttfts: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient, mine: list[str]) -> None:
        nonlocal tokens
        for prompt in mine:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sent, first = time.perf_counter(), None
            async with http.stream("POST", url, json=body, headers=headers) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if first is None and chunk["choices"]:
                        first = time.perf_counter()
                        ttfts.append(first - sent)
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, prompts[i::concurrency]) for i in range(concurrency)))
        seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
    }


@serve.deployment
class DirectModelServer(ModelServer.func_or_class):
    """A model deployment answering plain completions over HTTP itself: the no-router latency baseline."""

    async def __call__(self, http: Request) -> JSONResponse:
        body = CompletionRequest.model_validate_json(await http.body())
        reply = await self.complete(engine_request(body, body.max_tokens))
        usage = protocol.usage(reply["prompt_tokens"], reply["completion_tokens"])
        rid = protocol.completion_id(chat=False)
        return JSONResponse(protocol.response_body(False, rid, body.model, reply["choices"], usage))


@serve.deployment(ray_actor_options={"num_cpus": 0})
class BareHop:
    """The least any router adds: one Serve handle call to the model deployment, and none of the router's work."""

    def __init__(self, app_name: str, deployment_name: str):
        self.model = serve.get_deployment_handle(deployment_name, app_name=app_name)

    async def __call__(self, http: Request) -> JSONResponse:
        body = CompletionRequest.model_validate_json(await http.body())
        reply = await self.model.complete.remote(engine_request(body, body.max_tokens))
        return JSONResponse({"choices": [{"text": reply["choices"][0]["text"]}]})


def router_overhead(base_url: str, requests: int) -> dict[str, float]:
    """One-token completions, interleaved: through the router (pinned variant), through a bare Serve hop, and
    straight to a model deployment. The bare hop separates what Serve itself costs from the router's own work."""
    body = {"prompt": "def f(x):", "max_tokens": 1, "temperature": 0}
    paths = {
        "router": (f"{base_url}/v1/completions", {"model": "bench:stable"}),
        "hop": (f"{base_url}/hop", {"model": "bench"}),
        "direct": (f"{base_url}/direct", {"model": "bench"}),
    }
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    with httpx.Client(timeout=60) as http:
        for i in range(requests + 20):
            for name, (url, extra) in paths.items():
                started = time.perf_counter()
                response = http.post(url, json={**body, **extra}, headers={"Authorization": f"Bearer {API_KEY}"})
                response.raise_for_status()
                if i >= 20:  # warmup
                    latencies[name].append(time.perf_counter() - started)
    p50 = {name: statistics.median(values) * 1000 for name, values in latencies.items()}
    return {
        "router_p50_ms": p50["router"],
        "bare_hop_p50_ms": p50["hop"],
        "direct_p50_ms": p50["direct"],
        "added_p50_ms": p50["router"] - p50["direct"],
        "router_work_p50_ms": p50["router"] - p50["hop"],
        "bare_hop_added_p50_ms": p50["hop"] - p50["direct"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (fewer at EOS)")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--latency-requests", type=int, default=200, help="requests per side for router latency")
    parser.add_argument("--stream-interval", type=float, default=EngineSettings().stream_interval_s)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"], help="model preset")
    parser.add_argument("--replica-threads", type=int, default=1, help="torch threads of the model replica")
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Serve's gRPC transport between deployments, ...)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve_throughput.json", help="JSON file")
    args = parser.parse_args()
    if args.max_tokens <= 0 or args.rounds <= 0:
        parser.error("--max-tokens and --rounds must be positive")

    began = time.perf_counter()
    console = Console()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_base(Path(tmp), args.preset, console)
        keys = Path(tmp) / "keys.txt"
        keys.write_text(API_KEY + "\n")
        model = AutoModelForCausalLM.from_pretrained(model_dir, output_router_logits=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")

        if args.throughput_optimized:
            os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by every Ray process this driver starts
        ray.init(
            address="local",
            num_cpus=THREADS + 1,
            include_dashboard=False,
            log_to_driver=False,  # the replicas log every request: keep the report readable
            runtime_env=strata_runtime_env(),
        )
        port = 8000 + random.randrange(1000)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = EngineSettings(
            max_batch_size=max(CONCURRENCY),
            torch_threads=args.replica_threads,
            stream_interval_s=args.stream_interval,
            dtype="float32",  # as the baselines in this process
        )
        variant = {"name": "stable", "model": str(model_dir), "num_cpus": 1, "engine": engine}
        config = ServeConfig(
            model_name="bench",
            variants=[variant],
            auth={"api_keys_file": str(keys), "requests_per_minute": 1e9, "burst": 1_000_000},
            audit={"path": str(Path(tmp) / "audit.jsonl")},
            router_num_cpus=0,
        )
        with console.status("deploying the router + model replica, and a direct model deployment"):
            serve.run(build_application(config), name="bench", route_prefix="/")
            direct = DirectModelServer.options(name="direct", ray_actor_options={"num_cpus": 0})
            serve.run(
                direct.bind("bench", config.variants[0].model_dump(), None), name="direct", route_prefix="/direct"
            )
            serve.run(BareHop.bind("direct", "direct"), name="hop", route_prefix="/hop")
        base_url = f"http://127.0.0.1:{port}"

        levels = {}
        for concurrency in CONCURRENCY:
            prompts = make_prompts(tokenizer, concurrency * args.rounds, seed=concurrency)
            asyncio.run(strata_clients(f"{base_url}/v1/completions", prompts[:concurrency], concurrency, 8))  # warm
            url = f"{base_url}/v1/completions"
            levels[concurrency] = compare_level(
                model,
                tokenizer,
                prompts,
                concurrency,
                args.max_tokens,
                partial(asyncio.run, strata_clients(url, prompts, concurrency, args.max_tokens)),
                console,
            )
        with console.status(f"router latency: {args.latency_requests} one-token requests each way"):
            latency = router_overhead(base_url, args.latency_requests)
        serve.shutdown()
        ray.shutdown()

    top = levels[max(CONCURRENCY)]
    results = {
        "setup": {
            "model": f"{args.preset} preset (Qwen3-MoE), vocab 1024",
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "torch_threads": THREADS,
            "stream_interval_s": args.stream_interval,
            "stream_chunks_per_s": engine.stream_chunks_per_s,
            "replica_torch_threads": args.replica_threads,
            "ray_serve_throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1",
            "max_batch_size": engine.max_batch_size,
        },
        "levels": levels,
        "router_latency": latency,
        "targets": {
            "vs_static_batch_at_32": check(top["strata_vs_static_batch"], ">=", TARGET_VS_STATIC),
            "router_work_p50_ms": check(latency["router_work_p50_ms"], "<=", TARGET_ROUTER_MS),
        },
        "seconds": time.perf_counter() - began,
    }
    write_results(args.out, results)
    report(console, results)
    console.print(f"results: {args.out} ({results['seconds']:.0f} s)")


def report(console: Console, results: dict[str, Any]) -> None:
    title = "generated tokens/s (greedy, same requests on every side)"
    console.print(levels_table(title, "(c) Strata HTTP", results["levels"]))
    latency = results["router_latency"]
    console.print(
        f"router: p50 {latency['router_p50_ms']:.1f} ms vs direct {latency['direct_p50_ms']:.1f} ms "
        f"-> +{latency['added_p50_ms']:.2f} ms (a bare Serve hop: +{latency['bare_hop_added_p50_ms']:.2f} ms)"
    )
    for name, target in results["targets"].items():
        console.print(f"{name}: {target['value']:.2f} (target {target['target']}): {verdict(target['target_met'])}")


if __name__ == "__main__":
    main()
