"""cluster/aws.yaml's node types on Ray's fake multi-node autoscaler (`FakeAutoscalingCluster`): a real pretraining
job asking for `train_gpu` makes the autoscaler launch a training node, its workers run there and the node goes
once idle; the job's driver runs on `cpu-driver` (`--entrypoint-resources '{"driver": 1}'`); the model it registered
is deployed with `--resources '{"serve_gpu": 1}'` and its replica lands on a `serve-gpu` node the autoscaler adds.
Which group each piece ran on is read from Ray's own records: node labels (`ray.io/node-group`, set by the
autoscaler) and where the job's driver and each actor ran."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from panels import queries, query_range
from raycluster import RAY, FakeAutoscalingCluster, free_port

from strata.monitor import ray_discovery_file, start_prometheus

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
AWS_YAML = ROOT / "cluster" / "aws.yaml"
TRAIN_GROUPS = {"train-spot-g6e", "train-spot-g5", "train-ondemand-g6e"}
MODEL = "strata-fake-cluster"
KEY = "sk-fake-cluster-0123456789"


def wait_until(condition, what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)


def test_training_and_serving_run_on_the_groups_they_ask_for(small_data, promtool, tmp_path):
    """Also the dashboards' autoscaler panels (nodes and pending nodes by group, pending demand): a real Prometheus
    scrapes this cluster, and each of their queries returns data, the training group among the nodes."""
    data = small_data[0]
    cluster = FakeAutoscalingCluster(AWS_YAML)
    prometheus = None
    try:
        prometheus_port = free_port()
        prometheus = start_prometheus(
            tmp_path / "prometheus", ray_discovery_file(cluster.temp_dir), prometheus_port, scrape_interval_s=1
        )
        started = time.time()
        wait_until(lambda: "cpu-driver" in cluster.node_types().values(), "cpu-driver (min_workers 1) up")
        assert set(cluster.node_types().values()) == {"head", "cpu-driver"}  # the GPU groups start at 0

        submit = [
            RAY, "job", "submit", "--address", cluster.dashboard_url, "--entrypoint-resources", '{"driver": 1}',
            "--runtime-env-json", json.dumps({"env_vars": {"STRATA_HOME": str(tmp_path)}}), "--",
            sys.executable, str(ROOT / "jobs/pretrain.py"), "--config", str(ROOT / "configs/pretrain-tiny.yaml"),
            "--set", f"data.data_dir={data.data_dir}", "--set", f"data.max_files={data.max_files}",
            "--set", f"data.vocab_size={data.vocab_size}", "--set", f"data.seq_len={data.seq_len}",
            "--set", "optim.max_steps=10", "--set", "optim.warmup_steps=2", "--set", "checkpoint.every_steps=10",
            "--set", "optim.micro_batch_size=4", "--set", "optim.global_batch_size=8",
            "--set", "scaling.resources_per_worker={train_gpu: 1}", "--set", f"tracking.registered_model={MODEL}",
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ]  # fmt: skip
        deadline = time.time() + 60
        while True:  # the head's job agent registers a little after its dashboard answers
            job = subprocess.run(submit, env=cluster.env, capture_output=True, text=True, timeout=300)
            if "No available agent to submit job" not in job.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert f"registered: models:/{MODEL}/1" in job.stdout + job.stderr, job.stdout[-3000:]

        nodes = cluster.node_types(include_dead=True)
        [job_info] = [j for j in cluster.api("/api/jobs/") if j["type"] == "SUBMISSION"]
        assert nodes[job_info["driver_node_id"]] == "cpu-driver"
        workers = cluster.actor_nodes("RayTrainWorker")
        # On nodes of a training group, launched for this job (only the head and cpu-driver ran before it).
        assert len(workers) == 2 and {nodes[n] for n in workers} <= TRAIN_GROUPS, (workers, nodes)
        # The training node was added for this job and is removed once idle (idle_timeout_minutes).
        wait_until(lambda: not set(workers) & set(cluster.node_types()), "idle training node removed")
        url = f"http://127.0.0.1:{prometheus_port}"
        autoscaler_panels = {name: expr for name, expr, needs in queries() if needs == "autoscaler"}
        assert len(autoscaler_panels) == 3, autoscaler_panels
        for name, expr in autoscaler_panels.items():
            assert query_range(url, expr, started, time.time()), f"{name}: no data from the autoscaler"
        [nodes_by_group] = [e for n, e in autoscaler_panels.items() if n.endswith("/Nodes by group")]
        groups = {r["metric"].get("NodeType") for r in query_range(url, nodes_by_group, started, time.time())}
        assert {nodes[n] for n in workers} <= groups, groups  # the training node was seen while it ran

        store = f"sqlite:///{tmp_path}/mlflow.db"  # the registry too: another test may have set this process's
        MlflowClient(store, registry_uri=store).set_registered_model_alias(MODEL, "stable", "1")
        port = free_port()
        env = {**cluster.env, "STRATA_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
        deploy = [
            sys.executable, "jobs/deploy.py", "--model", MODEL, "--split", "stable=100", "--address", cluster.address,
            "--port", str(port), "--num-cpus", "0.25", "--resources", '{"serve_gpu": 1}', "--no-resource-check",
            "--wait-timeout", "120",
        ]  # fmt: skip
        deployed = subprocess.run(
            deploy, cwd=ROOT, env={**env, "STRATA_API_KEYS": KEY}, capture_output=True, text=True, timeout=300
        )
        assert deployed.returncode == 0, deployed.stderr[-4000:]
        nodes = cluster.node_types(include_dead=True)
        replicas, routers = (cluster.actor_nodes(f"ServeReplica:strata:{d}") for d in ("model-stable", "Router"))
        assert replicas and {nodes[n] for n in replicas} == {"serve-gpu"}, (replicas, nodes)
        assert routers and {nodes[n] for n in routers} == {"cpu-driver"}, (routers, nodes)  # CPU only there
        body = {"model": MODEL, "prompt": "def main(", "max_tokens": 4, "temperature": 0}
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert response.status_code == 200, response.text
    finally:
        if prometheus:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        cluster.shutdown()
    # The fake nodes ran in the head's process group: none of the cluster's processes is left.
    wait_until(lambda: not cluster.owned_processes(), "every process of the cluster gone", timeout=10)
