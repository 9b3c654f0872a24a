"""`ray job submit` of the pretraining job against a head node this test starts (and alone stops)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from raycluster import RAY, LocalCluster

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def head_node():
    cluster = LocalCluster(head_cpus=2)
    yield cluster.dashboard_url, cluster.env
    cluster.shutdown()


@pytest.mark.slow
def test_pretrain_job_submitted_from_a_clean_checkout_succeeds(head_node, tmp_path):
    url, env = head_node
    checkout = tmp_path / "checkout"  # a clean clone: no .venv, no data, no installed strata
    subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
    for path in ("platform", "jobs", "configs"):  # the working tree, committed or not
        shutil.rmtree(checkout / path)
        shutil.copytree(ROOT / path, checkout / path, ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    command = [
        RAY, "job", "submit", "--address", url, "--working-dir", ".",
        "--runtime-env-json", json.dumps({"env_vars": {"STRATA_HOME": str(home)}}), "--",
        "python", "jobs/pretrain.py", "--config", "configs/pretrain-tiny.yaml",
        "--set", "data.max_files=150", "--set", "optim.max_steps=20", "--set", "optim.warmup_steps=5",
        "--set", "checkpoint.every_steps=10", "--set", "tracking.log_every_steps=5",
    ]  # fmt: skip
    deadline = time.time() + 120
    while True:  # the head's job agent registers a little after its dashboard answers
        submit = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(2)
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower()
    assert "registered: models:/strata-tiny/1" in logs
    assert sorted(p.name for p in (home / "runs" / "pretrain-tiny").glob("checkpoint_0*")) == [
        "checkpoint_0000010",
        "checkpoint_0000020",
    ]
    assert (home / "mlruns" / "mlflow.db").exists()
