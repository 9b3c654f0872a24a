"""What the serving benchmarks share: the model under test, the prompts, and transformers `generate` baselines.

No Ray here, so the in-process engine benchmark runs wherever torch and transformers do (a bare GPU box too).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from strata.config import DataConfig  # noqa: E402
from strata.data.prepare import prepare_data  # noqa: E402
from strata.data.tokenizer import load_tokenizer  # noqa: E402
from strata.models.presets import build_model  # noqa: E402


def build_base(directory: Path, preset: str, console: Console) -> Path:
    """A freshly initialised MoE preset with a tokenizer trained on 120 stdlib files, saved for `from_pretrained`."""
    data = DataConfig(data_dir=str(directory / "data"), max_files=120, vocab_size=1024, seq_len=64)
    with console.status("corpus + tokenizer (120 stdlib files)"):
        prepared = prepare_data(data, Console(quiet=True))
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model_dir = directory / preset
    build_model(preset, len(tokenizer), special, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def make_prompts(tokenizer, count: int, seed: int = 0) -> list[str]:
    """Snippets of this repository's own Python, 8 to 48 tokens long."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "platform" / "strata").rglob("*.py")))
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        start, length = rng.randrange(len(ids) - 64), rng.randint(8, 48)
        prompts.append(tokenizer.decode(ids[start : start + length]))
    return prompts


def real_tokens(ids: list[int], eos: int) -> int:
    """Tokens before EOS (what Strata reports as completion_tokens)."""
    return ids.index(eos) if eos in ids else len(ids)


def synchronize(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


@torch.inference_mode()
def sequential(model, tokenizer, prompts: list[str], max_tokens: int) -> dict[str, float]:
    """(a) `generate`, one request at a time."""
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tokens += real_tokens(out[0, ids.shape[1] :].tolist(), tokenizer.eos_token_id)
    synchronize(model)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


@torch.inference_mode()
def static_batches(model, tokenizer, prompts: list[str], batch: int, max_tokens: int) -> dict[str, float]:
    """(b) `generate` on static batches: no scheduler, no HTTP, no streaming; the bound for batched decoding."""
    tokens, started = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        width = enc.input_ids.shape[1]
        tokens += sum(real_tokens(row[width:].tolist(), tokenizer.eos_token_id) for row in out)
    synchronize(model)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def compare_level(
    model, tokenizer, prompts: list[str], concurrency: int, max_tokens: int, strata: Callable[[], dict], console
) -> dict[str, Any]:
    """One concurrency level: (a) one request at a time, (b) static batches of `concurrency`, (c) Strata."""
    with console.status(f"{concurrency} clients: (a) generate one at a time"):
        a = sequential(model, tokenizer, prompts, max_tokens)
    with console.status(f"{concurrency} clients: (b) generate, static batches of {concurrency}"):
        b = static_batches(model, tokenizer, prompts, concurrency, max_tokens)
    with console.status(f"{concurrency} clients: (c) Strata"):
        c = strata()
    console.print(
        f"{concurrency:>2} clients: (a) {a['tokens_per_s']:,.0f}  (b) {b['tokens_per_s']:,.0f}  "
        f"(c) {c['tokens_per_s']:,.0f} tokens/s; TTFT p50 {c['ttft_p50_ms']:.0f} ms"
    )
    return {
        "requests": len(prompts),
        "sequential_generate": a,
        "static_batch_generate": b,
        "strata": c,
        "strata_vs_sequential": c["tokens_per_s"] / a["tokens_per_s"],
        "strata_vs_static_batch": c["tokens_per_s"] / b["tokens_per_s"],
    }


def levels_table(title: str, strata_label: str, levels: dict[int, dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in ("clients", "(a) one at a time", "(b) static batch", strata_label, "TTFT p50 / p99", "c/a", "c/b"):
        table.add_column(column, justify="right")
    for concurrency, level in levels.items():
        c = level["strata"]
        table.add_row(
            str(concurrency),
            f"{level['sequential_generate']['tokens_per_s']:,.0f}",
            f"{level['static_batch_generate']['tokens_per_s']:,.0f}",
            f"{c['tokens_per_s']:,.0f}",
            f"{c['ttft_p50_ms']:.0f} / {c['ttft_p99_ms']:.0f} ms",
            f"{level['strata_vs_sequential']:.1f}x",
            f"{level['strata_vs_static_batch']:.2f}x",
        )
    return table
