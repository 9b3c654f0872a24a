"""A multi-node Ray cluster on this machine for tests: `ray start` processes we own and alone stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

RAY = str(Path(sys.executable).parent / "ray")
NODE_GROUP_LABEL = "ray.io/node-group"  # Ray's label for a node's type (ray._raylet.RAY_NODE_GROUP_KEY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadExited(RuntimeError):
    """`ray start --head` ended before its dashboard answered."""


class LocalCluster:
    """A head (token auth on) plus worker nodes, each `ray start --block` in its own process group, so that
    killing one node's group is losing that node, and `shutdown()` stops exactly what we started."""

    def __init__(self, head_cpus: int = 2, env: dict[str, str] | None = None, autoscaling: dict | None = None):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="strata-ray-", dir="/tmp"))  # short: unix socket paths
        self.env = {
            **os.environ,
            # The cluster's Python has the dependencies, as a cluster image would; `strata` is shipped by jobs.
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": uuid.uuid4().hex,
            **(env or {}),
        }
        # Not this process's: `mlflow.set_tracking_uri` (and `set_registry_uri`) export these; jobs use their own.
        for inherited in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            self.env.pop(inherited, None)
        self.processes: dict[str, subprocess.Popen] = {}
        # A port picked free can be taken again before Ray binds it; a head that dies at start gets one more try.
        for attempt in range(2):
            self.port, self.dashboard_port = free_port(), free_port()
            self._start(
                "head",
                [
                    *self._autoscaling_args(autoscaling),
                    "--head",
                    f"--port={self.port}",
                    f"--dashboard-port={self.dashboard_port}",
                    "--dashboard-host=127.0.0.1",
                    f"--num-cpus={head_cpus}",
                    f"--temp-dir={self.temp_dir}",
                    "--include-dashboard=true",
                    f"--ray-client-server-port={free_port()}",  # not the default 10001, which another Ray may hold
                ],
            )
            try:
                self._wait_for_dashboard()
                return
            except HeadExited as err:
                if attempt:
                    raise AssertionError(str(err)) from None
                print(f"retrying the head start once: {err}", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.processes.pop("head").pid, signal.SIGKILL)

    def _autoscaling_args(self, autoscaling: dict | None) -> list[str]:
        """The head's autoscaler runs with `autoscaling` (a cluster config), told where this head's GCS listens."""
        if autoscaling is None:
            return []
        config = {**autoscaling, "provider": {**autoscaling["provider"], "gcs_address": self.address}}
        path = self.temp_dir / "autoscaling.yaml"
        path.write_text(json.dumps(config))
        return [f"--autoscaling-config={path}"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        # Each node's dashboard agent gets its own port: the default (52365) may belong to another Ray here,
        # and a head without its agent refuses job submissions ("No available agent").
        log = (self.temp_dir / f"{name}.log").open("w")  # why a node failed to start, for the assertion
        self.processes[name] = subprocess.Popen(
            [RAY, "start", "--block", f"--dashboard-agent-listen-port={free_port()}", *args],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def add_node(self, name: str, cpus: int, resources: dict[str, float], env: dict[str, str] | None = None) -> None:
        """A worker node; `env` is added to the cluster's for this node's processes (its raylet and workers)."""
        before = self.alive_nodes()
        self._start(
            name,
            [
                f"--address={self.address}",
                f"--num-cpus={cpus}",
                f"--resources={json.dumps(resources)}",
                f"--node-name={name}",
            ],
            env,
        )
        deadline = time.time() + 60
        while self.alive_nodes() <= before:
            assert time.time() < deadline, f"node {name} did not join"
            time.sleep(0.5)

    def nodes(self, include_dead: bool = False) -> list[dict]:
        """`ray.nodes()` as a driver of this cluster sees it (in a subprocess: this process may run its own Ray)."""
        script = "import json, ray; ray.init(address='%s', logging_level='ERROR'); print(json.dumps(ray.nodes()))"
        out = subprocess.run(
            [sys.executable, "-c", script % self.address], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr[-2000:]
        # Ray may log to stdout too (e.g. while a node of the fake autoscaler is starting): the list is its own line.
        listing = next(line for line in out.stdout.splitlines()[::-1] if line.startswith("[{"))
        return [n for n in json.loads(listing) if n["Alive"] or include_dead]

    def api(self, path: str, timeout: float = 30) -> dict:
        """GET from the dashboard's REST API (jobs, the state API), with this cluster's token."""
        request = urllib.request.Request(
            self.dashboard_url + path, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def actor_nodes(self, class_name: str) -> list[str]:
        """The node of every actor of `class_name`, dead ones included (Ray's state API)."""
        query = f"filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}&detail=true&limit=1000"
        return [a["node_id"] for a in self.api(f"/api/v0/actors?{query}")["data"]["result"]["result"]]

    def alive_nodes(self) -> int:
        return len(self.nodes())

    def node_id(self, name: str) -> str:
        ids = [n["NodeID"] for n in self.nodes() if n.get("NodeName") == name]
        assert len(ids) == 1, f"no single live node named {name}"
        return ids[0]

    def owned_processes(self) -> list[psutil.Process]:
        """Every process of this cluster, whoever started it (the head, its autoscaler's nodes, their workers): they
        all inherit this cluster's auth token."""
        owned = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("RAY_AUTH_TOKEN") == self.env["RAY_AUTH_TOKEN"]:
                    owned.append(process)
        return owned

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's whole process group: what a reclaimed spot instance looks like to Ray."""
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes.pop(name).wait()

    def _wait_for_dashboard(self) -> None:
        deadline = time.time() + 90
        while True:
            try:
                self.api("/api/version", timeout=2)
                return
            except Exception:
                if self.processes["head"].poll() is not None:
                    output = (self.temp_dir / "head.log").read_text()[-3000:]
                    raise HeadExited(f"ray start --head exited early:\n{output}") from None
                assert time.time() < deadline, "the head node did not come up in 90 s"
                time.sleep(1)

    def shutdown(self) -> None:
        """SIGTERM each node's group, SIGKILL what is left after 5 s: a head's graceful stop takes 30 s or more,
        spent waiting on its own children, and every process of the group goes either way."""
        for name in list(self.processes)[::-1]:
            try:
                os.killpg(self.processes[name].pid, signal.SIGTERM)
                self.processes[name].wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.processes[name].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class FakeMetadataService:
    """EC2's instance metadata service on 127.0.0.1: IMDSv2 tokens, and a spot notice once armed."""

    def __init__(self):
        service = self
        self.notice: dict | None = None
        self.token = "imds-token"

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                assert self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
                self._send(200, service.token.encode())

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != service.token:
                    return self._send(401, b"")
                if self.path != "/latest/meta-data/spot/instance-action" or service.notice is None:
                    return self._send(404, b"")
                self._send(200, json.dumps(service.notice).encode())

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def arm(self, seconds_left: int) -> None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_left))
        self.notice = {"action": "terminate", "time": when}


def start_job(cluster: LocalCluster, script: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A driver (jobs/*.py) connected to the cluster, as `ray job submit` would run it."""
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env={**cluster.env, **env, "RAY_ADDRESS": cluster.address},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start_spot_watcher(
    cluster: LocalCluster, node_name: str | None, metadata_url: str, platform_dir: Path, node_id: str | None = None
) -> subprocess.Popen:
    """`strata spot-watch` for the node named `node_name`, or with id `node_id` (the fake autoscaler's nodes all
    share one name: this machine's address)."""
    node = ["--node-id", node_id] if node_id else ["--node-name", node_name]
    return subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "spot-watch", "--address", cluster.address, *node,
         "--metadata-url", metadata_url, "--poll-interval", "0.2"],
        env={**cluster.env, "PYTHONPATH": str(platform_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def fake_autoscaling_config(cluster_yaml: Path, idle_timeout_minutes: float = 0.1) -> dict:
    """`cluster_yaml`'s worker node types for Ray's fake multi-node provider (nodes are local raylets): the same
    names, custom resources and min/max workers; CPUs capped at this machine's cores, no GPU (the fake nodes have
    none; `train_gpu`/`serve_gpu` stand for them), a CPU-0 head, and a short idle timeout."""
    aws = yaml.safe_load(cluster_yaml.read_text())
    cores = os.cpu_count() or 1
    types = {FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, node_type in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        resources = {k: v for k, v in node_type["resources"].items() if k not in ("CPU", "GPU", "memory")}
        types[name] = {
            "resources": {"CPU": min(node_type["resources"]["CPU"], cores), **resources},
            "labels": {NODE_GROUP_LABEL: name},
            "node_config": {},
            "min_workers": node_type.get("min_workers", 0),
            "max_workers": node_type["max_workers"],
        }
    return {
        "cluster_name": aws["cluster_name"],
        "max_workers": aws["max_workers"],
        "upscaling_speed": aws["upscaling_speed"],
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "use_node_id_as_ip": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": types,
        # Nothing to sync or run on a local raylet, but the autoscaler reads each of these keys.
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{key: [] for key in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
    }


class FakeAutoscalingCluster(LocalCluster):
    """A head whose autoscaler launches and removes nodes of `cluster_yaml`'s types as local raylets (Ray's fake
    multi-node provider). The autoscaler runs in the head's process group and so do the nodes it starts: killing
    that group (`shutdown`) stops them all."""

    def __init__(self, cluster_yaml: Path, env: dict[str, str] | None = None):
        env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})}
        # The autoscaler's metrics server: its own port, not 44217, which another Ray head here may hold.
        env.setdefault("AUTOSCALER_METRIC_PORT", str(free_port()))
        super().__init__(head_cpus=0, env=env, autoscaling=fake_autoscaling_config(cluster_yaml))

    def node_types(self, include_dead: bool = False) -> dict[str, str]:
        """Node id -> the type the autoscaler launched it as (it labels each node); the head is "head"."""
        return {n["NodeID"]: n["Labels"].get(NODE_GROUP_LABEL, "head") for n in self.nodes(include_dead)}

    def node_ids(self, node_type: str) -> set[str]:
        return {node for node, launched_as in self.node_types().items() if launched_as == node_type}

    def reclaim(self, node_id: str) -> None:
        """SIGKILL every process of a node the autoscaler launched, as a reclaimed spot instance: the provider gave
        each of them the node's id in its environment. The autoscaler then stops hearing from the node, terminates
        it (AUTOSCALER_HEARTBEAT_TIMEOUT_S) and launches a replacement if there is demand."""
        killed = 0
        for process in self.owned_processes():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                    process.kill()
                    killed += 1
        assert killed, f"no process of node {node_id}"
