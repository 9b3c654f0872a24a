"""What a sweep shows while it runs: a table of trials (state, params, steps, last metric), redrawn as results
arrive, and the final leaderboard."""

from __future__ import annotations

import time
from typing import Any

import ray.tune
from rich.console import Console
from rich.table import Table


def trials_table(title: str, rows: list[dict[str, Any]], params: list[str], metric: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("trial", "state", *params, "step", metric):
        table.add_column(column, justify="right" if column in ("step", metric) else "left")
    for row in rows:
        value = row.get(metric)
        table.add_row(
            row["trial"],
            row["state"],
            *(format_value(row["params"].get(p)) for p in params),
            str(row.get("step", "")),
            "" if value is None else f"{value:.4f}",
        )
    return table


def leaderboard(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first; trials that never reported the metric last."""
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (r.get(metric) is None, sign * (r.get(metric) or 0.0)))


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class SweepProgress(ray.tune.Callback):
    """Redraws the trials table at most every `interval_s` while results arrive, and on every state change."""

    def __init__(self, name: str, params: list[str], metric: str, interval_s: float = 15.0):
        self.name, self.params, self.metric, self.interval_s = name, params, metric, interval_s
        self._rows: dict[str, dict[str, Any]] = {}
        self._shown_at = 0.0

    def _update(self, trial, state: str, result: dict | None = None, force: bool = False) -> None:
        row = self._rows.setdefault(trial.trial_id, {"trial": trial.trial_id, "params": dict(trial.config)})
        row["state"] = state
        if result:
            row["step"] = result.get("step", row.get("step"))
            if self.metric in result:
                row[self.metric] = result[self.metric]
        if force or time.monotonic() - self._shown_at > self.interval_s:
            self._shown_at = time.monotonic()
            rows = sorted(self._rows.values(), key=lambda r: r["trial"])
            Console(stderr=True).print(trials_table(f"sweep {self.name}", rows, self.params, self.metric))

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "running", force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._update(trial, "running", result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "finished", trial.last_result, force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "error", trial.last_result, force=True)
