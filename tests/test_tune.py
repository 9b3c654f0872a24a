"""Sweeps: every bad search space fails before a trial starts; a real ASHA sweep on Ray Tune + Ray Train stops a
poor trial early, nests its trials under one MLflow parent run and registers the best; a killed sweep resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from strata import tracking
from strata.config import ConfigError, PromotionGates
from strata.config.tune import REPORTED_METRICS, load_tune_config, trial_tree
from strata.release.promotion import lineage_gate

ROOT = Path(__file__).resolve().parents[1]


def write_sweep(directory: Path, base_model: str, train_file: Path, **changes) -> Path:
    """A tiny LoRA base config and a sweep over it, in `directory`."""
    base = {
        "base_model": base_model,
        "method": "lora",
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_file": str(train_file), "eval_fraction": 0.15, "max_seq_len": 64},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "max_steps": 20, "micro_batch_size": 4, "global_batch_size": 8},
        "checkpoint": {"keep_last": 2},
        "scaling": {"num_workers": 1},
        "tracking": {"experiment": "tune-test-ft", "registered_model": "strata-tune-test"},
    }
    (directory / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "name": "sweep-test",
        "base_config": "base.yaml",
        "search_space": {"optim.lr": {"grid": [1e-2, 1e-6]}},
        "search": "grid",
        "num_samples": 1,
        "max_steps": 20,
        "report_every_steps": 5,
        "scheduler": {"type": "asha", "grace_period_steps": 5, "reduction_factor": 2},
        "experiment": "tune-test",
        **changes,
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.fixture
def sft_file(tmp_path) -> Path:
    """Short records whose responses a LoRA learns within a few steps."""
    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"Write function number {i}", "response": f"def f{i}():\n    return {i}"} for i in range(120)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"search_space": {"optim.lrr": {"uniform": [0.1, 0.2]}}}, "search_space.optim.lrr", "has no field"),
        ({"search_space": {"lora.rank": {"choice": ["big", 8]}}}, "search_space.lora.rank", "'big' is invalid"),
        ({"search_space": {"optim.lr": {"uniform": [0.1, 0.1]}}}, "search_space.optim.lr", "empty or inverted"),
        ({"search_space": {"optim.lr": {"loguniform": [1e-2, 1e-4]}}}, "search_space.optim.lr", "empty or inverted"),
        ({"search_space": {"optim.lr": {"loguniform": [0, 1e-4]}}}, "search_space.optim.lr", "positive"),
        ({"search_space": {"lora.rank": {"choice": []}}}, "search_space.lora.rank", "at least one value"),
        (
            {"search_space": {"optim.lr": {"uniform": [0.1, 0.2], "choice": [1]}}},
            "search_space.optim.lr",
            "exactly one",
        ),
        ({"search_space": {"optim.lr": {"uniform": [-1.0, 0.2]}}}, "search_space.optim.lr", "invalid"),
        ({"metric": "accuracy"}, "metric", "never reports it"),
        ({"search": "optuna"}, "(top level)", "cannot take `grid`"),
        ({"overrides": {"optim.nope": 1}}, "overrides.optim.nope", "has no field"),
    ],
)
def test_bad_search_space_fails_before_any_trial_naming_the_field(tmp_path, sft_file, change, field, message):
    if "search_space" in change:
        change = {"search": "random", **change}  # the default sweep searches a grid
    path = write_sweep(tmp_path, "models:/strata-test-base@stable", sft_file, **change)
    with pytest.raises(ConfigError) as err:
        load_tune_config(path)
    assert field in str(err.value) and message in str(err.value), str(err.value)


def test_a_good_sweep_loads_and_the_shipped_sweep_is_valid(tmp_path, sft_file):
    tune, base_tree = load_tune_config(write_sweep(tmp_path, "models:/x@stable", sft_file))
    assert tune.registered_model == "strata-tune-test"  # the job's, when the sweep names none
    assert base_tree["method"] == "lora"
    shipped, _ = load_tune_config(ROOT / "configs/tune-lora-tiny.yaml")
    assert shipped.metric in REPORTED_METRICS["finetune"]


def test_the_sweeps_overrides_are_the_job_the_sweep_pins_and_tracks(tmp_path, sft_file):
    """The sweep pins its base model and opens its store before any trial: both must see the sweep's `overrides`,
    and the pinned base must survive into every trial (the demo sweeps over a base its overrides name)."""
    overrides = {"base_model": "models:/strata-other/3", "tracking.registered_model": "strata-other-sft"}
    path = write_sweep(tmp_path, "models:/strata-tiny/latest", sft_file, overrides=overrides)
    tune, base_tree = load_tune_config(path)
    assert base_tree["base_model"] == "models:/strata-other/3"
    assert tune.registered_model == "strata-other-sft"
    pinned = {**base_tree, "base_model": "models:/strata-other/3"}
    assert trial_tree(tune, pinned, {"optim.lr": 1e-3}, "t")["base_model"] == "models:/strata-other/3"


@pytest.mark.slow
def test_asha_stops_the_poor_trial_nests_trials_in_mlflow_and_registers_the_best(
    ray_session, registered_base, strata_home, sft_file
):
    from strata.tune.sweep import run_sweep

    # The base model comes from the sweep's overrides, as in the demo: the base config names one the registry lacks.
    absent = "models:/strata-absent/latest"
    sweep = write_sweep(strata_home, absent, sft_file, overrides={"base_model": registered_base})
    tune, base_tree = load_tune_config(sweep)
    result = run_sweep(tune, base_tree)

    by_lr = {row["params"]["optim.lr"]: row for row in result.trials}
    assert by_lr[1e-2]["state"] == "completed" and by_lr[1e-2]["step"] == 20
    assert by_lr[1e-6]["state"].startswith("stopped early at step"), by_lr[1e-6]  # ASHA: worse at the first rung
    assert result.trial_steps == by_lr[1e-2]["step"] + by_lr[1e-6]["step"] < 2 * tune.max_steps
    assert result.best["trial"] == by_lr[1e-2]["trial"]

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.data.tags["strata.stop_reason"] in {row["state"] for row in result.trials}
        assert "eval_loss" in child.data.metrics and "optim.lr" in child.data.params
        history = client.get_metric_history(child.info.run_id, "eval_loss")
        assert len(history) >= 2  # reported at regular intervals, not only at the end
    completed = next(c for c in children if c.data.tags["strata.stop_reason"] == "completed")
    assert set(REPORTED_METRICS["finetune"]) <= set(completed.data.metrics)  # what the sweep checks metrics against
    assert parent.data.metrics["trial_steps"] == result.trial_steps
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "best_config.yaml", "search_space.yaml"} <= artifacts
    best_config = yaml.safe_load(
        Path(
            mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="best_config.yaml")
        ).read_text()
    )
    assert best_config["optim"]["lr"] == 1e-2 and best_config["optim"]["max_steps"] == 20

    version = client.get_model_version("strata-tune-test", result.registered_version)
    assert version.tags["strata.sweep"] == "sweep-test"
    assert version.tags["strata.trial_id"] == result.best["trial"]
    assert version.tags["strata.param.optim.lr"] == "0.01"
    assert float(version.tags["eval_loss"]) == pytest.approx(result.best["eval_loss"])
    assert not client.get_registered_model("strata-tune-test").aliases  # registered, never promoted
    # ... and promotable: the release workflow's lineage gate finds the base version and the data it was tuned on.
    gate = lineage_gate(client, version, PromotionGates())
    assert gate.passed, gate.detail
    assert version.tags["base_model_version"] == "1" and version.tags["strata.method"] == "lora"


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(ray_session, registered_base, strata_home, sft_file):
    """The sweep's driver joins this session's Ray, as a driver joins a running cluster: SIGKILLed, it takes its
    trials with it (they are its actors), and the rerun's driver picks the sweep up from Tune's saved state."""
    path = write_sweep(strata_home, registered_base, sft_file, scheduler={"type": "fifo"}, max_steps=10)
    env = {**os.environ, "STRATA_HOME": str(strata_home), "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    env["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address
    # Tune saves its experiment state at most every 10 s by default: on a fast machine the second trial could
    # finish before the saved state shows the first as finished. Saved at every turn of its loop, it shows at once.
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    command = [sys.executable, str(ROOT / "jobs/tune.py"), "--config", str(path)]
    log = (strata_home / "first.log").open("w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient()
    state_dir = strata_home / "runs" / "tune" / "sweep-test-tuner"
    deadline = time.monotonic() + 600
    # Kill the driver once Tune's saved experiment state records the first trial as finished (the second has
    # started by then: trials run one at a time).
    while not any("TERMINATED" in p.read_text() for p in state_dir.glob("experiment_state-*.json")):
        assert first.poll() is None, (strata_home / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first trial never finished"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    experiment = client.get_experiment_by_name("tune-test").experiment_id
    parent_before = tracking.find_run(experiment, "sweep-test")
    trial_runs = client.search_runs([experiment], filter_string="tags.`strata.sweep` = 'sweep-test'")
    [finished] = [r for r in trial_runs if r.data.metrics.get("progress_step") == 10]
    finished_history = client.get_metric_history(finished.info.run_id, "progress_step")

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert tracking.find_run(experiment, "sweep-test") == parent_before  # the same parent run continues
    runs = client.search_runs([experiment], filter_string="tags.`strata.sweep` = 'sweep-test'")
    assert len(runs) == 2 and all(r.data.tags.get("strata.stop_reason") == "completed" for r in runs)
    # The finished trial was not trained again: no new progress, no resume recorded in its run.
    assert client.get_metric_history(finished.info.run_id, "progress_step") == finished_history
    assert "resumed_from_step" not in client.get_run(finished.info.run_id).data.metrics
    assert "leaderboard" in second.stderr
