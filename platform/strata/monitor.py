"""`strata monitor`: a local Prometheus over the local Ray, with Strata's alert rules, for a laptop or a head node.

It scrapes what Ray's service-discovery file lists (every node's metrics agent) and evaluates `dashboards/alerts.yml`;
the Grafana dashboards in `dashboards/grafana/` read from it. Prometheus is Debian's `prometheus` package
(`apt-get install prometheus`); nothing else is needed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import yaml

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"  # the checkout's dashboards/
DISCOVERY_FILE = "prom_metrics_service_discovery.json"


def ray_discovery_file(ray_temp_dir: str | Path = "/tmp/ray") -> Path:
    """Where the Ray head writes the list of metrics endpoints (under its temp dir, `/tmp/ray` by default)."""
    return Path(ray_temp_dir) / DISCOVERY_FILE


def write_config(directory: Path, discovery_file: Path, scrape_interval_s: float = 5) -> Path:
    """`dashboards/prometheus.yml`, pointed at this Ray's discovery file and the checkout's alert rules."""
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": f"{scrape_interval_s:g}s"}
    config["rule_files"] = [str(DASHBOARDS / "alerts.yml")]
    config["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(discovery_file)], "refresh_interval": "5s"}]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(directory: Path, discovery_file: Path, port: int = 9090, scrape_interval_s: float = 5):
    """Start Prometheus (its data under `directory`) and return the process once it answers."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not installed: `apt-get install prometheus` (Debian, Ubuntu)")
    config = write_config(directory, discovery_file, scrape_interval_s)
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(f"http://127.0.0.1:{port}", process, directory / "prometheus.log")
    return process


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"prometheus did not answer at {url} within {timeout_s:.0f}s")
