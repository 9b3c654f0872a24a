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

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadExited(RuntimeError):
    """`ray start --head` ended before its dashboard answered."""


class LocalCluster:
    """A head (token auth on) plus worker nodes, each `ray start --block` in its own process group, so that
    killing one node's group is losing that node, and `shutdown()` stops exactly what we started."""

    def __init__(self, head_cpus: int = 2, env: dict[str, str] | None = None):
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

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        # Each node's dashboard agent gets its own port: the default (52365) may belong to another Ray here,
        # and a head without its agent refuses job submissions ("No available agent").
        log = (self.temp_dir / f"{name}.log").open("w")  # why a node failed to start, for the assertion
        self.processes[name] = subprocess.Popen(
            [RAY, "start", "--block", f"--dashboard-agent-listen-port={free_port()}", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def add_node(self, name: str, cpus: int, resources: dict[str, float]) -> None:
        before = self.alive_nodes()
        self._start(
            name,
            [
                f"--address={self.address}",
                f"--num-cpus={cpus}",
                f"--resources={json.dumps(resources)}",
                f"--node-name={name}",
            ],
        )
        deadline = time.time() + 60
        while self.alive_nodes() <= before:
            assert time.time() < deadline, f"node {name} did not join"
            time.sleep(0.5)

    def nodes(self) -> list[dict]:
        """`ray.nodes()` as a driver of this cluster sees it (in a subprocess: this process may run its own Ray)."""
        script = "import json, ray; ray.init(address='%s', logging_level='ERROR'); print(json.dumps(ray.nodes()))"
        out = subprocess.run(
            [sys.executable, "-c", script % self.address], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return [n for n in json.loads(out.stdout.strip().splitlines()[-1]) if n["Alive"]]

    def alive_nodes(self) -> int:
        return len(self.nodes())

    def node_id(self, name: str) -> str:
        ids = [n["NodeID"] for n in self.nodes() if n.get("NodeName") == name]
        assert len(ids) == 1, f"no single live node named {name}"
        return ids[0]

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's whole process group: what a reclaimed spot instance looks like to Ray."""
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes.pop(name).wait()

    def _wait_for_dashboard(self) -> None:
        deadline = time.time() + 90
        while True:
            try:
                request = urllib.request.Request(
                    f"{self.dashboard_url}/api/version",
                    headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"},
                )
                urllib.request.urlopen(request, timeout=2)
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
    cluster: LocalCluster, node_name: str, metadata_url: str, platform_dir: Path
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "strata.cli", "spot-watch", "--address", cluster.address, "--node-name", node_name,
         "--metadata-url", metadata_url, "--poll-interval", "0.2"],
        env={**cluster.env, "PYTHONPATH": str(platform_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
