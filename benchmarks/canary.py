"""Canary releases under live traffic: what clients lose to a good canary, and to a bad one before it is rolled back.

On an MoE preset (`tiny` by default) served by a real Serve application on a local Ray, with a local MLflow registry:

  (a) a good candidate (the stable weights again) goes through every step and is promoted: client-side failures
      over the whole canary (target: 0);
  (b) a broken candidate (NaN embeddings for half its vocabulary, so a prompt holding one of those tokens fails
      sampling and with it the replica's engine) at the first
      step: seconds from the first failed client request to the rollback, as a fraction of one bake window, and the
      client-side failures against the candidate's share of the traffic during one bake window (target: at most 1x).

The baseline of (b) is the budget the issue sets: the requests the candidate would get in one bake at its first
step's weight. Everything runs in this process beside the replicas, on the machine's CPUs.

    python benchmarks/canary.py [--preset tiny] [--bake-s 5] [--clients 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import httpx  # noqa: E402
import mlflow  # noqa: E402
import ray  # noqa: E402
from generation import build_base  # noqa: E402
from ray import serve  # noqa: E402
from reporting import RESULTS_DIR, write_results  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from strata import registry, tracking  # noqa: E402
from strata.config import AuthSettings, EngineSettings, ServeConfig  # noqa: E402
from strata.config.canary import CanaryConfig  # noqa: E402
from strata.release import canary  # noqa: E402
from strata.runtime import strata_runtime_env  # noqa: E402
from strata.serve import deploy  # noqa: E402
from strata.serve.auth import hash_key  # noqa: E402
from strata.serve.traffic import BackgroundTraffic  # noqa: E402

MODEL, APP, KEY = "bench-canary", "bench-canary", "sk-bench-canary-0123456789"
STEPS = [5, 25, 50, 100]


def register(model_dir: Path, eval_loss: float) -> str:
    """A version with the lineage and eval_loss the promotion gates check."""
    with tracking.start_run("canary-bench", f"v-{time.time_ns()}", {}, tags={"base_model": "bench"}):
        mlflow.set_tag("strata.dataset_hash", "sha256:bench")
        mlflow.log_metric("eval_loss", eval_loss)
        tags = {"base_model": "bench", "strata.dataset_hash": "sha256:bench"}
        return str(registry.log_model(model_dir, MODEL, tags=tags).version)


def deploy_candidate(dashboard: str, port: int, version: str, uri: str, home: Path) -> None:
    """stable (all traffic) + the candidate as `fast` (none yet), as `strata deploy --split stable=100,fast=0`."""
    stable = mlflow.MlflowClient().get_model_version_by_alias(MODEL, "stable").version  # as promoted so far
    engine = EngineSettings(max_batch_size=16)
    config = ServeConfig(
        model_name=MODEL,
        variants=[
            {"name": "stable", "model": f"models:/{MODEL}/{stable}", "num_cpus": 0.25, "engine": engine},
            {"name": "fast", "model": f"models:/{MODEL}/{version}", "num_cpus": 0.25, "engine": engine},
        ],
        weights={"stable": 100, "fast": 0},
        tracking_uri=uri,
        auth=AuthSettings(api_key_hashes=[hash_key(KEY)], requests_per_minute=1_000_000, burst=10_000),
        audit={"path": str(home / "audit.jsonl")},
        router_num_cpus=0.25,
    )
    deploy.deploy_application(dashboard, deploy.application(config, APP), port)
    deploy.wait_until_running(dashboard, APP)


def run_canary(cfg: CanaryConfig, url: str, clients: int):
    """(status, traffic, seconds the canary ran, when the router served the rolled-back split)."""
    with BackgroundTraffic(f"{url}/v1", KEY, MODEL, clients=clients) as traffic:
        started = time.time()
        status = canary.run_canary(cfg, log=lambda line: None)
        # Full rollback: the router serves the new split (it reconfigures a moment after the deploy is accepted).
        while status.state != canary.SUCCEEDED and httpx.get(f"{url}/health").json()["split"].get("fast", 0) > 0:
            time.sleep(0.05)
        ended = time.time()
    return status, traffic, ended - started, ended


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--bake-s", type=float, default=5.0)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "canary.json")
    args = parser.parse_args()
    console = Console()

    home = Path(tempfile.mkdtemp(prefix="strata-canary-bench-"))
    os.environ["STRATA_HOME"] = str(home)
    uri = tracking.use_store()
    base = build_base(home, args.preset, console)
    tokenizer = AutoTokenizer.from_pretrained(base)
    broken = home / "broken"
    model = AutoModelForCausalLM.from_pretrained(base)
    model.get_input_embeddings().weight.data[len(tokenizer) // 2 :] = float("nan")
    model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)

    registry.set_alias(MODEL, "stable", register(base, eval_loss=2.0))
    ray.init(num_cpus=2, include_dashboard=True, runtime_env=strata_runtime_env(), log_to_driver=False)
    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    port = 8000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    thresholds = {"max_p99_latency_ms": 30_000, "max_p99_latency_ratio": 4.0, "max_ttft_ratio": 4.0}  # shared CPUs
    settings = dict(model=MODEL, app=APP, steps=STEPS, bake_s=args.bake_s, min_requests=args.min_requests)
    cfg = CanaryConfig(**settings, interval_s=0.25, thresholds=thresholds)

    with console.status("a good candidate through every step, then promoted"):
        deploy_candidate(dashboard, port, register(base, eval_loss=1.9), uri, home)
        good, good_traffic, good_seconds, _ = run_canary(cfg, url, args.clients)
    with console.status("a broken candidate, rolled back at the first step"):
        deploy_candidate(dashboard, port, register(broken, eval_loss=1.9), uri, home)
        bad, bad_traffic, bad_seconds, split_back_at = run_canary(cfg, url, args.clients)
    serve.shutdown()
    ray.shutdown()

    failed = [t for variant, status, t in bad_traffic.seen if status != 200]
    rolled_back_at = next(t["at"] for t in bad.transitions if t["to"] == canary.ROLLED_BACK)
    first_error = min(failed) if failed else rolled_back_at
    rate = len(bad_traffic.seen) / bad_seconds  # requests per second from all clients
    budget = rate * args.bake_s * STEPS[0] / 100  # the candidate's share of one bake window
    result = {
        "preset": args.preset,
        "bake_s": args.bake_s,
        "steps": STEPS,
        "clients": args.clients,
        "good": {
            "state": good.state,
            "seconds": round(good_seconds, 1),
            "requests": len(good_traffic.seen),
            "failed": sum(good_traffic.failures().values()),
            "target_failed": 0,
        },
        "bad": {
            "state": bad.state,
            "reason": bad.reason,
            "requests": len(bad_traffic.seen),
            "failed": len(failed),
            "failed_on_stable": bad_traffic.failures().get("stable", 0),
            "seconds_first_error_to_rollback": round(rolled_back_at - first_error, 2),
            "seconds_first_error_to_router_on_stable": round(split_back_at - first_error, 2),
            "rollback_in_bake_windows": round((split_back_at - first_error) / args.bake_s, 3),
            "budget_one_bake_at_first_step": round(budget, 1),
            "failed_vs_budget": round(len(failed) / budget, 3) if budget else None,
            "target_failed_vs_budget": 1.0,
        },
    }
    result["targets_met"] = (
        good.state == canary.SUCCEEDED
        and result["good"]["failed"] == 0
        and bad.state == canary.ROLLED_BACK
        and result["bad"]["failed_on_stable"] == 0
        and (result["bad"]["failed_vs_budget"] or 0) <= 1.0
    )
    table = Table(title=f"canary on the {args.preset} MoE, {args.clients} clients, bake {args.bake_s:g}s")
    table.add_column("")
    table.add_column("result", justify="right")
    table.add_row("good canary", f"{good.state} in {good_seconds:.0f}s, {result['good']['failed']} failed requests")
    table.add_row("bad canary", f"{bad.state}: {bad.reason}")
    table.add_row("first error -> rollback", f"{rolled_back_at - first_error:.2f}s")
    table.add_row("first error -> router all on stable", f"{split_back_at - first_error:.2f}s")
    table.add_row("failed (bad canary)", f"{len(failed)} of {len(bad_traffic.seen)}, budget {budget:.1f}")
    table.add_row("targets met", str(result["targets_met"]))
    console.print(table)
    write_results(args.out, result)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
