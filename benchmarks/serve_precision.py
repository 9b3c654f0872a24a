"""Serving precisions side by side: the `small` preset served in fp32, bf16, int8 and nf4 (weights; bf16 compute).

Each precision is loaded the way a replica loads it (`load_for_serving`), and measured for:
  - generated tokens/s at 32 concurrent clients, with the engine in-process and over HTTP (router -> replica);
  - weight memory (parameters, buffers and nf4 scales);
  - eval loss and perplexity on held-out sequences, and top-1 agreement with fp32 there (teacher-forced);
  - greedy agreement with fp32: the share of fp32's generated tokens that the same greedy requests reproduce.
The model is trained for --train-steps first: a fresh model's loss is ln(vocab) whatever its precision.
Targets on a CPU with native bf16: bf16 >= 1.5x fp32 tokens/s with eval loss within 1%; int8 <= 0.35x fp32 weight
memory with eval loss within 2%. Timings are reported, never asserted.

    python benchmarks/serve_precision.py [--http fp32,bf16,int8,nf4] [--train-steps 150] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from engine_throughput import engine_clients
from generation import build_base, make_prompts
from reporting import RESULTS_DIR, check, verdict, write_results
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from strata.config import DataConfig, EngineSettings, VariantConfig
from strata.data.packing import load_packed
from strata.data.prepare import prepare_data
from strata.models.cpu_features import cpu_instructions
from strata.serve.engine import Engine, Output, SamplingParams
from strata.serve.loading import load_for_serving, on_passing_thread

PRECISIONS = {  # name -> engine settings
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
    "nf4": {"dtype": "bfloat16", "quantization": "nf4"},
}
CLIENTS = 32
THREADS = 2
T = TypeVar("T")
TARGETS = {  # (precision, metric, relation, bound vs fp32)
    "bf16_tokens_per_s": ("bf16", "engine_tokens_per_s", ">=", 1.5),
    "bf16_http_tokens_per_s": ("bf16", "http_tokens_per_s", ">=", 1.5),
    "bf16_eval_loss": ("bf16", "eval_loss", "<=", 1.01),
    "int8_weight_memory": ("int8", "weight_bytes", "<=", 0.35),
    "int8_eval_loss": ("int8", "eval_loss", "<=", 1.02),
}


def train(model_dir: Path, sequences: np.ndarray, steps: int, console: Console) -> None:
    """A short AdamW run in fp32, saved over the fresh weights; with the router's load-balancing loss, as Strata's
    pretraining trains it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, output_router_logits=True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    with console.status(f"training {steps} steps"):
        for _ in range(steps):
            batch = torch.from_numpy(sequences[rng.integers(len(sequences), size=16)])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    console.print(f"trained {steps} steps: last batch loss {loss.item():.3f}")
    model.config.output_router_logits = False
    model.save_pretrained(model_dir)


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes of every parameter's and buffer's storage, each counted once (the quantised experts leave a
    one-element placeholder seen at full shape), plus bitsandbytes' nf4 scales held beside its packed weights."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.quant_state.absmax for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@torch.inference_mode()
def evaluate(model, held_out: np.ndarray, reference: list[torch.Tensor] | None) -> tuple[dict, list[torch.Tensor]]:
    """Mean next-token loss on held-out sequences, and where the top-1 token agrees with `reference`'s."""
    losses, top1, agree, total = [], [], 0, 0
    for i, start in enumerate(range(0, len(held_out), 16)):
        batch = torch.from_numpy(held_out[start : start + 16])
        out = model(input_ids=batch, labels=batch)
        losses.append(out.loss.float().item() * len(batch))
        top1.append(out.logits.argmax(-1))
        if reference is not None:
            agree += int((top1[-1] == reference[i]).sum())
            total += top1[-1].numel()
    loss = sum(losses) / len(held_out)
    return {"eval_loss": loss, "perplexity": math.exp(loss), "top1_agreement": agree / total if total else 1.0}, top1


def greedy_tokens(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens from the engine, all requests in flight together (as clients would send them)."""
    tokens: list[list[int]] = [[] for _ in prompts]
    left, done = [len(prompts)], threading.Event()

    def sink(index: int, output: Output) -> None:
        tokens[index] += [t.token for t in output.logprobs]
        if output.finish_reason:
            left[0] -= 1
            if not left[0]:
                done.set()

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0)
    for index, ids in enumerate(prompts):
        engine.submit(ids, params, lambda output, index=index: sink(index, output))
    done.wait()
    return tokens


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The share of the reference's tokens reproduced at the same position."""
    pairs = zip(tokens, reference, strict=True)
    same = sum(a == b for ours, theirs in pairs for a, b in zip(ours, theirs, strict=False))  # one may stop sooner
    return same / sum(map(len, reference))


def on_worker(work: Callable[[], T]) -> T:
    """`work` on a thread of `THREADS` torch threads that ends with it, taking its OpenMP team along: the main thread
    never holds one, and only one team lives at a time (an idle team makes the next one sleep and wake at every
    parallel region on 2 cores, as `on_passing_thread` says)."""

    def call() -> T:
        torch.set_num_threads(THREADS)
        return work()

    return on_passing_thread(call)


def on_engine(model, tokenizer, work: Callable[[Engine], T]) -> T:
    """`work(engine)` on an engine of its own, its scheduler thread (and OpenMP team) gone when it returns."""
    engine = Engine(model, tokenizer, CLIENTS, torch_threads=THREADS)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        return work(engine)
    finally:
        engine.stop()
        thread.join()


def prepare(name: str, model_dir: Path, held_out: np.ndarray, prompts: list[str], args, fp32: dict | None) -> dict:
    """One precision in-process: memory, eval and greedy agreement; its model kept for the timed rounds."""
    variant = VariantConfig(name=name, model=str(model_dir), engine={**PRECISIONS[name], "max_batch_size": CLIENTS})
    started = time.perf_counter()
    model, tokenizer, info = on_worker(lambda: load_for_serving(variant))
    result: dict[str, Any] = {"load_s": time.perf_counter() - started, "weight_bytes": weight_bytes(model), **info}
    scores, result["top1"] = on_worker(lambda: evaluate(model, held_out, fp32 and fp32["top1"]))
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[:CLIENTS]]
    result["greedy"] = on_engine(model, tokenizer, lambda engine: greedy_tokens(engine, ids, args.max_tokens))
    result["model"], result["tokenizer"] = model, tokenizer
    return result | scores | {"greedy_agreement": agreement(result["greedy"], fp32["greedy"]) if fp32 else 1.0}


def best_of_rounds(run, names: list[str], repeats: int) -> dict[str, dict]:
    """`run(name)` for every precision in turn, `repeats` times over: the machine's other load falls on all of
    them alike, and each keeps its best round."""
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name in names:
            result = run(name)
            if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = result
    return best


def http_throughput(model_dir: Path, names: list[str], prompts: list[str], args, tmp: Path) -> dict:
    """Tokens/s of `CLIENTS` streaming clients through the router to one replica of each precision, one app with
    a variant per precision (each pinned by `model`), measured in turns."""
    import ray
    from ray import serve
    from serve_throughput import API_KEY, strata_clients

    from strata.config import ServeConfig
    from strata.runtime import strata_runtime_env
    from strata.serve.app import build_application

    keys = tmp / "keys.txt"
    keys.write_text(API_KEY + "\n")
    variants = [
        {"name": name, "model": str(model_dir), "num_cpus": 0.5,
         "engine": EngineSettings(max_batch_size=CLIENTS, torch_threads=1, **PRECISIONS[name])}
        for name in names
    ]  # fmt: skip
    config = ServeConfig(
        model_name="bench",
        variants=variants,
        auth={"api_keys_file": str(keys), "requests_per_minute": 1e9, "burst": 1_000_000},
        audit={"path": str(tmp / "audit.jsonl")},
        router_num_cpus=0,
    )
    ray.init(address="local", num_cpus=THREADS + 1, include_dashboard=False, log_to_driver=False,
             runtime_env=strata_runtime_env())  # fmt: skip
    port = 8000 + random.randrange(1000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        serve.run(build_application(config), name="bench", route_prefix="/")
        for name in names:
            asyncio.run(strata_clients(url, prompts[:CLIENTS], CLIENTS, 8, f"bench:{name}"))  # warm up

        def run(name: str) -> dict:
            return asyncio.run(strata_clients(url, prompts, CLIENTS, args.max_tokens, f"bench:{name}"))

        return best_of_rounds(run, names, args.repeats)
    finally:
        serve.shutdown()
        ray.shutdown()


def check_targets(results: dict[str, dict]) -> dict[str, dict]:
    checked = {}
    for target, (name, metric, relation, bound) in TARGETS.items():
        if metric not in results.get(name, {}) or metric not in results["fp32"]:
            continue
        checked[target] = check(results[name][metric] / results["fp32"][metric], relation, bound)
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="in-process, fp32 first")
    parser.add_argument("--http", default="fp32,bf16,int8,nf4", help="precisions to serve over HTTP ('' for none)")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (fewer at EOS)")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per precision, taken in turns")
    parser.add_argument("--held-out", type=int, default=128, help="held-out sequences to evaluate on")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve_precision.json")
    args = parser.parse_args()
    names = args.precisions.split(",")
    http_names = [n for n in args.http.split(",") if n]
    if names[0] != "fp32" or not set(names) <= set(PRECISIONS) or not set(http_names) <= set(names):
        parser.error(f"--precisions start with fp32 and name some of {list(PRECISIONS)}; --http some of those")

    began, console = time.perf_counter(), Console()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = on_worker(lambda: build_base(Path(tmp), "small", console))
        data = DataConfig(data_dir=str(Path(tmp) / "data"), max_files=120, vocab_size=1024, seq_len=64)
        sequences = load_packed(prepare_data(data, Console(quiet=True)).packed_dir)
        on_worker(lambda: train(model_dir, sequences[: -args.held_out], args.train_steps, console))
        held_out = sequences[-args.held_out :]
        from transformers import AutoTokenizer

        prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), CLIENTS * args.rounds, seed=CLIENTS)
        results: dict[str, dict] = {}
        for name in names:
            with console.status(f"{name}: load, eval, greedy"):
                results[name] = prepare(name, model_dir, held_out, prompts, args, results.get("fp32"))
            r = results[name]
            console.print(
                f"{name}: {r['weight_bytes'] / 2**20:.1f} MiB, eval loss {r['eval_loss']:.4f}, "
                f"greedy agreement {r['greedy_agreement']:.1%}, top-1 agreement {r['top1_agreement']:.1%}"
            )

        def timed_round(engine: Engine) -> dict:
            engine_clients(engine, prompts[:CLIENTS], CLIENTS, 8)  # warm up
            return engine_clients(engine, prompts, CLIENTS, args.max_tokens)

        def run(name: str) -> dict:
            return on_engine(results[name]["model"], results[name]["tokenizer"], timed_round)

        with console.status(f"{CLIENTS} clients in-process, {args.repeats} rounds"):
            for name, level in best_of_rounds(run, names, args.repeats).items():
                results[name] |= {f"engine_{k}": v for k, v in level.items()}
        for r in results.values():
            del r["model"], r["tokenizer"], r["top1"], r["greedy"]
        if http_names:
            with console.status(f"HTTP: {', '.join(http_names)}"):
                http = http_throughput(model_dir, http_names, prompts, args, Path(tmp))
            for name, level in http.items():
                results[name] |= {f"http_{k}": v for k, v in level.items()}

    report = {
        "setup": {
            "model": "small preset (Qwen3-MoE), vocab 1024, trained briefly",
            "train_steps": args.train_steps,
            "cpu_bf16": cpu_instructions() or "none",
            "clients": CLIENTS,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "in_process_threads": THREADS,
            "replica_threads": 1,
            "held_out_sequences": args.held_out,
            "torch": torch.__version__,
        },
        "precisions": results,
        "targets": check_targets(results),
        "seconds": time.perf_counter() - began,
    }
    write_results(args.out, report)
    show(console, report)
    console.print(f"results: {args.out} ({report['seconds']:.0f} s)")


def show(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"the small preset at {CLIENTS} clients, by precision")
    columns = ("precision", "tokens/s in-process", "tokens/s HTTP", "weights MiB", "eval loss", "perplexity",
               "greedy agreement", "top-1 agreement")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for name, r in report["precisions"].items():
        fp32 = report["precisions"]["fp32"]

        def rel(key: str, r=r, fp32=fp32) -> str:
            return f"{r[key]:,.0f} ({r[key] / fp32[key]:.2f}x)" if key in r and key in fp32 else "-"

        table.add_row(
            name,
            rel("engine_tokens_per_s"),
            rel("http_tokens_per_s"),
            f"{r['weight_bytes'] / 2**20:.1f} ({r['weight_bytes'] / fp32['weight_bytes']:.2f}x)",
            f"{r['eval_loss']:.4f}",
            f"{r['perplexity']:.2f}",
            f"{r['greedy_agreement']:.1%}",
            f"{r['top1_agreement']:.1%}",
        )
    console.print(table)
    for target, checked in report["targets"].items():
        console.print(
            f"{target}: {checked['value']:.3f}x fp32 (target {checked['target']}): {verdict(checked['target_met'])}"
        )


if __name__ == "__main__":
    main()
