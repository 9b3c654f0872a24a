"""Where a canary's numbers come from, per variant since a step began: the application's own windows, or
Prometheus over the router's exported metrics."""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request
from typing import Any, Protocol

import ray

from strata.config.canary import CanaryConfig
from strata.serve import windows


class MetricsSource(Protocol):
    def summary(self, since: float) -> dict[str, dict[str, Any]]:
        """Per variant, since `since` (time.time()): requests, errors, error_rate, p99_ms, ttft_p99_ms."""


class RouterWindows:
    """The application's own per-variant windows (`strata.serve.windows`): works with nothing else running."""

    def __init__(self, app: str):
        self.store = windows.windows_actor(app)

    def summary(self, since: float) -> dict[str, dict[str, Any]]:
        return ray.get(self.store.summary.remote(since))


class PrometheusMetrics:
    """The same numbers from Prometheus, over the router's exported metrics: for clusters that run one. Latency
    quantiles are estimated from histogram buckets, as every Prometheus dashboard does."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url.rstrip("/"), model

    def _query(self, expr: str) -> dict[str, float]:
        query = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=10) as response:
            body = json.loads(response.read())
        values = ((r["metric"].get("variant", ""), float(r["value"][1])) for r in body["data"]["result"])
        return {v: x for v, x in values if not math.isnan(x)}  # NaN: a quantile with no observations, so no data

    def summary(self, since: float) -> dict[str, dict[str, Any]]:
        window = f"{max(1, round(time.time() - since))}s"
        selector = f'model="{self.model}"'

        def increase(metric: str, extra: str = "") -> str:
            return f"sum by (variant) (increase(ray_strata_router_{metric}{{{selector}{extra}}}[{window}]))"

        def p99(histogram: str) -> str:
            rate = f"rate(ray_strata_router_{histogram}_bucket{{{selector}}}[{window}])"
            return f"histogram_quantile(0.99, sum by (le, variant) ({rate}))"

        requests, errors = (self._query(increase(*a)) for a in (["requests_total"], ["errors_total", ',status=~"5.."']))
        latency, ttft = (self._query(p99(h)) for h in ("request_latency_seconds", "time_to_first_token_seconds"))
        return {
            variant: {
                "requests": round(count),
                "errors": round(errors.get(variant, 0)),
                "error_rate": errors.get(variant, 0) / count if count else 0.0,
                "p99_ms": latency[variant] * 1000 if variant in latency else None,
                "ttft_p99_ms": ttft[variant] * 1000 if variant in ttft else None,
            }
            for variant, count in requests.items()
        }


def metrics_source(cfg: CanaryConfig) -> MetricsSource:
    if cfg.metrics == "prometheus":
        return PrometheusMetrics(cfg.prometheus_url, cfg.model)
    return RouterWindows(cfg.app)
