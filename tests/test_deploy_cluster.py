"""`jobs/deploy.py` on a machine where no Ray cluster runs: it starts one with `ray start --head`, deploys there,
and the application keeps serving after the command exits; a second deploy joins that cluster instead of starting
another. The test owns that cluster (its own $RAY_TMPDIR) and stops exactly it, never `ray stop`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest
from raycluster import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "strata-fresh"
KEY = "sk-fresh-0123456789"


def processes_under(directory: Path) -> list[psutil.Process]:
    """Every process of the cluster kept under `directory`, and their children (workers, Serve actors)."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        if str(directory) in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
            with_children = process.children(recursive=True) if process.is_running() else []
            found.update({child.pid: child for child in with_children})
    return list(found.values())


def stop_cluster(directory: Path) -> None:
    processes = processes_under(directory)
    for process in processes:
        process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=15)
    for process in alive:
        process.kill()


def deploy(env: dict[str, str], port: int, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "jobs/deploy.py", "--model", MODEL, "--split", "stable=100", "--port", str(port)]
    command += ["--num-cpus", "0.25", "--cluster-cpus", "2", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def complete(url: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": "def main(", "max_tokens": 4, "temperature": 0}
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


@pytest.mark.slow
def test_deploy_starts_a_cluster_when_none_runs_and_joins_it_next_time(tiny_base, strata_home):
    from strata import registry, tracking

    uri = tracking.use_store()
    with tracking.start_run("deploy-test", "versions", {}):
        version = registry.log_model(tiny_base, MODEL).version
    registry.set_alias(MODEL, "stable", version)

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's unix socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "MLFLOW_TRACKING_URI": uri, "STRATA_API_KEYS": KEY}
    env.pop("RAY_ADDRESS", None)  # this session's own Ray must not be found: Ray looks under $RAY_TMPDIR only
    port = free_port()
    try:
        first = deploy(env, port)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"serving {MODEL} at http://127.0.0.1:{port}/v1" in first.stderr  # the CLI reports on stderr
        heads = [p for p in processes_under(ray_tmp) if "gcs_server" in p.name()]
        assert len(heads) == 1, "deploy did not start a cluster of its own"

        response = complete(f"http://127.0.0.1:{port}/v1/completions")  # the command has exited; Serve has not
        assert response.status_code == 200, response.text
        assert response.headers["x-strata-variant"] == "stable"
        assert response.json()["usage"]["completion_tokens"] > 0

        second = deploy(env, port, "--app", "again", "--route-prefix", "/again")
        assert second.returncode == 0, second.stdout + second.stderr
        assert len([p for p in processes_under(ray_tmp) if "gcs_server" in p.name()]) == 1, "a second cluster"
        assert complete(f"http://127.0.0.1:{port}/again/v1/completions").status_code == 200
        assert complete(f"http://127.0.0.1:{port}/v1/completions").status_code == 200  # the first app still serves
    finally:
        stop_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not processes_under(ray_tmp)
