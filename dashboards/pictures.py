"""Pictures of the dashboards, plotted from a live Prometheus's query API: every panel of a dashboard as one small
chart, in the panel's order, for the README.

`make dashboard-pictures` regenerates them: it runs the live dashboards test (a real Prometheus scraping a local
Ray that trains, fine-tunes and serves an A/B application under traffic, with a canary), which calls `render` at
its end when $STRATA_DASHBOARD_PICTURES names a directory.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.dates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

GRAFANA = Path(__file__).resolve().parent / "grafana"


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as response:
        return json.loads(response.read())["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's `{{label}}` legend format, filled in."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or "value"


def render(dashboard: str, prometheus_url: str, start: float, end: float, out_dir: Path) -> Path:
    """`out_dir/DASHBOARD.png`: each panel of `grafana/DASHBOARD.json` over [start, end]."""
    spec = json.loads((GRAFANA / f"{dashboard}.json").read_text())
    panels = [p for p in spec["panels"] if "Has data only with" not in p.get("description", "")]
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 2.8 * rows), squeeze=False)
    step = max(2.0, (end - start) / 200)
    for ax, panel in zip(axes.flat, panels, strict=False):
        target = panel["targets"][0]
        for series in query_range(prometheus_url, target["expr"], start, end, step):
            times = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            ax.plot(times, values, label=legend(target.get("legendFormat", ""), series["metric"]), linewidth=1.2)
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M"))
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.suptitle(f"{spec['title']} (from a live Prometheus, {datetime.fromtimestamp(end):%Y-%m-%d %H:%M})")
    figure.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{dashboard}.png"
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out
