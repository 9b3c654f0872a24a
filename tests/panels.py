"""What the dashboards ask of Prometheus: every panel's and alert's query, and a range query against a live server.
Shared by the live dashboards test and the fake autoscaling cluster's test (the autoscaler panels)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
# Metrics that only some clusters export: a panel marked "only with: X" is checked where X runs.
NEEDS = {
    "gpu": "GPU nodes (tests/test_gpu.py's machines; none here)",
    "autoscaler": "an autoscaler (tests/test_fake_cluster.py)",
}


def queries() -> list[tuple[str, str, str | None]]:
    """(dashboard/panel title, PromQL, what it needs) for every panel, and (alert, PromQL, None) for every alert."""
    found = []
    for path in sorted((DASHBOARDS / "grafana").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            needs = next((n for n in NEEDS if f"only with: {n}" in panel.get("description", "")), None)
            found += [(f"{path.stem}/{panel['title']}", t["expr"], needs) for t in panel["targets"]]
    for group in yaml.safe_load((DASHBOARDS / "alerts.yml").read_text())["groups"]:
        found += [(f"alert {r['alert']}", r["expr"], None) for r in group["rules"]]
    return found


def query_range(url: str, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 2})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]
