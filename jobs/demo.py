"""`make demo`: the whole pipeline on a local Ray and a local MLflow store, in a few minutes on 2 CPUs.

corpus + tokenizer -> pretrain the `tiny` MoE on 2 Ray Train workers, killing one worker on the way (Ray Train
restarts the group from the last checkpoint) -> register it in MLflow -> generate -> QLoRA fine-tune of that
version on docstring -> function pairs -> register the merged model as the next version -> a short LoRA sweep on
Ray Tune (ASHA stops the poor trials early; the best is registered, not promoted) -> promote the pretrained version
to `stable` and the fine-tuned one to `fast` through the release gates -> serve both behind one OpenAI endpoint with
a 90/10 split, and send them a few hundred requests -> a canary of `fast` under live traffic, which promotes it to
`stable` once every step has passed -> the release history.
"""

import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from strata import paths, tracking  # noqa: E402
from strata.cli import main as strata_cli  # noqa: E402
from strata.config import FinetuneConfig, PretrainConfig, load_config  # noqa: E402
from strata.runtime import init_ray  # noqa: E402
from strata.serve import traffic  # noqa: E402
from strata.train.faults import WorkerKiller  # noqa: E402
from strata.train.finetune import run_finetuning  # noqa: E402
from strata.train.pretrain import run_pretraining  # noqa: E402

PROMPTS = ["def __init__(self", "import os\n", "class Parser:\n    def"]
SERVE_REQUESTS, SERVE_CLIENTS = 300, 16
# Short steps for a demo; the latency limits leave room for two models sharing 2 CPUs with the clients.
CANARY_SETTINGS = [
    "steps=[10, 50, 100]",
    "bake_s=5",
    "min_requests=15",
    "thresholds.max_p99_latency_ms=10000",
    "thresholds.max_p99_latency_ratio=3",
    "thresholds.max_ttft_ratio=3",
    "reason=demo canary passed",
]


def main() -> int:
    console = Console()
    started = time.perf_counter()
    run_name = time.strftime("pretrain-tiny-demo-%Y%m%d-%H%M%S")
    # A registered model of its own per demo run: its release tracks and history start empty, as on a new project.
    stamp = run_name.removeprefix("pretrain-tiny-demo-")
    overrides = [f"run_name={run_name}", f"tracking.registered_model=strata-demo-{stamp}"]
    cfg = load_config(ROOT / "configs/pretrain-tiny.yaml", PretrainConfig, overrides)

    console.rule("1/7 pretraining the tiny MoE on 2 Ray Train workers (one is killed at step ~105)")
    # Serve's replicas and routers log a line per request, which in this console buries the canary's steps: they log
    # to their files only (the Ray session's logs/serve/). A failed deploy still says why, from `serve status`.
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # read by every Ray worker this driver's local Ray starts
    init_ray()
    run_dir = Path(cfg.checkpoint.resolved_storage_path) / run_name
    killer = WorkerKiller(run_dir, after_step=100).start()  # a real SIGKILL, as a lost spot node would be
    result = run_pretraining(cfg, console)
    recovery = mlflow.MlflowClient().get_run(result.run_id).data.metrics

    console.rule("2/7 generating from the registered model")
    model_uri = f"models:/{cfg.tracking.registered_model}/{result.registered_version}"
    model = mlflow.pyfunc.load_model(model_uri)
    for prompt, text in zip(PROMPTS, model.predict(PROMPTS, params={"max_new_tokens": 32}), strict=False):
        console.print(f"[dim]{prompt!r}[/dim] -> {text!r}", highlight=False)

    console.rule("3/7 QLoRA fine-tuning of the registered model")
    # The fine-tuned model becomes the next version of the same registered model: the candidate release.
    model_name = cfg.tracking.registered_model
    overrides = [f"base_model={model_uri}", f"tracking.registered_model={model_name}"]
    ft_cfg = load_config(ROOT / "configs/finetune-qlora-tiny.yaml", FinetuneConfig, overrides)
    ft_cfg = ft_cfg.model_copy(update={"run_name": f"{ft_cfg.resolved_run_name}-{stamp}"})
    tuned = run_finetuning(ft_cfg, console)
    for sample in tuned.samples:
        console.print(f"[dim]{sample['prompt']}[/dim]", highlight=False)
        console.print(f"  base:       {sample['base_output']!r}", highlight=False)
        console.print(f"  fine-tuned: {sample['finetuned_output']!r}", highlight=False)

    console.rule("4/7 a LoRA sweep on Ray Tune: three learning rates, ASHA stopping the poor ones early")
    sweep_overrides = [
        f"name=demo-sweep-{stamp}",
        f"overrides.base_model={model_uri}",
        "search=grid",
        "search_space={optim.lr: {grid: [3.0e-3, 3.0e-5, 1.0e-3]}, lora.rank: {choice: [8]}}",
        "num_samples=1",
        "max_steps=30",
        f"registered_model={model_name}",  # the best trial is the next candidate version
    ]
    swept = strata_cli(
        ["tune", "--config", str(ROOT / "configs/tune-lora-tiny.yaml")] + [f"--set={o}" for o in sweep_overrides]
    )
    if swept != 0:
        return swept

    console.rule("5/7 release tracks: stable = pretrained, fast = its QLoRA adapter; one shared replica, split 90/10")
    first_release = ["--reason", "first release: nothing to canary against", "--force"]
    for version, track, extra in (
        (result.registered_version, "stable", first_release),
        (tuned.registered_version, "fast", []),
    ):
        promoted = strata_cli(["promote", model_name, str(version), "--to", track, *extra])
        if promoted != 0:
            return promoted
    port = free_port()
    deployed = strata_cli(
        ["deploy", "--model", model_name, "--split", "stable=90,fast=10", "--num-cpus", "0.5", "--port", str(port)]
        + ["--share-base"]  # fast is an adapter of stable: one replica, the base loaded once, bf16 where the CPU has it
        + ["--torch-threads", "2"]  # one engine loop decoding on both cores (a layer is one call on the brgemm kernels)
        + ["--requests-per-minute", "6000", "--burst", str(SERVE_REQUESTS)]  # one key sends all the demo's traffic
    )
    if deployed != 0:
        return deployed
    api_key = Path(paths.resolve("serve/keys.txt")).read_text().split()[0]
    samples = traffic.send(f"http://127.0.0.1:{port}/v1", api_key, model_name, SERVE_REQUESTS, SERVE_CLIENTS)
    served = traffic.summarize(samples)
    split_table = Table(title=f"{SERVE_REQUESTS} requests from {SERVE_CLIENTS} concurrent clients")
    for column in ("variant", "requests", "share", "errors", "latency p50", "p95", "TTFT p50 (streamed)", "tokens"):
        split_table.add_column(column, justify="right")
    for variant, row in served.items():
        split_table.add_row(
            variant,
            str(row["requests"]),
            f"{row['share']:.0%}",
            ", ".join(f"{n} x {code}" for code, n in row["error_statuses"].items()) or "0",
            f"{row['latency_p50_ms']:.0f} ms",
            f"{row['latency_p95_ms']:.0f} ms",
            f"{row['ttft_p50_ms']:.0f} ms",
            str(row["tokens"]),
        )
    console.print(split_table)
    replicas = serving_replicas("strata")
    console.print(f"served by {replicas}", highlight=False)

    console.rule("6/7 a canary of fast (fine-tuned) against stable (pretrained) under live traffic")
    canary_overrides = [f"model={model_name}", "app=strata", *CANARY_SETTINGS]
    with traffic.BackgroundTraffic(f"http://127.0.0.1:{port}/v1", api_key, model_name, clients=4) as live:
        canary_exit = strata_cli(
            ["canary", "--config", str(ROOT / "configs/canary.yaml")] + [f"--set={o}" for o in canary_overrides]
        )
    strata_cli(["history", model_name])
    canary_failed = sum(live.failures().values())

    console.rule("7/7 summary")
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row(
        "pretraining loss",
        f"{result.first_loss:.3f} (step {cfg.tracking.log_every_steps}) -> "
        f"{result.metrics['loss']:.3f} (step {result.metrics['step']})",
    )
    table.add_row("expert imbalance (max/mean)", f"{result.metrics.get('expert_imbalance', float('nan')):.2f}")
    if killer.killed_pid:
        table.add_row(
            "injected failure",
            f"worker pid {killer.killed_pid} killed; resumed from step {recovery.get('resumed_from_step', 0):.0f}, "
            f"{recovery.get('recovery_steps_lost', 0):.0f} steps recomputed, "
            f"{recovery.get('recovery_seconds_to_resume', 0):.1f}s to resume",
        )
    table.add_row("checkpoint", result.checkpoint_path)
    table.add_row("registered model", model_uri)
    table.add_row(
        "QLoRA eval loss",
        f"{tuned.first_eval_loss:.3f} (base) -> {tuned.metrics['eval_loss']:.3f} "
        f"(perplexity {tuned.metrics['eval_perplexity']:.1f}) after {tuned.metrics['step']} steps",
    )
    table.add_row(
        "fine-tuned model",
        f"models:/{ft_cfg.tracking.registered_model}/{tuned.registered_version}  (run {tuned.run_name})",
    )
    table.add_row(
        "serving",
        f"http://127.0.0.1:{port}/v1: stable = v{result.registered_version}, fast = v{tuned.registered_version}; "
        + ", ".join(f"{v} {row['share']:.0%}" for v, row in served.items())
        + f" of {SERVE_REQUESTS} requests, {sum(r['errors'] for r in served.values())} errors; {replicas}",
    )
    table.add_row(
        "canary",
        f"v{tuned.registered_version}: "
        + ("passed, now stable" if canary_exit == 0 else "rolled back")
        + f"; {len(live.seen)} requests during it, {canary_failed} failed (`strata history {model_name}`)",
    )
    table.add_row("audit log", paths.resolve("logs/audit.jsonl"))
    table.add_row("MLflow store", tracking.tracking_uri())
    table.add_row("open the UI", "make ui   (or: .venv/bin/strata ui), then http://127.0.0.1:5000")
    table.add_row("wall time", f"{time.perf_counter() - started:.0f}s")
    console.print(table)
    return canary_exit


def serving_replicas(app: str) -> str:
    """How many model replicas serve the split, in what precision, with how many engine loops (what each replica
    reports of itself)."""
    from ray import serve

    deployments = {n: d for n, d in serve.status().applications[app].deployments.items() if n != "Router"}
    count = sum(sum(d.replica_states.values()) for d in deployments.values())
    described = []
    for name in deployments:
        stats = serve.get_deployment_handle(name, app_name=app).stats.remote().result()
        info = stats["info"] if "dtype" in stats["info"] else next(iter(stats["info"].values()))  # a group: per member
        described.append(
            f"{name} in {info['dtype']} ({info['dtype_reason']}), quantization {info['quantization']}, "
            f"kernels {info['kernels']}, {stats['loops']} engine loop{'s' if stats['loops'] != 1 else ''}"
        )
    return f"{count} model replica{'s' if count != 1 else ''}: " + "; ".join(described)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
