"""`ray job submit` of the pretraining job against a head node this test starts (and alone stops)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """`ray start --head --block` as our own child: killing its process group stops exactly what it started."""
    temp_dir = Path(tempfile.mkdtemp(prefix="strata-ray-", dir="/tmp"))  # short: Ray's unix sockets live here
    port, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        # The cluster's Python has the dependencies (as a cluster image would); `strata` itself is not installed.
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            request = urllib.request.Request(
                f"{url}/api/version", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
            )
            urllib.request.urlopen(request, timeout=2)
            break
        except Exception:
            assert head.poll() is None, "ray start --head exited early"
            time.sleep(1)
    else:
        pytest.fail("the head node's job server did not come up in 90 s")
    yield url, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_pretrain_job_submitted_from_a_clean_checkout_succeeds(head_node, tmp_path):
    url, env = head_node
    checkout = tmp_path / "checkout"  # a clean clone: no .venv, no data, no installed strata
    subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
    for path in ("platform", "jobs", "configs"):  # the working tree, committed or not
        shutil.rmtree(checkout / path)
        shutil.copytree(ROOT / path, checkout / path, ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    submit = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            url,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"env_vars": {"STRATA_HOME": str(home)}}),
            "--",
            "python",
            "jobs/pretrain.py",
            "--config",
            "configs/pretrain-tiny.yaml",
            "--set",
            "data.max_files=150",
            "--set",
            "optim.max_steps=20",
            "--set",
            "optim.warmup_steps=5",
            "--set",
            "checkpoint.every_steps=10",
            "--set",
            "tracking.log_every_steps=5",
        ],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower()
    assert "registered: models:/strata-tiny/1" in logs
    assert sorted(p.name for p in (home / "runs" / "pretrain-tiny").glob("checkpoint_0*")) == [
        "checkpoint_0000010",
        "checkpoint_0000020",
    ]
    assert (home / "mlruns" / "mlflow.db").exists()
