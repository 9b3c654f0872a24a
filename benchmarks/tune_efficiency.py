"""Sweep efficiency: ASHA against running every configuration to the end, on the same space, in one invocation.

The space is a grid of 8 LoRA configurations (4 learning rates x 2 ranks) of a short fine-tune of the `tiny` MoE
(random initial weights, a tokenizer trained on 120 stdlib files, the built-in docstring -> function data). Both
sweeps are `strata.tune.sweep.run_sweep` with the same grid, trial budget and reporting interval; only the
scheduler differs (FIFO runs every trial to `max_steps`; ASHA stops the poor ones at its rungs). Reported: the
trial-steps each used, the best `eval_loss` each found, and the ratios.

Targets: ASHA's best within 2% of the exhaustive best, with at most 40% of its trial-steps. Reported, never
asserted: the script exits 0 either way.

    python benchmarks/tune_efficiency.py [--max-steps 40] [--report-every 10] [--out FILE]
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import yaml  # noqa: E402
from generation import build_base  # noqa: E402
from reporting import RESULTS_DIR, write_results  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from strata.config.tune import load_tune_config  # noqa: E402
from strata.runtime import init_ray  # noqa: E402
from strata.tune.sweep import run_sweep  # noqa: E402

LEARNING_RATES = [3e-4, 1e-3, 3e-3, 1e-2]
RANKS = [4, 16]


def write_configs(directory: Path, base_model: str, scheduler: dict, args: argparse.Namespace) -> Path:
    base = {
        "base_model": base_model,
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"builtin": "stdlib-docstrings", "max_records": 600, "max_seq_len": 128, "data_dir": str(directory)},
        "optim": {
            "lr": 1e-3,
            "warmup_steps": 2,
            "max_steps": args.max_steps,
            "micro_batch_size": 8,
            "global_batch_size": 16,
        },
        "scaling": {"num_workers": 1},
        "tracking": {"experiment": "tune-efficiency-runs", "registered_model": None},
    }
    (directory / "base.yaml").write_text(yaml.safe_dump(base))
    name = f"efficiency-{scheduler['type']}"
    sweep = {
        "name": name,
        "base_config": "base.yaml",
        "search_space": {"optim.lr": {"grid": LEARNING_RATES}, "lora.rank": {"grid": RANKS}},
        "search": "grid",
        "num_samples": 1,
        "max_steps": args.max_steps,
        "report_every_steps": args.report_every,
        "scheduler": scheduler,
        "experiment": "tune-efficiency",
        "storage_path": str(directory / "runs"),
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=40, help="each trial's budget")
    parser.add_argument("--report-every", type=int, default=5, help="eval + report interval (ASHA's decision points)")
    parser.add_argument("--grace", type=int, default=5, help="ASHA: steps before a trial can be stopped")
    parser.add_argument("--reduction-factor", type=float, default=3, help="ASHA: keep the best 1/factor per rung")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "tune_efficiency.json")
    args = parser.parse_args()

    console = Console()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["STRATA_HOME"] = str(home)  # the MLflow store and everything else stay in here
        base_dir = build_base(home, "tiny", console)
        init_ray()
        schedulers = {
            "exhaustive": {"type": "fifo"},
            "asha": {"type": "asha", "grace_period_steps": args.grace, "reduction_factor": args.reduction_factor},
        }
        results = {}
        for label, scheduler in schedulers.items():
            tune, base_tree = load_tune_config(write_configs(home, str(base_dir), scheduler, args))
            started = time.perf_counter()
            sweep = run_sweep(tune, base_tree, Console(stderr=True, quiet=True))
            results[label] = {
                "trial_steps": sweep.trial_steps,
                "best_eval_loss": sweep.best["eval_loss"],
                "best_params": sweep.best["params"],
                "trials": [{k: r[k] for k in ("params", "state", "step", "eval_loss")} for r in sweep.trials],
                "seconds": time.perf_counter() - started,
            }

    asha, full = results["asha"], results["exhaustive"]
    report = {
        "space": {"optim.lr": LEARNING_RATES, "lora.rank": RANKS},
        "max_steps": args.max_steps,
        "report_every_steps": args.report_every,
        "asha": {"grace_period_steps": args.grace, "reduction_factor": args.reduction_factor},
        "results": results,
        "trial_steps_ratio": asha["trial_steps"] / full["trial_steps"],
        "best_eval_loss_gap": asha["best_eval_loss"] / full["best_eval_loss"] - 1,
        "targets": {"trial_steps_ratio_max": 0.40, "best_eval_loss_gap_max": 0.02},
        "seconds": time.perf_counter() - began,
    }
    report["targets_met"] = report["trial_steps_ratio"] <= 0.40 and report["best_eval_loss_gap"] <= 0.02

    table = Table(
        title=f"ASHA vs exhaustive: {len(LEARNING_RATES) * len(RANKS)} configurations, {args.max_steps} steps"
    )
    for column in ("sweep", "trial-steps", "best eval_loss", "best params", "seconds"):
        table.add_column(column)
    for label, result in results.items():
        table.add_row(
            label,
            str(result["trial_steps"]),
            f"{result['best_eval_loss']:.4f}",
            str(result["best_params"]),
            f"{result['seconds']:.0f}",
        )
    console.print(table)
    console.print(
        f"ASHA used {report['trial_steps_ratio']:.0%} of the trial-steps (target <= 40%); its best is "
        f"{report['best_eval_loss_gap']:+.2%} from the exhaustive best (target <= +2%): "
        f"{'met' if report['targets_met'] else 'NOT met'}"
    )
    write_results(args.out, report)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
