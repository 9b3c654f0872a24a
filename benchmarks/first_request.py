"""A fresh replica's first request, with and without the warm-up a `ModelServer` runs before it is ready.

Each side loads the preset as a replica does (`load_for_serving`, the variant's precision; weights loaded on a passing
thread), starts its engine loop and sends 6 greedy requests one after another, each 32 tokens: the first is the
one a client (or a canary's first step) meets; the last sends the first's prompt again, once the replica has served
the other 4, so the two differ only in what the process had done before them. A cold start is a
property of a process (its allocator, its threads' OpenMP teams), so every sample is a process of its own, the two
sides alternating, each first in turn. Timings are reported, never asserted.

    python benchmarks/first_request.py [--preset small] [--samples 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from generation import build_base, make_prompts
from reporting import RESULTS_DIR, write_results
from rich.console import Console
from rich.table import Table

REQUESTS = 6
MAX_TOKENS = 32


def one_process(model_dir: Path, warm: bool, threads: int) -> dict[str, Any]:
    """In a fresh process: load, optionally warm up, then time REQUESTS requests (TTFT and whole)."""
    import torch

    from strata.config import VariantConfig
    from strata.serve.engine import Output
    from strata.serve.engine_loops import EngineLoops
    from strata.serve.loading import load_for_serving, on_passing_thread

    variant = VariantConfig(name="bench", model=str(model_dir), num_cpus=threads)

    def load():
        torch.set_num_threads(threads)
        return load_for_serving(variant)

    model, tokenizer, info = on_passing_thread(load)
    loops = EngineLoops(model, tokenizer, 1, 8, torch_threads=threads)
    loops.start()
    warm_up_s = loops.warm_up([None]) if warm else 0.0
    params = loops.greedy_to_the_end(MAX_TOKENS)
    prompts = make_prompts(tokenizer, REQUESTS - 1, seed=1)
    requests = []
    for prompt in [*prompts, prompts[0]]:
        done, first = threading.Event(), []
        sent = time.perf_counter()

        def sink(output: Output, sent: float = sent, first: list = first, done: threading.Event = done) -> None:
            if not first:
                first.append(time.perf_counter() - sent)
            if output.finish_reason:
                done.set()

        loops.submit(tokenizer.encode(prompt, add_special_tokens=False), params, sink)
        done.wait()
        requests.append({"ttft_ms": 1000 * first[0], "total_ms": 1000 * (time.perf_counter() - sent)})
    loops.stop()
    for thread in threading.enumerate():  # a loop still inside a kernel at exit would abort the interpreter
        if thread.name.startswith("strata-engine-"):
            thread.join()
    return {"warm_up_s": warm_up_s, "requests": requests, "dtype": info.get("dtype")}


def sample(model_dir: Path, warm: bool, threads: int) -> dict[str, Any]:
    """`one_process` in a child Python, as a new replica is."""
    child = subprocess.run(
        [sys.executable, __file__, "--child", str(model_dir), "--threads", str(threads)] + (["--warm"] if warm else []),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    first_ttft = [s["requests"][0]["ttft_ms"] for s in samples]
    first_total = [s["requests"][0]["total_ms"] for s in samples]
    again_ttft = [s["requests"][-1]["ttft_ms"] for s in samples]
    again_total = [s["requests"][-1]["total_ms"] for s in samples]
    return {
        "first_ttft_ms": statistics.median(first_ttft),
        "again_ttft_ms": statistics.median(again_ttft),
        "first_total_ms": statistics.median(first_total),
        "again_total_ms": statistics.median(again_total),
        "first_over_again_ttft": statistics.median(f / a for f, a in zip(first_ttft, again_ttft, strict=True)),
        "first_over_again_total": statistics.median(f / a for f, a in zip(first_total, again_total, strict=True)),
        "warm_up_s": statistics.median(s["warm_up_s"] for s in samples),
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "moe-1b"], help="model preset")
    parser.add_argument("--samples", type=int, default=4, help="fresh processes per side")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the engine loop")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "first_request.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one sample: the model directory
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.child, args.warm, args.threads)))
        return
    if args.samples <= 0:
        parser.error("--samples must be positive")

    began, console = time.perf_counter(), Console()
    sides: dict[str, list] = {"cold": [], "warmed up": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_base(Path(tmp), args.preset, console)
        with console.status("") as status:
            for i in range(args.samples):
                for side in ("cold", "warmed up") if i % 2 == 0 else ("warmed up", "cold"):
                    status.update(f"sample {i + 1}/{args.samples}: {side} replica process")
                    sides[side].append(sample(model_dir, side == "warmed up", args.threads))
    results = {
        "preset": args.preset,
        "threads": args.threads,
        "dtype": sides["cold"][0]["dtype"],
        "requests": REQUESTS,
        "max_tokens": MAX_TOKENS,
        **{side: summary(samples) for side, samples in sides.items()},
        "seconds": time.perf_counter() - began,
    }
    write_results(args.out, results)
    table = Table(
        title=f"a fresh replica's first request: {args.preset} in {results['dtype']}, median of "
        f"{args.samples} processes a side"
    )
    for column in (
        "side",
        "warm-up",
        "first TTFT",
        "again TTFT",
        "first / again",
        "first request",
        "again request",
        "first / again",
    ):
        table.add_column(column)
    for side in sides:
        r = results[side]
        table.add_row(
            side,
            f"{r['warm_up_s'] * 1000:.0f} ms" if r["warm_up_s"] else "-",
            f"{r['first_ttft_ms']:.1f} ms",
            f"{r['again_ttft_ms']:.1f} ms",
            f"{r['first_over_again_ttft']:.2f}x",
            f"{r['first_total_ms']:.0f} ms",
            f"{r['again_total_ms']:.0f} ms",
            f"{r['first_over_again_total']:.2f}x",
        )
    console.print(table)
    console.print(f"results: {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
