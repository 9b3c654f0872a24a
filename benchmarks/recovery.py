"""Recovery benchmark: what a lost worker and a spot reclaim cost a pretraining run, against no fault at all.

Three runs of the same small `tiny` pretraining job (2 workers, checkpoint every 10 steps), each on a fresh
local two-node cluster (a head without CPUs plus one "spot" node), side by side in one process:

- uninterrupted: the baseline wall time;
- worker kill: one training worker is SIGKILLed a second after the step-10 checkpoint (no notice);
- spot notice: a fake instance-metadata service posts a spot interruption notice; `strata spot-watch` drains
  the node, the loop writes a just-in-time checkpoint; a replacement node joins and the old one is killed.

For each fault it prints steps lost, seconds from the fault to the resumed worker group's first report, and
the run's wall-time overhead against the baseline. Targets: 0 steps lost with a notice, at most one checkpoint
interval without; resume in under 30 s here. Results go to benchmarks/results/recovery.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "tests"))  # the local multi-node cluster and fake metadata service

import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from raycluster import FakeMetadataService, LocalCluster, start_job, start_spot_watcher  # noqa: E402
from reporting import RESULTS_DIR, write_results  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from strata.config import DataConfig, PretrainConfig  # noqa: E402
from strata.data.prepare import prepare_data  # noqa: E402
from strata.train.faults import WorkerKiller, wait_for_checkpoint  # noqa: E402

CHECKPOINT_EVERY = 10
console = Console()


def job_config(home: Path, data: DataConfig, steps: int) -> Path:
    config = PretrainConfig.model_validate(
        {
            "run_name": "bench",
            "data": data.model_dump(),
            "optim": {
                "lr": 3e-3,
                "warmup_steps": 3,
                "max_steps": steps,
                "micro_batch_size": 4,
                "global_batch_size": 16,
            },
            "checkpoint": {"every_steps": CHECKPOINT_EVERY, "keep_last": 2, "storage_path": str(home / "runs")},
            "scaling": {"num_workers": 2, "resources_per_worker": {"spot": 1}},
            "tracking": {
                "tracking_uri": f"sqlite:///{home}/mlflow.db",
                "experiment": "recovery-bench",
                "registered_model": None,
                "log_every_steps": 5,
            },
        }
    )
    path = home / "job.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def run(scenario: str, home: Path, data: DataConfig, steps: int) -> dict:
    home.mkdir(parents=True)
    config_file = job_config(home, data, steps)
    cluster = LocalCluster(head_cpus=0, env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"})
    imds = FakeMetadataService()
    fault_at = None
    try:
        cluster.add_node("spot-a", cpus=2, resources={"spot": 2})
        watcher = start_spot_watcher(cluster, "spot-a", imds.url, ROOT / "platform") if scenario == "spot" else None
        started = time.time()
        driver = start_job(
            cluster, ROOT / "jobs/pretrain.py", ["--config", str(config_file)], {"STRATA_HOME": str(home)}
        )
        run_dir = home / "runs" / "bench"
        if scenario == "kill":
            killer = WorkerKiller(run_dir, CHECKPOINT_EVERY, within_pid=cluster.processes["spot-a"].pid).start()
            killer.join()
            fault_at = killer.killed_at
        elif scenario == "spot":
            wait_for_checkpoint(run_dir, CHECKPOINT_EVERY)
            imds.arm(seconds_left=15)
            watcher.wait(timeout=60)
            fault_at = time.time()  # the notice reached Ray; what follows is the reclaim and the restart
            cluster.add_node("spot-b", cpus=2, resources={"spot": 2})
            wait_for_extra_checkpoint(run_dir)
            cluster.kill_node("spot-a")
        output, _ = driver.communicate(timeout=900)
        wall = time.time() - started
        if driver.returncode != 0:
            raise RuntimeError(f"{scenario} run failed:\n{output[-3000:]}")
    finally:
        cluster.shutdown()
        imds.server.shutdown()

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    run_id = client.search_runs([client.get_experiment_by_name("recovery-bench").experiment_id])[0].info.run_id
    metric = lambda key: client.get_metric_history(run_id, key)  # noqa: E731
    resumed = metric("resumed_from_step")
    result = {"scenario": scenario, "wall_s": wall}
    if fault_at is not None and resumed:
        result.update(
            resumed_from_step=resumed[0].value,
            steps_lost=metric("recovery_steps_lost")[0].value,
            fault_to_resume_s=resumed[0].timestamp / 1000 - fault_at,
        )
    return result


def wait_for_extra_checkpoint(run_dir: Path, timeout_s: float = 120) -> None:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = snapshot.read_text() if snapshot.exists() else ""
        steps = {int(part[:7]) for part in text.split("checkpoint_")[1:] if part[:7].isdigit()}
        if any(step % CHECKPOINT_EVERY for step in steps):
            return
        time.sleep(0.1)
    raise TimeoutError("no just-in-time checkpoint")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "recovery.json")
    args = parser.parse_args()

    workdir = Path(args.out).parent / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}"
    data = DataConfig(data_dir=str(Path(args.out).parent / "data"), max_files=150, vocab_size=1024, seq_len=64)
    prepare_data(data, console)
    results = {}
    for scenario in ("uninterrupted", "kill", "spot"):
        with console.status(f"{scenario} run"):
            results[scenario] = run(scenario, workdir / scenario, data, args.steps)
        console.print(f"{scenario}: done in {results[scenario]['wall_s']:.0f}s")

    base = results["uninterrupted"]["wall_s"]
    table = Table("scenario", "steps lost", "fault -> resumed (s)", "wall (s)", "overhead")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['steps_lost']:.0f}" if "steps_lost" in r else "-",
            f"{r['fault_to_resume_s']:.1f}" if "fault_to_resume_s" in r else "-",
            f"{r['wall_s']:.0f}",
            f"{r['wall_s'] / base - 1:+.0%}",
        )
    console.print(table)
    kill, spot = results["kill"], results["spot"]
    targets = {
        "0 steps lost with a spot notice": spot.get("steps_lost") == 0,
        f"<= {CHECKPOINT_EVERY} steps lost without notice": kill.get("steps_lost", 1e9) <= CHECKPOINT_EVERY,
        "resume < 30 s after a worker kill": kill.get("fault_to_resume_s", 1e9) < 30,
    }
    for name, met in targets.items():
        console.print(f"{name}: {'target met' if met else 'target missed'}")
    write_results(args.out, {"results": results, "targets": targets})
    console.print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
