"""Fine-tuning memory and speed: full fine-tuning, LoRA and QLoRA on the same base model and the same batch.

Each method runs the project's own path, `trainable_model` (peft LoRA on the attention projections
q/k/v/o at rank 16, and for QLoRA a bitsandbytes NF4 base with double quantisation, its fused MoE experts
included), `make_optimizer` with
one `OptimConfig`, and the SFT loop's step (collated batch, loss, backward, clip, AdamW step), in a fresh
process of its own so that one method's peak cannot hide in another's. Reported per method: trainable and
total parameters (`parameter_counts`), weights memory (parameters, buffers and 4-bit quantisation state:
the deterministic part), the peak memory of loading and, apart, of training (from the loaded model through
warmup and timed steps), tokens/s at the median time of the timed steps (the median shrugs off other
processes' bursts on a shared machine), and the eval loss on a held-out batch after the steps.

Peak memory, two ways. The tensor peak, which the target judges: the most bytes of tensors alive at once in a
training step, as the allocator counts them. On a GPU it is `torch.cuda.max_memory_allocated`, reset between
loading and training. The CPU has no allocator count, so the profiler records every allocation and free of one
more training step (after the measured ones and the eval, so it slows and changes nothing measured), added in time
order on top of the tensors alive before it (weights, buffers, optimizer state). And the process's peak RSS
(VmHWM in /proc/self/status, reset through /proc/self/clear_refs) less its RSS before loading: without the
~0.55 GiB that importing torch, transformers, peft and bitsandbytes costs every process alike, as a GPU's allocator
count leaves out the CUDA context; the whole-process peak is in the JSON. RSS counts what tensors do not: freed
blocks the C library keeps, the CPU runtime's thread stacks and scratch buffers, some 40 MiB of it here whatever
the method, which hides how much less QLoRA's tensors take. `ru_maxrss` would not do: Linux carries the parent's
peak over into a child across fork + exec, and it cannot be reset. The CPU loading peak mostly counts the
checkpoint itself: safetensors maps the file, and its pages count as RSS while the weights are copied
out of it (the base is saved in bf16, as published checkpoints are, so every method copies: into fp32, or
into 4 bits). The workers run with a fixed 64 KiB glibc mmap threshold (MALLOC_MMAP_THRESHOLD_), so freed
blocks (loading's temporaries, activations, QLoRA's dequantised weights) go back to the system rather than
stay in the heap, and RSS follows live memory: with glibc's default, loading `moe-small` leaves ~110 MiB of
freed heap behind.

Two bases, both random-weight Qwen3-MoE models from `build_model` with an 8192-token vocabulary and random
token batches (no tokenizer is needed):
- `moe-small`, first: the `small` preset as is. Transformers keeps Qwen3-MoE experts as fused 3-D parameters
  (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), which bitsandbytes does not quantise (only
  nn.Linear layers become Linear4bit); QLoRA stores them in NF4 itself (`strata.models.quantized_experts`).
  They are ~88% of this model's weights.
- `dense-wide`: the `small` preset widened (hidden 2048, 6 layers, intermediate 8192) with every layer's
  MLP dense (`mlp_only_layers`), about 0.4B parameters of which ~90% are nn.Linear weights that QLoRA
  stores in 4 bits. It fits a 2-core, 24 GiB CPU machine with full fine-tuning's AdamW state, and its few
  steps take seconds each.

Targets, on `moe-small`: QLoRA/LoRA training peak memory (tensors) <= 0.45, weights <= 0.35, and eval loss after
the same steps within 2% of LoRA's; LoRA trains < 2% of the parameters (both bases). The batches are random tokens, so
the eval loss only shows that QLoRA's quantised model computes what LoRA's does, not that either learns.
Results are reported, never asserted: the script exits 0 whether the targets are met or not.

    python benchmarks/finetune_memory.py [--steps 3] [--warmup 1] [--batch 2] [--seq-len 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import bitsandbytes  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from reporting import RESULTS_DIR, check, verdict, write_results  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from strata.config import LoraSettings, OptimConfig  # noqa: E402
from strata.data.sft import SFTExample, collate  # noqa: E402
from strata.models.adapters import parameter_counts, trainable_model  # noqa: E402
from strata.models.presets import build_model  # noqa: E402
from strata.train.trainer import make_optimizer  # noqa: E402

METHODS = ("full", "lora", "qlora")
VOCAB_SIZE = 8192
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
BASES: dict[str, dict[str, Any]] = {
    "moe-small": {},
    "dense-wide": dict(
        hidden_size=2048,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=8192,
        mlp_only_layers=list(range(6)),  # dense SwiGLU (nn.Linear) MLPs in every layer: no experts, no router
        output_router_logits=False,
    ),
}
TARGET_BASE = "moe-small"  # the base the QLoRA targets are judged on
MEMORY_TARGET = 0.45  # QLoRA training peak memory <= MEMORY_TARGET x LoRA's
WEIGHTS_TARGET = 0.35  # QLoRA weights memory <= WEIGHTS_TARGET x LoRA's
EVAL_LOSS_TARGET = 0.02  # |QLoRA eval loss / LoRA's - 1| <= EVAL_LOSS_TARGET
TRAINABLE_TARGET = 2.0  # LoRA trainable parameters < TRAINABLE_TARGET % of the total
OPTIM = OptimConfig(lr=2e-4)  # the optimizer settings every method trains with
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}  # blocks >= 64 KiB are mmap-ed, and unmapped when freed
MIB = 2**20


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, plus each 4-bit layer's quantisation state (absmax, code tables). Counted by
    storage, as quantised experts leave a one-element placeholder that looks full-size."""
    total = 0
    for tensor in chain(model.parameters(), model.buffers()):
        total += min(tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes())
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in state.as_dict().values() if isinstance(t, torch.Tensor))
    return total


def random_batch(batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same seeded random tokens in every process, collated as the SFT loop does (loss on every token)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_IDS), VOCAB_SIZE, (batch, seq_len), generator=generator)
    return collate([SFTExample(row, row) for row in ids.tolist()], SPECIAL_IDS["pad_token_id"])


def process_status(field: str) -> int:
    """A memory line of /proc/self/status in bytes: VmRSS now, VmHWM the peak since exec or the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return process_status("VmHWM")


def tensor_peak_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> int:
    """The most bytes of tensors alive at once during `step()`: on a GPU the allocator's peak; on the CPU the
    profiler's allocation events added up in time order, on top of what was alive before (weights, buffers and the
    optimizer's state; gradients are freed between steps)."""
    if next(model.parameters()).is_cuda:
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    alive = weight_bytes(model) + sum(t.numel() * t.element_size() for t in state)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, change in allocations:
        live += change
        peak = max(peak, live)
    return alive + peak


def reset_peak(device: torch.device) -> None:
    """Restart the peak from what is in use now (the loaded model)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS


def measure(method: str, base_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load the base for `method`, train warmup + timed steps; runs in a process of its own."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {k: v.to(device) for k, v in random_batch(args.batch, args.seq_len).items()}
    baseline = 0 if device.type == "cuda" else process_status("VmRSS")  # the imports' memory

    start = time.perf_counter()
    model = trainable_model(base_dir, method, LoraSettings(), device)
    if method != "qlora":  # a 4-bit model is placed on its device at load time
        model = model.to(device)
    load_s = time.perf_counter() - start
    load_peak = peak_bytes(device)
    reset_peak(device)
    optimizer = make_optimizer(model, OPTIM)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> float:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, OPTIM.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the step on a GPU too

    model.train()
    losses, step_s = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(train_step())
        step_s.append(time.perf_counter() - start)
    timed_s = step_s[args.warmup :]

    train_peak = peak_bytes(device)
    model.eval()
    with torch.no_grad():
        eval_batch = {k: v.to(device) for k, v in random_batch(args.batch, args.seq_len, seed=1).items()}
        eval_loss = model(**eval_batch).loss.item()
    model.train()
    tensor_peak = tensor_peak_bytes(model, optimizer, train_step)
    return {
        **parameter_counts(model),
        "weights_mib": weight_bytes(model) / MIB,
        "train_tensor_peak_mib": tensor_peak / MIB,
        "train_peak_mib": (train_peak - baseline) / MIB,
        "load_peak_mib": (load_peak - baseline) / MIB,
        "process_peak_mib": max(load_peak, train_peak) / MIB,
        "baseline_mib": baseline / MIB,
        "load_s": load_s,
        "tokens_per_s": args.batch * args.seq_len / statistics.median(timed_s),
        "step_s": step_s,
        "losses": losses,
        "eval_loss": eval_loss,
        "device": str(device),
    }


def save_base(name: str, directory: Path) -> dict[str, Any]:
    """A seeded random base saved in bf16; returns its config as the JSON records it."""
    model = build_model("small", VOCAB_SIZE, SPECIAL_IDS, BASES[name])
    model.to(torch.bfloat16).save_pretrained(directory)
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "moe_intermediate_size", "num_experts")
    config = {key: getattr(model.config, key) for key in keys}
    config["dense_mlp_layers"] = len(model.config.mlp_only_layers)
    return config


def run_worker(method: str, base_dir: Path, args: argparse.Namespace, result: Path) -> dict[str, Any]:
    """This script again, with --method: a fresh process whose peak memory is the method's alone."""
    command = [sys.executable, __file__, "--method", method, "--base", str(base_dir), "--result", str(result)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    done = subprocess.run(command, env={**os.environ, **WORKER_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} on {base_dir.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    full, lora, qlora = (runs[m] for m in METHODS)
    return {
        "qlora_lora_train_tensor_peak": qlora["train_tensor_peak_mib"] / lora["train_tensor_peak_mib"],
        "qlora_lora_train_peak": qlora["train_peak_mib"] / lora["train_peak_mib"],
        "qlora_lora_load_peak": qlora["load_peak_mib"] / lora["load_peak_mib"],
        "qlora_lora_process_peak": qlora["process_peak_mib"] / lora["process_peak_mib"],
        "qlora_lora_weights": qlora["weights_mib"] / lora["weights_mib"],
        "lora_full_tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
        "qlora_lora_tokens_per_s": qlora["tokens_per_s"] / lora["tokens_per_s"],
        "qlora_lora_eval_loss_delta": qlora["eval_loss"] / lora["eval_loss"] - 1,
        "lora_trainable_pct": 100 * lora["trainable_params"] / lora["total_params"],
    }


def report(console: Console, results: dict[str, Any]) -> None:
    setup = results["setup"]
    for name, base in results["bases"].items():
        title = f"{name}: batch {setup['batch']} x {setup['seq_len']} tokens, memory in MiB"
        table = Table(title=title)
        columns = (
            "method",
            "params",
            "trainable",
            "weights",
            "load peak",
            "train peak",
            "RSS peak",
            "tokens/s",
            "eval loss",
        )
        for column in columns:
            table.add_column(column, justify="right")
        for method, run in base["methods"].items():
            table.add_row(
                method,
                f"{run['total_params'] / 1e6:.1f}M",
                f"{100 * run['trainable_params'] / run['total_params']:.2f}%",
                f"{run['weights_mib']:,.0f}",
                f"{run['load_peak_mib']:,.0f}",
                f"{run['train_tensor_peak_mib']:,.0f}",
                f"{run['train_peak_mib']:,.0f}",
                f"{run['tokens_per_s']:,.0f}",
                f"{run['eval_loss']:.4f}",
            )
        console.print(table)
        r = base["ratios"]
        console.print(
            f"  QLoRA/LoRA memory: train peak {r['qlora_lora_train_tensor_peak']:.3f}x (RSS "
            f"{r['qlora_lora_train_peak']:.3f}x), "
            f"load peak {r['qlora_lora_load_peak']:.3f}x, weights {r['qlora_lora_weights']:.3f}x; "
            f"eval loss {100 * r['qlora_lora_eval_loss_delta']:+.2f}%"
        )
        console.print(
            f"  tokens/s: LoRA/full {r['lora_full_tokens_per_s']:.2f}x, "
            f"QLoRA/LoRA {r['qlora_lora_tokens_per_s']:.2f}x; LoRA trains {r['lora_trainable_pct']:.2f}% of parameters"
        )
    targets = results["targets"]
    for key, what in (
        ("memory", "training peak memory"),
        ("weights", "weights memory"),
        ("eval_loss", "eval loss, |ratio - 1|,"),
    ):
        target = targets[key]
        rss = f" (process RSS: {target['rss_value']:.3f})" if "rss_value" in target else ""
        console.print(
            f"QLoRA/LoRA {what} on {target['base']}: {target['value']:.3f}{rss} "
            f"(target {target['target']}): {verdict(target['target_met'])}"
        )
    trainable = targets["lora_trainable"]
    console.print(
        f"LoRA trainable share, largest over bases: {trainable['value']:.2f}% "
        f"(target {trainable['target']}): {verdict(trainable['target_met'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps before them")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "finetune_memory.json", help="JSON file")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # worker mode: one measurement
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= 0 or args.warmup < 0:
        parser.error("--steps must be positive and --warmup not negative")
    if args.method:
        args.result.write_text(json.dumps(measure(args.method, args.base, args)))
        return

    began = time.perf_counter()
    console = Console()
    bases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in BASES:
            base_dir = Path(tmp) / name
            with console.status(f"{name}: building and saving the base"):
                config = save_base(name, base_dir)
            runs = {}
            for method in METHODS:
                started = time.perf_counter()
                with console.status(f"{name}: {method} (load, {args.warmup} + {args.steps} steps, own process)"):
                    run = run_worker(method, base_dir, args, Path(tmp) / f"{name}-{method}.json")
                console.print(
                    f"{name} {method:>5}: train peak {run['train_tensor_peak_mib']:,.0f} MiB "
                    f"(RSS {run['train_peak_mib']:,.0f}), "
                    f"{run['tokens_per_s']:,.0f} tokens/s, load {run['load_s']:.1f} s, "
                    f"process {time.perf_counter() - started:.0f} s"
                )
                runs[method] = run
            bases[name] = {"config": config, "methods": runs, "ratios": ratios(runs)}

    target_ratios = bases[TARGET_BASE]["ratios"]
    memory_ratio, weights_ratio = target_ratios["qlora_lora_train_tensor_peak"], target_ratios["qlora_lora_weights"]
    eval_delta = abs(target_ratios["qlora_lora_eval_loss_delta"])
    trainable_pct = max(base["ratios"]["lora_trainable_pct"] for base in bases.values())
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
    results = {
        "setup": {
            "batch": args.batch,
            "seq_len": args.seq_len,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "vocab_size": VOCAB_SIZE,
            "base_dtype_on_disk": "bfloat16",
            "lora": LoraSettings().model_dump(),
            "optim": OPTIM.model_dump(),
            "worker_env": WORKER_ENV,
            "torch_threads": torch.get_num_threads(),
            "versions": versions,
        },
        "bases": bases,
        "targets": {
            "memory": check(
                memory_ratio,
                "<=",
                MEMORY_TARGET,
                base=TARGET_BASE,
                measure="tensors: the allocator's peak on a GPU, the profiler's allocations on the CPU",
                rss_value=target_ratios["qlora_lora_train_peak"],
            ),
            "weights": check(weights_ratio, "<=", WEIGHTS_TARGET, base=TARGET_BASE),
            "eval_loss": check(eval_delta, "<=", EVAL_LOSS_TARGET, base=TARGET_BASE, measure="|QLoRA/LoRA - 1|"),
            "lora_trainable": check(trainable_pct, "<", TRAINABLE_TARGET, unit="%"),
        },
        "wall_s": time.perf_counter() - began,
    }
    write_results(args.out, results)
    report(console, results)
    console.print(f"wrote {args.out} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
