"""Training throughput: the Ray Train pretraining loop against plain PyTorch, and an MoE layer against dense.

1. Ray overhead. The real `train_loop_per_worker`, run by `make_trainer` with one worker, against a plain
   single-process loop over the same `tiny` model, packed sequences, batch schedule, gradient accumulation,
   AdamW, warmup-cosine schedule, gradient clipping and autocast choice, on the same number of threads.
   Both run the same steps, timed in windows of WINDOW_STEPS steps (the first window, warmup, is dropped);
   the Ray loop's windows are the `tokens_per_s` it reports itself. The plain loop runs before and after the
   Ray loop, and each side's rate is the median of its windows: on a shared machine, other processes' bursts
   then hit both sides alike. Target: Ray >= 0.95x plain. Identical final losses show the work is identical.
2. MoE cost. Forward + backward of the tiny preset's sparse MoE block (router + top-k experts) against a
   dense SwiGLU MLP with the same active parameters (intermediate size = moe_intermediate_size * top-k),
   on the same micro-batch of hidden states, in alternating rounds. Target: MoE <= 1.5x dense.

Timings are reported, never asserted: the script exits 0 whether the targets are met or not.

    python benchmarks/train_throughput.py [--steps 40] [--micro-batch 8] [--global-batch 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from reporting import RESULTS_DIR, check, verdict, write_results  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP  # noqa: E402

from strata.config import DataConfig, PretrainConfig  # noqa: E402
from strata.data.packing import GlobalBatchSchedule, load_packed  # noqa: E402
from strata.data.prepare import prepare_data  # noqa: E402
from strata.data.tokenizer import load_tokenizer  # noqa: E402
from strata.models.presets import build_model  # noqa: E402
from strata.runtime import strata_runtime_env  # noqa: E402
from strata.train.pretrain_loop import train_loop_per_worker  # noqa: E402
from strata.train.trainer import lr_lambda, make_optimizer, make_trainer  # noqa: E402

NUM_CPUS = 2  # Ray's CPUs, the Ray worker's CPUs and the torch threads of every measurement
WINDOW_STEPS = 10  # steps per timing window (the Ray loop's log interval); the first window is warmup
RAY_TARGET = 0.95  # Ray tokens/s >= RAY_TARGET x plain tokens/s
MOE_TARGET = 1.5  # MoE fwd+bwd time <= MOE_TARGET x dense fwd+bwd time
MOE_ROUNDS, MOE_ITERS, MOE_WARMUP = 10, 30, 10  # timed rounds of MOE_ITERS iterations, MoE and dense in turn


class RecordReports(ray.train.UserCallback):
    """Appends rank 0's metrics of every `ray.train.report` to a JSON-lines file (runs in the controller)."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics: list[dict], checkpoint: ray.train.Checkpoint | None) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics[0]) + "\n")


def make_config(args: argparse.Namespace, data_cfg: DataConfig, storage: str) -> PretrainConfig:
    max_steps = WINDOW_STEPS + args.steps
    return PretrainConfig(
        run_name="train-throughput",
        model={"name": "tiny"},
        data=data_cfg,
        optim={
            "max_steps": max_steps,
            "warmup_steps": WINDOW_STEPS,  # LR warmup, below max_steps for any --steps
            "micro_batch_size": args.micro_batch,
            "global_batch_size": args.global_batch,
        },
        # The loop always checkpoints its last step; no checkpoint before it.
        checkpoint={"every_steps": max_steps, "keep_last": 1, "storage_path": storage},
        scaling={"num_workers": 1, "cpus_per_worker": NUM_CPUS},
        tracking={"log_every_steps": WINDOW_STEPS},
    )


def build_tiny(cfg: PretrainConfig, tokenizer_dir: str) -> torch.nn.Module:
    """The model exactly as `train_loop_per_worker` builds it."""
    tok = load_tokenizer(tokenizer_dir)
    special_ids = {name: getattr(tok, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = build_model(cfg.model.name, len(tok), special_ids, cfg.model.overrides, seed=cfg.optim.seed)
    model.config.output_router_logits = True
    return model


def plain_loop(cfg: PretrainConfig, tokenizer_dir: str, packed_dir: str, progress: Progress) -> dict:
    """Single-process PyTorch pretraining, step for step what one Ray Train worker does."""
    data = torch.from_numpy(load_packed(packed_dir))
    model = build_tiny(cfg, tokenizer_dir)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim))
    schedule = GlobalBatchSchedule(len(data), cfg.optim.global_batch_size, cfg.optim.seed)
    grad_accum = cfg.grad_accum_steps
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.scaling.autocast_bf16 else nullcontext()
    aux_coef = model.config.router_aux_loss_coef

    model.train()
    window_ends = []
    task = progress.add_task("plain PyTorch loop", total=cfg.optim.max_steps)
    for step in range(1, cfg.optim.max_steps + 1):
        lm_loss = 0.0
        for batch in data[schedule.next_indices(0, 1)].split(cfg.optim.micro_batch_size):
            with autocast:
                out = model(input_ids=batch, labels=batch)
            (out.loss / grad_accum).backward()
            lm_loss += (out.loss.item() - aux_coef * out.aux_loss.item()) / grad_accum  # as the loop logs it
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % WINDOW_STEPS == 0:
            window_ends.append(time.perf_counter())
        progress.advance(task)

    tokens_per_window = WINDOW_STEPS * cfg.optim.global_batch_size * data.shape[1]
    rates = [tokens_per_window / (end - start) for start, end in pairwise(window_ends)]
    return {"window_tokens_per_s": rates, "final_loss": lm_loss}


def ray_loop(cfg: PretrainConfig, tokenizer_dir: str, packed_dir: str, reports_path: Path) -> dict:
    """`train_loop_per_worker` on one Ray Train worker, with the tokens/s it reports per window."""
    paths = {"tokenizer_dir": tokenizer_dir, "packed_dir": packed_dir}
    loop_config = {"config": cfg.model_dump(mode="json"), "paths": paths}
    make_trainer(cfg, train_loop_per_worker, loop_config, [RecordReports(reports_path)], cfg.run_name).fit()
    reports = [json.loads(line) for line in reports_path.read_text().splitlines()]
    # Each report's tokens_per_s covers the steps since the previous report.
    rates = [r["tokens_per_s"] for r in reports if r["step"] > WINDOW_STEPS]
    return {"window_tokens_per_s": rates, "final_loss": reports[-1]["loss"]}


@ray.remote(num_cpus=NUM_CPUS)
def ray_worker_threads() -> int:
    """torch's thread count in a Ray worker with NUM_CPUS CPUs, as the Train worker gets them."""
    return torch.get_num_threads()


def fwd_bwd_seconds(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        module(x).backward(grad)
        module.zero_grad(set_to_none=True)
        x.grad = None
    return (time.perf_counter() - start) / iters


def moe_vs_dense(cfg: PretrainConfig, tokenizer_dir: str, progress: Progress) -> dict:
    """Forward + backward of the preset's first MoE block and of a dense SwiGLU MLP, same active size."""
    model = build_tiny(cfg, tokenizer_dir)
    config, moe = model.config, model.model.layers[0].mlp
    dense = Qwen3MoeMLP(config, intermediate_size=config.moe_intermediate_size * config.num_experts_per_tok)
    torch.manual_seed(0)
    shape = (cfg.optim.micro_batch_size, cfg.data.seq_len, config.hidden_size)
    x, grad = torch.randn(shape, requires_grad=True), torch.randn(shape)

    for module in (moe, dense):
        fwd_bwd_seconds(module, x, grad, MOE_WARMUP)
    moe_s, dense_s = [], []
    task = progress.add_task("MoE vs dense fwd+bwd", total=MOE_ROUNDS)
    for _ in range(MOE_ROUNDS):
        moe_s.append(fwd_bwd_seconds(moe, x, grad, MOE_ITERS))
        dense_s.append(fwd_bwd_seconds(dense, x, grad, MOE_ITERS))
        progress.advance(task)

    expert_params = sum(p.numel() for p in moe.experts.parameters())
    active_experts = expert_params * config.num_experts_per_tok // config.num_experts
    return {
        "tokens": shape[0] * shape[1],
        "moe_ms": 1e3 * statistics.median(moe_s),
        "dense_ms": 1e3 * statistics.median(dense_s),
        "moe_active_params": active_experts + moe.gate.weight.numel(),  # the router runs for every token
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "experts_implementation": config._experts_implementation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help=f"timed steps, a multiple of {WINDOW_STEPS}")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "train_throughput.json", help="JSON file")
    args = parser.parse_args()
    if args.steps <= 0 or args.steps % WINDOW_STEPS:
        parser.error(f"--steps must be a positive multiple of {WINDOW_STEPS}")

    began = time.perf_counter()
    console = Console()
    torch.set_num_threads(NUM_CPUS)
    os.environ["OMP_NUM_THREADS"] = str(NUM_CPUS)  # inherited by the Ray workers started below
    data_cfg = DataConfig(data_dir=str(RESULTS_DIR / "data"), max_files=150, vocab_size=1024, seq_len=128)
    data = prepare_data(data_cfg, console)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(args, data_cfg, storage=str(Path(tmp) / "runs"))
        with Progress(console=console, transient=True) as progress:
            plain_before = plain_loop(cfg, data.tokenizer_dir, data.packed_dir, progress)
        ray.init(address="local", num_cpus=NUM_CPUS, runtime_env=strata_runtime_env(), log_to_driver=False)
        try:
            worker_threads = ray.get(ray_worker_threads.remote())
            with console.status(f"Ray Train loop: 1 worker, {cfg.optim.max_steps} steps"):
                on_ray = ray_loop(cfg, data.tokenizer_dir, data.packed_dir, Path(tmp) / "reports.jsonl")
        finally:
            ray.shutdown()
    with Progress(console=console, transient=True) as progress:
        plain_after = plain_loop(cfg, data.tokenizer_dir, data.packed_dir, progress)
        moe = moe_vs_dense(cfg, data.tokenizer_dir, progress)

    plain_windows = plain_before["window_tokens_per_s"] + plain_after["window_tokens_per_s"]
    plain_rate = statistics.median(plain_windows)
    ray_rate = statistics.median(on_ray["window_tokens_per_s"])
    ray_target = check(ray_rate / plain_rate, ">=", RAY_TARGET)
    moe_target = check(moe["moe_ms"] / moe["dense_ms"], "<=", MOE_TARGET)
    versions = {"torch": torch.__version__, "ray": ray.__version__, "transformers": transformers.__version__}
    results = {
        "setup": {
            "preset": cfg.model.name,
            "timed_steps": args.steps,
            "window_steps": WINDOW_STEPS,
            "micro_batch": cfg.optim.micro_batch_size,
            "global_batch": cfg.optim.global_batch_size,
            "grad_accum": cfg.grad_accum_steps,
            "seq_len": data_cfg.seq_len,
            "autocast_bf16": cfg.scaling.autocast_bf16,
            "torch_threads": torch.get_num_threads(),
            "ray_worker_threads": worker_threads,
            "versions": versions,
        },
        "train": {
            "plain_tokens_per_s": plain_rate,
            "ray_tokens_per_s": ray_rate,
            **ray_target,
            "plain_before": plain_before,
            "ray": on_ray,
            "plain_after": plain_after,
        },
        "moe": {**moe, **moe_target},
        "wall_s": time.perf_counter() - began,
    }
    write_results(args.out, results)

    train = Table(title=f"tiny preset, {NUM_CPUS} threads: tokens/s per {WINDOW_STEPS}-step window")
    for column in ("loop", "windows (k tokens/s)", "median tokens/s", "final LM loss"):
        train.add_column(column, justify="right")
    for name, run in (("plain, before", plain_before), ("Ray Train", on_ray), ("plain, after", plain_after)):
        rates = run["window_tokens_per_s"]
        windows = " ".join(f"{rate / 1e3:.1f}" for rate in rates)
        train.add_row(name, windows, f"{statistics.median(rates):,.0f}", f"{run['final_loss']:.4f}")
    train.add_row("plain, all windows", "", f"{plain_rate:,.0f}", "")
    layer = Table(title=f"fwd+bwd on {moe['tokens']} tokens, median of {MOE_ROUNDS} rounds")
    for column in ("layer", "active params", "ms"):
        layer.add_column(column, justify="right")
    moe_name = f"MoE block ({moe['experts_implementation']} experts)"
    layer.add_row(moe_name, f"{moe['moe_active_params']:,}", f"{moe['moe_ms']:.2f}")
    layer.add_row("dense SwiGLU MLP", f"{moe['dense_params']:,}", f"{moe['dense_ms']:.2f}")
    console.print(train, layer)
    for what, target in (("Ray / plain tokens/s", ray_target), ("MoE / dense time", moe_target)):
        console.print(
            f"{what + ':':21} {target['value']:.3f}x (target {target['target']}x): {verdict(target['target_met'])}"
        )
    console.print(f"wrote {args.out} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
