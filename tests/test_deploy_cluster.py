"""`jobs/deploy.py` on a machine where no Ray cluster runs: it starts one with `ray start --head`, deploys there,
and the application keeps serving after the command exits; a second deploy joins that cluster instead of starting
another. The test owns that cluster (its own $RAY_TMPDIR) and stops exactly it, never `ray stop`.

Then against a cluster it did not start: API keys from the deploying shell only, a deploy too big for the cluster,
a router that fails at start, and nf4 on a node whose bitsandbytes cannot run; each on a head the tests own
(`LocalCluster`)."""

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
import yaml
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
    _, alive = psutil.wait_procs(processes, timeout=5)  # a graceful head stop waits 30 s on its children
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


# -- `strata deploy` against a cluster it did not start (`--address`), as on a shared or remote head ------------------


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU head started without $STRATA_API_KEYS, whose Python imports this checkout's `strata`."""
    from raycluster import LocalCluster

    owned = LocalCluster(head_cpus=2, env={"PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}", "STRATA_API_KEYS": ""})
    owned.serve_port = free_port()
    yield owned
    owned.shutdown()


def register(model: str, model_dir: Path, aliases: list[str]) -> str:
    """`model_dir` as a version of `model` in this test's store, every alias pointing at it; the store's URI."""
    from strata import registry, tracking

    uri = tracking.use_store()
    with tracking.start_run("deploy-test", "versions", {}):
        version = registry.log_model(model_dir, model).version
    for alias in aliases:
        registry.set_alias(model, alias, version)
    return uri


def deploy_to(cluster, home: Path, uri: str, app: str, *args: str, keys: str = KEY) -> subprocess.CompletedProcess:
    """`jobs/deploy.py --address` from a shell of its own: its $STRATA_HOME, store and $STRATA_API_KEYS."""
    env = {**cluster.env, "STRATA_HOME": str(home), "MLFLOW_TRACKING_URI": uri, "STRATA_API_KEYS": keys}
    command = [sys.executable, "jobs/deploy.py", "--model", MODEL, "--app", app, "--route-prefix", f"/{app}"]
    command += ["--address", cluster.address, "--port", str(cluster.serve_port), "--wait-timeout", "240", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def applications(cluster) -> dict:
    headers = {"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"}
    return httpx.get(f"{cluster.dashboard_url}/api/serve/applications/", headers=headers).json()["applications"]


@pytest.mark.slow
def test_keys_from_the_deploying_shell_work_on_a_cluster_started_without_them(cluster, tiny_base, strata_home):
    from strata.serve.auth import hash_key

    uri = register(MODEL, tiny_base, ["stable"])
    deployed = deploy_to(cluster, strata_home, uri, "keys", "--split", "stable=100", "--num-cpus", "0.25")
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    url = f"http://127.0.0.1:{cluster.serve_port}/keys/v1/completions"
    assert complete(url).status_code == 200
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer sk-wrong"}).status_code == 401

    written = (strata_home / "serve/keys.yaml").read_text()
    assert KEY not in written  # only its hash travels
    [app] = yaml.safe_load(written)["applications"]
    assert app["args"]["auth"]["api_key_hashes"] == [hash_key(KEY)]


@pytest.mark.slow
def test_a_deploy_the_cluster_cannot_hold_fails_at_once_naming_the_numbers(cluster, tiny_base, strata_home):
    """Two replicas at 1 CPU and the router's 0.5 on a 2-CPU head: refused before anything is deployed."""
    uri = register(MODEL, tiny_base, ["stable", "fast"])
    deployed = deploy_to(cluster, strata_home, uri, "big", "--split", "stable=50,fast=50", "--num-cpus", "1")
    assert deployed.returncode == 1, deployed.stderr[-3000:]
    error = " ".join(deployed.stderr.split())  # the console wraps long lines
    assert "needs 2.5 CPUs (Router 1 x 0.5, model-stable 1 x 1, model-fast 1 x 1)" in error, error
    assert "but the cluster has 2" in error and "lower --num-cpus (per model replica)" in error, error
    assert "big" not in applications(cluster)
    assert not (strata_home / "serve/big.yaml").exists()


@pytest.mark.slow
def test_a_router_that_fails_to_start_shows_its_own_error(cluster, tiny_base, strata_home):
    """A real fault: the audit log's directory is a file, so the router's constructor raises on the cluster. The
    command must say so, not only Serve's "Failed to update the deployments ['Router']"."""
    uri = register(MODEL, tiny_base, ["stable"])
    (strata_home / "logs").write_text("not a directory")
    deployed = deploy_to(cluster, strata_home, uri, "broken", "--split", "stable=100", "--num-cpus", "0.25")
    assert deployed.returncode == 1, deployed.stderr[-3000:]
    assert "failed to deploy" in deployed.stderr, deployed.stderr[-3000:]
    assert "Router:" in deployed.stderr and "FileExistsError" in deployed.stderr, deployed.stderr[-3000:]
    assert str(strata_home / "logs") in deployed.stderr.replace("\n", "")


@pytest.mark.slow
def test_nf4_is_refused_at_deploy_naming_the_node_whose_bitsandbytes_cannot_run(
    cluster, tiny_base, strata_home, tmp_path
):
    """A real fault on one node: its Python finds a bitsandbytes that fails to import, as with a build for another
    CUDA. The deploying shell and the head run nf4 fine, so only a check on the replica's own node sees it: the deploy
    is refused naming the variant and that node, before anything is deployed. Without that node, the same deploy
    serves."""
    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise ImportError("libbitsandbytes_cuda124.so: cannot open shared object file: No such file or directory")\n'
    )
    uri = register(MODEL, tiny_base, ["stable"])
    nf4 = ["--split", "stable=100", "--num-cpus", "0.25", "--quantization", "nf4"]
    cluster.add_node(
        "no-bnb", cpus=1, resources={"no_bnb": 1}, env={"PYTHONPATH": f"{broken.parent}:{ROOT / 'platform'}:{ROOT}"}
    )
    try:
        deployed = deploy_to(cluster, strata_home, uri, "nf4", *nf4, "--resources", '{"no_bnb": 1}')
        assert deployed.returncode == 2, deployed.stderr[-3000:]  # a config error, found before deploying
        error = " ".join(deployed.stderr.split())
        assert "variant 'stable': engine.quantization nf4 needs bitsandbytes, which cannot run on 1 node(s)" in error, (
            error[-3000:]
        )
        assert "no-bnb" in error and "libbitsandbytes_cuda124.so" in error, error[-3000:]
        assert "nf4" not in applications(cluster)  # nothing was deployed, so no replica ever started
        assert not (strata_home / "serve/nf4.yaml").exists()
    finally:
        cluster.kill_node("no-bnb")

    deployed = deploy_to(cluster, strata_home, uri, "nf4", *nf4)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert complete(f"http://127.0.0.1:{cluster.serve_port}/nf4/v1/completions").status_code == 200
