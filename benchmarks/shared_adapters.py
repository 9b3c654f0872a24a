"""Two LoRA variants on one shared replica against two replicas, under the same 50/50 traffic: memory and tokens/s.

Both applications run side by side on one local Ray, behind the real router and HTTP endpoint, with the same base
(an MoE preset, `small` by default) and the same two random LoRA adapters (attention projections):

  (a) two replicas: each variant its own replica holding base + adapter merged (what Strata did before replica
      groups), `--threads`/2 torch threads each;
  (b) one shared replica (a replica group): the base once, both adapters beside it, every row decoded with its own
      adapter (`strata.serve.mixed_lora`), `--threads` torch threads over its `--loops` engine loops.

and for reference

  (c) one replica of one merged model (variant `a` alone) taking all the traffic, set up as (b): what any one
      replica does on this machine, which separates the cost of decoding two adapters in one batch ((b) vs (c))
      from the cost of one replica process instead of two ((c) vs (a)).

The same CPU threads on each side. Traffic: `--clients` concurrent clients, each sending `--rounds` greedy requests
(up to --max-tokens new tokens) to the split, users spread over both variants; the sides take turns, `--repeats`
times, each side first in turn, and each side's tokens/s is its median over those turns. Memory: the resident
memory (RSS) of the model replicas' processes, which is what a replica costs a node, and the bytes of model weights
each side holds.
Targets: (b) at most 0.6x (a)'s memory, at no less than 0.9x its tokens/s. Timings are reported, never asserted.

    python benchmarks/shared_adapters.py [--preset small] [--clients 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from generation import build_base, make_prompts  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from ray import serve  # noqa: E402
from reporting import RESULTS_DIR, check, verdict, write_results  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from strata.config import ServeConfig  # noqa: E402
from strata.runtime import strata_runtime_env  # noqa: E402
from strata.serve.app import build_application  # noqa: E402
from strata.serve.loading import load_for_serving  # noqa: E402
from strata.serve.shared_base import SharedBase  # noqa: E402

API_KEY = "sk-bench-0123456789abcdef"
VARIANTS = ("a", "b")
TARGET_MEMORY = 0.6
TARGET_TOKENS = 0.9


def make_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    """A random LoRA adapter (B nonzero, so it changes the model) of the attention projections."""
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora).save_pretrained(out_dir)
    return out_dir


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


async def clients(url: str, prompts: list[str], count: int, max_tokens: int) -> dict[str, Any]:
    """`count` clients, each sending its share of `prompts` one after another; users spread over the split.

    On aiohttp, not httpx: the clients share the 2 cores with what they measure; httpx's took ~15% of a core at these
    ~16 requests/s, aiohttp's under half that (per-process CPU time over a minute of turns)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tokens, served = 0, {v: 0 for v in VARIANTS}

    async def client(http: aiohttp.ClientSession, index: int) -> None:
        nonlocal tokens
        for prompt in prompts[index::count]:
            body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            async with http.post(url, json={**body, "user": f"user-{index}"}, headers=headers) as reply:
                reply.raise_for_status()
                tokens += (await reply.json())["usage"]["completion_tokens"]
                served[reply.headers["x-strata-variant"]] += 1

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=count)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        await asyncio.gather(*(client(http, i) for i in range(count)))
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "requests_per_variant": served}


def replica_stats(app: str) -> list[dict[str, Any]]:
    """`ModelServer.stats()` of every model replica of `app` (the router's left out: both sides have one)."""
    names = [name for name in serve.status().applications[app].deployments if name != "Router"]
    return [serve.get_deployment_handle(name, app_name=app).stats.remote().result() for name in names]


def replica_rss(app: str) -> int:
    """The resident memory of every model replica process of `app`."""
    return sum(psutil.Process(stats["pid"]).memory_info().rss for stats in replica_stats(app))


def engine_counters(app: str) -> dict[str, float]:
    """Decode steps, tokens and seconds spent stepping, summed over `app`'s replicas, and how many replicas: a turn's
    difference says how full its batches ran and how long a step took, which is where two sides of equal tokens/s
    targets differ."""
    stats = replica_stats(app)
    return {"replicas": len(stats), **{key: sum(s[key] for s in stats) for key in ("steps", "tokens", "busy_seconds")}}


def engine_turn(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """A turn per replica: tokens per decode step, milliseconds per step, and the share of the turn spent stepping."""
    steps, busy = after["steps"] - before["steps"], after["busy_seconds"] - before["busy_seconds"]
    return {
        "tokens_per_step": (after["tokens"] - before["tokens"]) / steps,
        "step_ms": 1000 * busy / steps,
        "busy": busy / (seconds * after["replicas"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"], help="model preset")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (16 per variant on average)")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side (split over (a)'s replicas)")
    parser.add_argument("--loops", type=int, default=1, help="engine loops of the shared replica (threads split)")
    parser.add_argument("--repeats", type=int, default=10, help="turns each side takes (the machine is noisy)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "shared_adapters.json", help="JSON file")
    args = parser.parse_args()

    began = time.perf_counter()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = build_base(Path(tmp), args.preset, console)
        adapters = {v: make_adapter(base_dir, Path(tmp) / v, seed) for seed, v in enumerate(VARIANTS, 1)}
        prompts = make_prompts(AutoTokenizer.from_pretrained(base_dir), args.clients * args.rounds, seed=1)
        (Path(tmp) / "keys.txt").write_text(API_KEY + "\n")
        common = {
            "model_name": "bench",
            "weights": {v: 50 for v in VARIANTS},
            "auth": {"api_keys_file": str(Path(tmp) / "keys.txt"), "requests_per_minute": 1e9, "burst": 1_000_000},
            "audit": {"path": str(Path(tmp) / "audit.jsonl")},
            "router_num_cpus": 0,
            "experiment": "bench",  # the same users go to the same variants on both sides
        }
        engine = {"max_batch_size": args.clients, "stream_interval_s": 0.0}
        variant = {"model": str(base_dir), "num_cpus": 0}
        separate = ServeConfig(
            **common,
            variants=[
                {
                    "name": v,
                    "adapter": str(adapters[v]),
                    **variant,
                    "engine": {**engine, "torch_threads": args.threads // 2},
                }
                for v in VARIANTS
            ],
        )
        shared = ServeConfig(
            **common,
            variants=[
                {
                    "name": v,
                    "adapter": str(adapters[v]),
                    "replica_group": "lora",
                    **variant,
                    "engine": {**engine, "loops": args.loops, "torch_threads": max(1, args.threads // args.loops)},
                }
                for v in VARIANTS
            ],
        )
        single = ServeConfig(
            **{**common, "weights": {}}, variants=[shared.variants[0].model_copy(update={"replica_group": None})]
        )
        weights = {  # what the model replicas hold, loaded as they load it (in their precision)
            "two_replicas": sum(weight_bytes(load_for_serving(v)[0]) for v in separate.variants),
            "shared_replica": weight_bytes(SharedBase(shared.variants).model),
        }
        ray.init(
            address="local",
            num_cpus=args.threads,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=strata_runtime_env(),
        )
        port = 8000 + random.randrange(1000)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with console.status("deploying both sides"):
            serve.run(build_application(separate), name="two_replicas", route_prefix="/two")
            serve.run(build_application(shared), name="shared_replica", route_prefix="/shared")
            serve.run(build_application(single), name="one_model", route_prefix="/one")
        urls = {"two_replicas": f"http://127.0.0.1:{port}/two/v1/completions"}
        urls["shared_replica"] = f"http://127.0.0.1:{port}/shared/v1/completions"
        urls["one_model"] = f"http://127.0.0.1:{port}/one/v1/completions"
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in urls}
        for url in urls.values():  # warm-up
            asyncio.run(clients(url, prompts[: args.clients], args.clients, 8))
        sides = list(urls)
        for repeat in range(args.repeats):
            for side in sides[repeat % 3 :] + sides[: repeat % 3]:  # each side first in turn: drifts fall on all
                url = urls[side]
                with console.status(f"turn {repeat + 1}/{args.repeats}: {side}"):
                    before = engine_counters(side)
                    turn = asyncio.run(clients(url, prompts, args.clients, args.max_tokens))
                    runs[side].append({**turn, **engine_turn(before, engine_counters(side), turn["seconds"])})
        rss = {side: replica_rss(side) for side in urls}
        serve.shutdown()
        ray.shutdown()

    tokens_per_s = {side: statistics.median(r["tokens_per_s"] for r in turns) for side, turns in runs.items()}
    engines = {
        side: {key: statistics.median(r[key] for r in turns) for key in ("tokens_per_step", "step_ms", "busy")}
        for side, turns in runs.items()
    }
    memory_ratio = rss["shared_replica"] / rss["two_replicas"]
    tokens_ratio = tokens_per_s["shared_replica"] / tokens_per_s["two_replicas"]
    results = {
        "setup": {
            "model": f"{args.preset} preset (Qwen3-MoE), vocab 1024; LoRA r=16 on q/k/v/o_proj",
            "clients": args.clients,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "torch_threads_per_side": args.threads,
            "shared_replica_loops": args.loops,
            "repeats": args.repeats,
        },
        "tokens_per_s": tokens_per_s,
        "engine_steps": engines,  # per replica, median turn: tokens per decode step, ms per step, share spent stepping
        "replica_rss_bytes": rss,
        "weight_bytes": {**weights, "one_model": weights["two_replicas"] // 2},
        "runs": runs,
        "targets": {
            "memory_ratio": check(memory_ratio, "<=", TARGET_MEMORY),
            "tokens_per_s_ratio": check(tokens_ratio, ">=", TARGET_TOKENS),
            "weight_bytes_ratio": {"value": weights["shared_replica"] / weights["two_replicas"]},
            "shared_vs_one_model_tokens_per_s": {"value": tokens_per_s["shared_replica"] / tokens_per_s["one_model"]},
        },
        "seconds": time.perf_counter() - began,
    }
    write_results(args.out, results)
    report(console, results)
    console.print(f"results: {args.out} ({results['seconds']:.0f} s)")


def report(console: Console, results: dict[str, Any]) -> None:
    table = Table(title="two LoRA variants, 50/50: two replicas vs one shared replica")
    for column in ("", "tokens/s", "tokens/step", "ms/step", "busy", "replica RSS (MiB)", "weights (MiB)"):
        table.add_column(column, justify="right")
    for side in ("two_replicas", "shared_replica", "one_model"):
        table.add_row(
            side,
            f"{results['tokens_per_s'][side]:.0f}",
            f"{results['engine_steps'][side]['tokens_per_step']:.1f}",
            f"{results['engine_steps'][side]['step_ms']:.1f}",
            f"{results['engine_steps'][side]['busy']:.0%}",
            f"{results['replica_rss_bytes'][side] / 2**20:.0f}",
            f"{results['weight_bytes'][side] / 2**20:.1f}",
        )
    console.print(table)
    for name, target in results["targets"].items():
        if "target" not in target:
            console.print(f"{name}: {target['value']:.2f}")
            continue
        console.print(f"{name}: {target['value']:.2f} (target {target['target']}): {verdict(target['target_met'])}")


if __name__ == "__main__":
    main()
