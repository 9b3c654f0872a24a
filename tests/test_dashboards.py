"""Dashboards and alerts, with the real tools: promtool checks and unit-tests every rule; a real Prometheus scrapes a
live local Ray running a training job (with a real worker kill) and an A/B application under traffic, and every
dashboard panel's query must return data from it. Every metric the code exports must be on a panel or in an alert.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from panels import DASHBOARDS, queries, query_range
from raycluster import free_port

ROOT = Path(__file__).resolve().parents[1]


def load_builder(name: str = "build"):
    """`dashboards/NAME.py` (not a package: the directory holds what monitoring provisions)."""
    spec = importlib.util.spec_from_file_location(f"dashboards_{name}", DASHBOARDS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_promtool_accepts_the_config_and_rules_and_every_alert_fires_in_its_unit_test(promtool):
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        done = subprocess.run([promtool, *args], cwd=DASHBOARDS, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    rules = [r for g in yaml.safe_load((DASHBOARDS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load((DASHBOARDS / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    for rule in rules:
        assert rule["alert"] in fired, f"{rule['alert']} is never tested firing"
        assert {"summary", "runbook"} <= set(rule["annotations"]) and rule["labels"]["severity"], rule["alert"]


def test_checked_in_dashboards_are_what_the_builder_writes():
    rendered = load_builder().render()
    assert sorted(rendered) == sorted(p.name for p in (DASHBOARDS / "grafana").glob("*.json"))
    for name, text in rendered.items():
        assert (DASHBOARDS / "grafana" / name).read_text() == text, f"run `python dashboards/build.py` ({name})"


def exported_metrics() -> set[str]:
    """Every metric name the code exports, read from the code: `Counter/Gauge/Histogram("strata_...")` calls and
    the training callback's gauge table, as Prometheus names them (`ray_` prefix, `_total` on counters)."""
    names = set()
    for path in (ROOT / "platform" / "strata").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"Counter", "Gauge", "Histogram"}):
                continue
            if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("strata_"):
                suffix = "_total" if node.func.id == "Counter" else ""
                names.add(f"ray_{node.args[0].value}{suffix}")
    from strata.train.callbacks import PrometheusMetricsCallback

    names |= {f"ray_{name}" for name in PrometheusMetricsCallback.GAUGES.values()}
    return names


def test_every_exported_metric_is_on_a_panel_or_in_an_alert():
    text = "\n".join(expr for _, expr, _ in queries())
    unused = sorted(name for name in exported_metrics() if name not in text)
    assert not unused, f"exported but on no panel and in no alert: {unused}"


def tmp_records(path: Path) -> Path:
    records = [{"prompt": f"Write function number {i}", "response": f"def f{i}():\n    return {i}"} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.slow
def test_every_panel_has_data_from_a_live_training_job_and_served_ab_traffic(
    ray_session, promtool, small_data, tiny_base, strata_home
):
    import mlflow
    import ray
    from ray import serve

    from strata import monitor, registry, tracking
    from strata.config import FinetuneConfig, PretrainConfig, ServeConfig
    from strata.config.canary import CanaryConfig
    from strata.release import canary
    from strata.serve import deploy, traffic
    from strata.train.faults import WorkerKiller
    from strata.train.finetune import run_finetuning
    from strata.train.pretrain import run_pretraining

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    discovery = monitor.ray_discovery_file(session_dir.parent)
    prometheus_port = free_port()
    prometheus = monitor.start_prometheus(strata_home / "prometheus", discovery, prometheus_port, 1)
    url = f"http://127.0.0.1:{prometheus_port}"
    started = time.time()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        uri = tracking.use_store()
        with tracking.start_run("dashboards-test", "versions", {}, tags={"base_model": "tiny"}):
            mlflow.set_tag("strata.dataset_hash", "sha256:test")
            versions = [registry.log_model(tiny_base, "dash").version for _ in range(2)]
        variants = [
            {"name": name, "model": f"models:/dash/{v}", "num_cpus": 0.25, "engine": {"max_batch_size": 8}}
            for name, v in zip(("stable", "fast"), versions, strict=True)
        ]
        config = ServeConfig(
            model_name="dash",
            variants=variants,
            weights={"stable": 70, "fast": 30},
            tracking_uri=uri,
            auth={"allow_anonymous": True, "requests_per_minute": 1_000_000, "burst": 10_000},
            audit={"path": str(strata_home / "audit.jsonl")},
            router_num_cpus=0,
        )
        dashboard = "http://" + ray._private.worker.get_dashboard_url()
        deploy.deploy(dashboard, {"applications": [deploy.application(config, "dash", "/dash")]})
        deploy.wait_until_running(dashboard, "dash")
        base_url = f"http://127.0.0.1:{port}/dash/v1"
        samples = traffic.send(base_url, "anonymous", "dash", requests=40, concurrency=4)
        assert all(s.status == 200 for s in samples)
        bad = urllib.request.Request(f"{base_url}/completions", data=b'{"model": "nope", "prompt": "x"}', method="POST")
        with pytest.raises(urllib.error.HTTPError):  # an error series for the error panels
            urllib.request.urlopen(bad, timeout=30)

        # A canary judged by this Prometheus (the cluster's metrics provider): the releases dashboard's data.
        canary_cfg = CanaryConfig(
            model="dash",
            app="dash",
            steps=[50, 100],
            bake_s=3,
            min_requests=4,
            interval_s=1,
            metrics="prometheus",
            prometheus_url=url,
            thresholds={"max_p99_latency_ms": 60_000, "max_p99_latency_ratio": 10, "max_ttft_ratio": 10},
            promote=False,
        )
        with traffic.BackgroundTraffic(base_url, "anonymous", "dash", clients=2) as background:
            status = canary.run_canary(canary_cfg)
        assert status.state == canary.SUCCEEDED, status.reason
        assert status.steps[-1]["fast"]["requests"] >= 4, status.steps  # Prometheus saw the candidate's requests
        assert not background.failures()

        data_cfg, _ = small_data
        cfg = PretrainConfig.model_validate(
            {
                "run_name": "dashboards-test",
                "data": data_cfg.model_dump(),
                "optim": {"warmup_steps": 2, "max_steps": 20, "micro_batch_size": 4, "global_batch_size": 8},
                "checkpoint": {"every_steps": 5, "keep_last": 2},
                "scaling": {"num_workers": 1},  # beside the two 0.25-CPU replicas on 2 CPUs
                "tracking": {"experiment": "dashboards-test", "registered_model": None, "log_every_steps": 5},
            }
        )
        records = tmp_records(strata_home / "pairs.jsonl")
        run_finetuning(  # eval loss comes from fine-tuning
            FinetuneConfig.model_validate(
                {
                    "base_model": str(tiny_base),
                    "data": {"train_file": str(records), "max_seq_len": 64},
                    "optim": {"warmup_steps": 1, "max_steps": 10, "micro_batch_size": 4, "global_batch_size": 8},
                    "checkpoint": {"every_steps": 5},
                    "scaling": {"num_workers": 1},
                    "tracking": {"experiment": "dashboards-test-ft", "log_every_steps": 5},
                }
            )
        )
        killer = WorkerKiller(
            Path(cfg.checkpoint.resolved_storage_path) / cfg.run_name, after_step=5, delay_s=0
        ).start()
        run_pretraining(cfg)
        assert killer.killed_pid, "the worker kill never happened"
        traffic.send(base_url, "anonymous", "dash", requests=20, concurrency=4)  # traffic while scraped, after training

        missing = []
        deadline = time.monotonic() + 90
        while True:
            now = time.time()
            missing = [
                (name, expr)
                for name, expr, needs in queries()
                if needs is None and not name.startswith("alert ") and not query_range(url, expr, started, now)
            ]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert not missing, f"panels without data: {missing}"

        # And the other way round: every Strata metric Prometheus saw is on a panel or in an alert.
        with urllib.request.urlopen(f"{url}/api/v1/label/__name__/values", timeout=30) as response:
            seen = {n for n in json.loads(response.read())["data"] if n.startswith("ray_strata_")}
        text = "\n".join(expr for _, expr, _ in queries())
        families = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in seen}
        assert not [n for n in families if n not in text], families

        pictures = os.environ.get("STRATA_DASHBOARD_PICTURES")  # `make dashboard-pictures`
        if pictures:
            render = load_builder("pictures").render
            for dashboard in ("strata-serving", "strata-training", "strata-moe", "strata-releases"):
                render(dashboard, url, started, time.time(), ROOT / pictures)  # relative: to the checkout
    finally:
        serve.shutdown()
        prometheus.terminate()
        prometheus.wait(timeout=30)
