"""The continuous-batching engine in-process, against transformers `generate`: the engine's own ceiling, no HTTP.

Same model, same greedy requests, at 1, 8 and 32 concurrent clients:

  (a) `generate`, one request at a time;
  (b) `generate` on static batches of the same requests (one batch per round of clients);
  (c) Strata's `Engine` on its scheduler thread, fed by `concurrency` closed-loop clients: each submits its next
      request the moment its previous one finishes, as a streaming HTTP client would.

`serve_throughput.py` measures the same through the Serve HTTP path; the gap between the two is what the proxy,
router and streaming cost. Runs on CPU or CUDA (bf16 there), without Ray. Timings are reported, never asserted.

    python benchmarks/engine_throughput.py [--preset small] [--device cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from generation import (
    build_base,
    compare_level,
    levels_table,
    make_prompts,
    percentile,
    static_batches,
    synchronize,
)
from reporting import RESULTS_DIR, write_results
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from strata.config import EngineSettings
from strata.serve.engine import Engine, Output, SamplingParams
from strata.serve.precision import resolve_precision

CONCURRENCY = (1, 8, 32)


def engine_clients(engine: Engine, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """`concurrency` closed-loop clients over `prompts`; TTFT is submit to the first streamed text."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    queues = [prompts[i::concurrency] for i in range(concurrency)]
    ttfts: list[float] = []
    tokens = 0
    remaining = len(prompts)
    done = threading.Event()

    def send(client: int) -> None:
        prompt = queues[client].pop(0)
        sent, first = time.perf_counter(), False

        def sink(output: Output) -> None:
            nonlocal first, tokens, remaining
            if not first and (output.text or output.finish_reason):
                first = True
                ttfts.append(time.perf_counter() - sent)
            if output.finish_reason:  # runs on the engine thread: no lock needed
                tokens += output.completion_tokens
                remaining -= 1
                if queues[client]:
                    send(client)
                elif remaining == 0:
                    done.set()

        engine.submit(engine.tokenizer.encode(prompt, add_special_tokens=False), params, sink)

    started = time.perf_counter()
    for client in range(concurrency):
        send(client)
    done.wait()
    synchronize(engine.model)
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (fewer at EOS)")
    parser.add_argument("--rounds", type=int, default=4, help="requests each client sends, one after another")
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "moe-1b"], help="model preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 where native"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--admission-group", type=int, default=EngineSettings().admission_group)
    parser.add_argument("--admission-wait", type=float, default=EngineSettings().admission_wait_s)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engine_throughput.json", help="JSON file")
    args = parser.parse_args()
    if args.max_tokens <= 0 or args.rounds <= 0:
        parser.error("--max-tokens and --rounds must be positive")

    began = time.perf_counter()
    console = Console()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_precision(args.dtype, device).dtype
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_base(Path(tmp), args.preset, console)
        model = AutoModelForCausalLM.from_pretrained(model_dir, output_router_logits=False, dtype=dtype)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=max(CONCURRENCY),
        admission_group=args.admission_group,
        admission_wait_s=args.admission_wait,
    )
    scheduler = threading.Thread(target=engine.run, daemon=True)
    scheduler.start()

    levels = {}
    for concurrency in CONCURRENCY:
        prompts = make_prompts(tokenizer, concurrency * args.rounds, seed=concurrency)
        engine_clients(engine, prompts[:concurrency], concurrency, 8)  # warm up every batch shape once
        static_batches(model, tokenizer, prompts[:concurrency], concurrency, 8)
        levels[concurrency] = compare_level(
            model,
            tokenizer,
            prompts,
            concurrency,
            args.max_tokens,
            partial(engine_clients, engine, prompts, concurrency, args.max_tokens),
            console,
        )
    engine.stop()

    results = {
        "setup": {
            "model": f"{args.preset} preset (Qwen3-MoE), vocab 1024",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads",
            "dtype": str(dtype).removeprefix("torch."),
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "admission_group": args.admission_group,
            "admission_wait_s": args.admission_wait,
            "torch": torch.__version__,
        },
        "levels": levels,
        "seconds": time.perf_counter() - began,
    }
    write_results(args.out, results)
    report(console, results)
    console.print(f"results: {args.out} ({results['seconds']:.0f} s)")


def report(console: Console, results: dict[str, Any]) -> None:
    setup = results["setup"]
    title = f"generated tokens/s, engine in-process ({setup['device']}, {setup['dtype']})"
    console.print(levels_table(title, "(c) engine", results["levels"]))


if __name__ == "__main__":
    main()
