"""Ray Train callbacks: rank 0's metrics into the run's MLflow run, and every recovery measured."""

from __future__ import annotations

import time
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.train import UserCallback


class MlflowMetricsCallback(UserCallback):
    """Logs rank 0's reported metrics to MLflow and measures every recovery; runs in the Ray Train controller,
    so workers need no MLflow.

    A resumed worker group first reports `resumed_from_step`. Steps lost are the furthest step this MLflow run
    ever logged minus that step (a lower bound, exact to `log_every_steps`), so a whole-job restart (driver or
    head died) is measured like a worker failure. Recoveries also go to Prometheus through Ray's metrics
    (`ray_strata_train_*`).
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.failed_at: float | None = None
        self.failures = 0

    def _client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self.failures += 1
        self.failed_at = time.time()
        self._client().log_metric(self.run_id, "recovery_worker_failures", self.failures)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = metrics[0]
        step = int(reported.get("step", 0))
        now = time.time()
        batch = [
            Metric(key, float(value), int(now * 1000), step)
            for key, value in reported.items()
            if key != "step" and isinstance(value, (int, float))
        ]
        if "resumed_from_step" in reported:
            batch += self._recovery_metrics(int(reported["resumed_from_step"]), now, step)
        else:
            batch.append(Metric("progress_step", step, int(now * 1000), step))
        self._client().log_batch(self.run_id, metrics=batch)

    def _recovery_metrics(self, resumed_from: int, now: float, step: int) -> list[Metric]:
        history = self._client().get_metric_history(self.run_id, "progress_step")
        reached = max((m.step for m in history), default=resumed_from)
        last_progress_s = max((m.timestamp for m in history), default=int(now * 1000)) / 1000
        steps_lost = max(0, reached - resumed_from)
        seconds = now - (self.failed_at or last_progress_s)
        self.failed_at = None
        restarts = len(self._client().get_metric_history(self.run_id, "recovery_steps_lost")) + 1
        record_recovery(steps_lost, seconds)
        stamp = int(now * 1000)
        return [
            Metric("recovery_steps_lost", steps_lost, stamp, step),
            Metric("recovery_seconds_to_resume", seconds, stamp, step),
            Metric("recovery_restarts", restarts, stamp, step),
        ]


def record_recovery(steps_lost: int, seconds: float) -> None:
    """Export a recovery to Prometheus (Ray's metrics agent) for the dashboards and alerts."""
    from ray.util.metrics import Counter, Gauge

    Counter("strata_train_restarts", description="Training restarts from a checkpoint").inc()
    if steps_lost:  # a Counter rejects inc(0)
        Counter("strata_train_steps_lost", description="Optimizer steps recomputed after restarts").inc(steps_lost)
    Gauge("strata_train_resume_seconds", description="Seconds from failure to resumed training").set(seconds)


class PrometheusMetricsCallback(UserCallback):
    """Exports a run's progress through Ray's metrics (Prometheus names `ray_strata_train_*`, tagged with the run
    name) for the dashboards and alerts: step, losses, throughput, expert balance, preemptions, and when the last
    checkpoint was written and how far apart checkpoints come (what the stale-checkpoint alert compares)."""

    GAUGES = {
        "step": "strata_train_step",
        "loss": "strata_train_loss",
        "eval_loss": "strata_train_eval_loss",
        "tokens_per_s": "strata_train_tokens_per_second",
        "mfu": "strata_train_mfu",
        "expert_imbalance": "strata_train_expert_imbalance",
        "router_entropy": "strata_train_router_entropy",
    }

    def __init__(self, run_name: str):
        self.run_name = run_name
        self._metrics = None  # made in the controller, where the callback runs: Ray metrics do not pickle
        self._last_checkpoint_at: float | None = None
        self._preemptions = 0  # just-in-time checkpoints in this run (since the controller started)

    def _export(self):
        from ray.util.metrics import Gauge

        if self._metrics is None:
            tags = ("run",)
            gauges = {key: Gauge(name, tag_keys=tags) for key, name in self.GAUGES.items()}
            self._metrics = {
                **gauges,
                "reported_at": Gauge("strata_train_last_report_timestamp_seconds", tag_keys=tags),
                "checkpoint_at": Gauge("strata_train_last_checkpoint_timestamp_seconds", tag_keys=tags),
                "checkpoint_interval": Gauge("strata_train_checkpoint_interval_seconds", tag_keys=tags),
                "preemptions": Gauge("strata_train_preemptions", tag_keys=tags),  # a gauge: present at 0
            }
            for metric in self._metrics.values():
                metric.set_default_tags({"run": self.run_name})
        return self._metrics

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        exported, now = self._export(), time.time()
        for key, value in metrics[0].items():
            if key in self.GAUGES and isinstance(value, (int, float)):
                exported[key].set(value)
        exported["reported_at"].set(now)
        self._preemptions += "preemption_checkpoint_step" in metrics[0]
        exported["preemptions"].set(self._preemptions)
        if checkpoint is not None:
            if self._last_checkpoint_at is not None:
                exported["checkpoint_interval"].set(now - self._last_checkpoint_at)
            self._last_checkpoint_at = now
            exported["checkpoint_at"].set(now)
