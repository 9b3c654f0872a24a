"""Builds the Grafana dashboards in `dashboards/grafana/` from the panel lists below: `python dashboards/build.py`.

Each panel is a title, a PromQL query and a unit; the JSON checked in is exactly what this writes (a test holds
them equal) and what Grafana provisions. Metric names are Prometheus' as Ray exports them: a Strata metric
`strata_x` becomes `ray_strata_x` (counters end in `_total`, histograms in `_bucket`). A panel marked
`needs="gpu"` or `needs="autoscaler"` only has data on GPU nodes or on a cluster the autoscaler runs.

Ray's own dashboards (cluster, Serve, Train, Data) are not copied: Ray writes them into
`/tmp/ray/session_latest/metrics/grafana/dashboards/`, and each Strata dashboard links to them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Panel:
    title: str
    expr: str  # one PromQL query; `legend` names its series
    unit: str = "short"
    legend: str = ""
    needs: str | None = None  # "gpu" or "autoscaler": no data without them


def quantile(q: float, histogram: str, by: str = "variant") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({histogram}_bucket[5m])))"


# 5xx responses over all responses, per variant; 0 (not "no data") while a variant has served no 5xx.
ERROR_RATE = (
    '(sum by (variant) (rate(ray_strata_router_errors_total{status=~"5.."}[5m])) '
    "or 0 * sum by (variant) (rate(ray_strata_router_requests_total[5m]))) "
    "/ sum by (variant) (rate(ray_strata_router_requests_total[5m]))"
)

SERVING = [
    Panel(
        "Requests per second by variant",
        "sum by (variant) (rate(ray_strata_router_requests_total[1m]))",
        "reqps",
        "{{variant}}",
    ),
    Panel(
        "Errors per second by variant and status",
        "sum by (variant, status) (rate(ray_strata_router_errors_total[1m]))",
        "reqps",
        "{{variant}} {{status}}",
    ),
    Panel(
        "Error rate by variant (5xx)",
        ERROR_RATE,
        "percentunit",
        "{{variant}}",
    ),
    Panel("Latency p50", quantile(0.5, "ray_strata_router_request_latency_seconds"), "s", "{{variant}}"),
    Panel("Latency p95", quantile(0.95, "ray_strata_router_request_latency_seconds"), "s", "{{variant}}"),
    Panel("Latency p99", quantile(0.99, "ray_strata_router_request_latency_seconds"), "s", "{{variant}}"),
    Panel(
        "Time to first token p50 (router)",
        quantile(0.5, "ray_strata_router_time_to_first_token_seconds"),
        "s",
        "{{variant}}",
    ),
    Panel(
        "Time to first token p99 (replica)",
        quantile(0.99, "ray_strata_serve_time_to_first_token_seconds"),
        "s",
        "{{variant}}",
    ),
    Panel(
        "Time per output token p50", quantile(0.5, "ray_strata_serve_time_per_output_token_seconds"), "s", "{{variant}}"
    ),
    Panel(
        "Generated tokens per second",
        "sum by (variant) (rate(ray_strata_router_generated_tokens_total[1m]))",
        "short",
        "{{variant}}",
    ),
    Panel(
        "Tokens per second per replica",
        "sum by (variant, replica) (rate(ray_strata_serve_generated_tokens_total[1m]))",
        "short",
        "{{variant}} {{replica}}",
    ),
    Panel("Batch size", "avg by (variant) (ray_strata_serve_batch_size)", "short", "{{variant}}"),
    Panel("Queue length", "sum by (variant) (ray_strata_serve_queue_length)", "short", "{{variant}}"),
    Panel("KV cache in use (tokens)", "sum by (variant) (ray_strata_serve_kv_cache_tokens)", "short", "{{variant}}"),
    # Failed metric exports and hooks: counted and logged, never failing a request.
    Panel(
        "Observability errors (5m)",
        "sum by (variant) (increase(ray_strata_serve_observability_errors_total[5m])) or vector(0)",
        "short",
        "{{variant}}",
    ),
    Panel(
        "Finished requests by reason",
        "sum by (variant, finish_reason) (rate(ray_strata_serve_requests_total[5m]))",
        "reqps",
        "{{variant}} {{finish_reason}}",
    ),
    Panel("Healthy replicas", "sum by (deployment) (ray_serve_deployment_replica_healthy)", "short", "{{deployment}}"),
    Panel(
        "Replica starts (15m)",
        "sum by (deployment) (increase(ray_serve_deployment_replica_starts_total[15m]))",
        "short",
        "{{deployment}}",
    ),
    Panel("Split weights", "max by (variant) (ray_strata_router_split_weight)", "percentunit", "{{variant}}"),
]

TRAINING = [
    Panel("Loss", "max by (run) (ray_strata_train_loss)", "short", "{{run}}"),
    Panel("Eval loss", "max by (run) (ray_strata_train_eval_loss)", "short", "{{run}}"),
    Panel("Step", "max by (run) (ray_strata_train_step)", "short", "{{run}}"),
    Panel("Tokens per second", "max by (run) (ray_strata_train_tokens_per_second)", "short", "{{run}}"),
    Panel(
        "MFU (model FLOPs utilisation)", "max by (run) (ray_strata_train_mfu)", "percentunit", "{{run}}", needs="gpu"
    ),
    Panel(
        "Checkpoint age", "time() - max by (run) (ray_strata_train_last_checkpoint_timestamp_seconds)", "s", "{{run}}"
    ),
    Panel("Seconds between checkpoints", "max by (run) (ray_strata_train_checkpoint_interval_seconds)", "s", "{{run}}"),
    Panel("Preemptions", "max by (run) (ray_strata_train_preemptions)", "short", "{{run}}"),
    Panel("Restarts from a checkpoint (1h)", "sum(increase(ray_strata_train_restarts_total[1h]))", "short", "restarts"),
    # The counter appears with the first step lost; until then the panel shows 0, not "no data".
    Panel("Steps lost to restarts (1h)", "sum(increase(ray_strata_train_steps_lost_total[1h])) or vector(0)"),
    Panel("Seconds to resume", "max(ray_strata_train_resume_seconds)", "s", "last resume"),
    Panel(
        "Time since the last report",
        "time() - max by (run) (ray_strata_train_last_report_timestamp_seconds)",
        "s",
        "{{run}}",
    ),
]

MOE = [
    Panel(
        "Training: expert imbalance (max/mean tokens per expert)",
        "max by (run) (ray_strata_train_expert_imbalance)",
        "short",
        "{{run}}",
    ),
    Panel("Training: router entropy (nats)", "max by (run) (ray_strata_train_router_entropy)", "short", "{{run}}"),
    Panel(
        "Serving: tokens per expert",
        "sum by (layer, expert) (rate(ray_strata_serve_expert_tokens_total[5m]))",
        "short",
        "layer {{layer}} expert {{expert}}",
    ),
    Panel(
        "Serving: expert imbalance per layer (max/mean)",
        "max by (layer) (sum by (layer, expert) (rate(ray_strata_serve_expert_tokens_total[5m]))) / "
        "avg by (layer) (sum by (layer, expert) (rate(ray_strata_serve_expert_tokens_total[5m])))",
        "short",
        "layer {{layer}}",
    ),
]

CLUSTER = [
    Panel("CPU utilisation by node", "avg by (instance) (ray_node_cpu_utilization)", "percent", "{{instance}}"),
    Panel("Memory used by node", "sum by (instance) (ray_node_mem_used)", "bytes", "{{instance}}"),
    Panel(
        "GPU utilisation",
        "avg by (instance, GpuIndex) (ray_node_gpus_utilization)",
        "percent",
        "{{instance}} gpu {{GpuIndex}}",
        needs="gpu",
    ),
    Panel(
        "GPU memory used",
        "sum by (instance) (ray_node_gram_used) / (sum by (instance) (ray_node_gram_used) + "
        "sum by (instance) (ray_node_gram_available))",
        "percentunit",
        "{{instance}}",
        needs="gpu",
    ),
    Panel("Nodes by group", "sum by (NodeType) (autoscaler_active_nodes)", "short", "{{NodeType}}", needs="autoscaler"),
    Panel(
        "Pending nodes by group",
        "sum by (NodeType) (autoscaler_pending_nodes)",
        "short",
        "{{NodeType}}",
        needs="autoscaler",
    ),
    Panel(
        "Pending resource demand",
        "sum by (resource) (autoscaler_pending_resources)",
        "short",
        "{{resource}}",
        needs="autoscaler",
    ),
]

# A canary's own state, and the candidate against stable on the numbers it is gated on (`strata canary`).
RELEASES = [
    Panel("Canary state", "max by (app, state) (ray_strata_canary_state) > 0", "short", "{{app}}: {{state}}"),
    Panel("Traffic to the candidate", "max by (app) (ray_strata_canary_weight)", "percent", "{{app}}"),
    # Cumulative, not increase(): a transition's series appears at 1, which increase() cannot see.
    Panel(
        "Canary transitions (since the exporter started)",
        "sum by (app, to) (ray_strata_canary_transitions_total)",
        "short",
        "{{app}} -> {{to}}",
    ),
    Panel("Error rate, candidate vs stable (5xx)", ERROR_RATE, "percentunit", "{{variant}}"),
    Panel(
        "Latency p99, candidate vs stable",
        quantile(0.99, "ray_strata_router_request_latency_seconds"),
        "s",
        "{{variant}}",
    ),
    Panel(
        "TTFT p99, candidate vs stable",
        quantile(0.99, "ray_strata_router_time_to_first_token_seconds"),
        "s",
        "{{variant}}",
    ),
]

# Grafana marks each canary transition (a promotion, a rollback) on the releases dashboard's time axis.
RELEASE_ANNOTATIONS = [
    {
        "name": "Canary transitions",
        "datasource": DATASOURCE,
        "enable": True,
        "iconColor": "orange",
        # The one-hot state gauge turning 1: every series exists from the canary's first update, so changes() sees
        # each later transition (a counter's first increment would be invisible to increase()).
        "expr": "(max by (app, state) (changes(ray_strata_canary_state[1m])) > 0) "
        "and max by (app, state) (ray_strata_canary_state) == 1",
        "titleFormat": "canary {{app}} -> {{state}}",
        "tagKeys": "app,state",
        "step": "30s",
    }
]

DASHBOARDS = {
    "strata-serving": ("Strata: serving and A/B", SERVING),
    "strata-training": ("Strata: training and fine-tuning", TRAINING),
    "strata-moe": ("Strata: mixture of experts", MOE),
    "strata-cluster": ("Strata: cluster", CLUSTER),
    "strata-releases": ("Strata: releases and canaries", RELEASES),
}
ANNOTATIONS = {"strata-releases": RELEASE_ANNOTATIONS}


def panel_json(panel: Panel, index: int) -> dict:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [{"refId": "A", "datasource": DATASOURCE, "expr": panel.expr, "legendFormat": panel.legend}],
        **({"description": f"Has data only with: {panel.needs}."} if panel.needs else {}),
    }


def dashboard_json(uid: str, title: str, panels: list[Panel]) -> dict:
    return {
        **({"annotations": {"list": ANNOTATIONS[uid]}} if uid in ANNOTATIONS else {}),
        "uid": uid,
        "title": title,
        "tags": ["strata"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
        },
        "links": [
            {"title": "Strata dashboards", "type": "dashboards", "tags": ["strata"], "asDropdown": True},
            {"title": "Ray's dashboards", "type": "dashboards", "tags": ["rayVersion"], "asDropdown": True},
        ],
        "panels": [panel_json(p, i) for i, p in enumerate(panels)],
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{uid}.json": json.dumps(dashboard_json(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}", file=sys.stderr)
