"""Canary releases: shift traffic to a candidate variant step by step, judge it against the stable variant at every
tick, roll back at once on a breach, and promote it to `stable` when every step has passed.

    Initialized -> Progressing (step 1..n) -> Promoting -> Succeeded
                        |   ^
                 pause  v   | resume          a breach, a refused promotion -> RolledBack
                      Paused                  `strata canary abort`         -> Aborted

A paused canary still judges its step, so a breach rolls it back from Paused too. At the last step (100%) stable
takes no traffic, so the latency ratios compare with stable's numbers from the last step it served.

The state lives on the candidate's model version in the registry (tag `strata.canary.status`), so `strata canary
status` on any machine shows it, and a canary that is restarted continues from its recorded step. Commands (`abort`,
`pause`, `resume`) are a tag the running canary reads at every tick. Each transition is logged, recorded on the
version, and exported as a metric by a small detached actor, which outlives the canary process so that a rollback
still reaches Prometheus after the canary has exited.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray.util.metrics import Counter, Gauge
from rich.markup import escape
from rich.table import Table

from strata import paths, tracking
from strata.config.canary import CanaryConfig, CanaryThresholds
from strata.release import history, promotion
from strata.release.canary_metrics import metrics_source
from strata.serve import deploy, windows

STATUS_TAG = "strata.canary.status"  # JSON: the state machine's position
COMMAND_TAG = "strata.canary.command"  # "abort|pause|resume TIME", written by `strata canary abort|pause|resume`
RESULT_TAG = promotion.CANARY_TAG  # running | passed | failed | aborted: what the promotion gate reads
REPORT_TAG = promotion.CANARY_REPORT_TAG  # the JSON report, which the promotion copies into the history

INITIALIZED, PROGRESSING, PAUSED, PROMOTING = "Initialized", "Progressing", "Paused", "Promoting"
SUCCEEDED, ROLLED_BACK, ABORTED = "Succeeded", "RolledBack", "Aborted"
STATES = (INITIALIZED, PROGRESSING, PAUSED, PROMOTING, SUCCEEDED, ROLLED_BACK, ABORTED)
FINISHED = (SUCCEEDED, ROLLED_BACK, ABORTED)
COMMANDS = ("abort", "pause", "resume")
PROMOTION_ATTEMPTS = 10  # while another promotion of stable holds its lock, `interval_s` apart


# -- the checks -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None  # None: not enough data yet
    limit: float
    passed: bool


def ratio(candidate: float | None, stable: float | None) -> float | None:
    return candidate / stable if candidate is not None and stable else None


def judge(candidate: dict[str, Any], stable: dict[str, Any], limits: CanaryThresholds, min_requests: int):
    """(checks, verdict): verdict is "fail" on any breach, "pass" once the candidate has `min_requests` and passes
    every check, else "wait". Errors fail early: once they exceed the rate even if all of `min_requests` succeed."""
    requests, errors = candidate.get("requests", 0), candidate.get("errors", 0)
    error_rate = errors / max(requests, min_requests)
    checks = [
        Check("error_rate", candidate.get("error_rate"), limits.max_error_rate, error_rate <= limits.max_error_rate)
    ]
    if requests >= min_requests:
        values = {
            ("p99_latency_ms", limits.max_p99_latency_ms): candidate.get("p99_ms"),
            ("p99_latency_ratio", limits.max_p99_latency_ratio): ratio(candidate.get("p99_ms"), stable.get("p99_ms")),
            ("ttft_ratio", limits.max_ttft_ratio): ratio(candidate.get("ttft_p99_ms"), stable.get("ttft_p99_ms")),
        }
        checks += [Check(n, v, limit, v is None or v <= limit) for (n, limit), v in values.items()]
    if not all(c.passed for c in checks):
        return checks, "fail"
    return checks, "pass" if requests >= min_requests else "wait"


# -- the state machine ----------------------------------------------------------------------------------------------


@dataclass
class CanaryStatus:
    """Where a canary stands; recorded on the candidate's version after every transition."""

    model: str
    version: str
    app: str
    state: str = INITIALIZED
    step: int = 0  # index into the config's steps
    weight: float = 0.0  # percent of traffic the candidate gets now
    step_started_at: float = 0.0
    started_at: float = field(default_factory=time.time)
    reason: str = ""
    taken_command: str = ""  # the last command tag this canary took: a tag equal to it is not a new command
    steps: list[dict[str, Any]] = field(default_factory=list)  # one entry per judged step: its numbers and checks
    transitions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@ray.remote(num_cpus=0)
class CanaryMetrics:
    """Exports each application's canary state; detached, so the last state and every rollback outlive the canary
    process until Prometheus has scraped them."""

    def __init__(self):
        self.state = Gauge("strata_canary_state", "1 for the canary's current state.", tag_keys=("app", "state"))
        self.weight = Gauge("strata_canary_weight", "Percent of traffic to the candidate.", tag_keys=("app",))
        self.transitions = Counter("strata_canary_transitions", "Canary state changes.", tag_keys=("app", "to"))

    def update(self, app: str, state: str, weight: float, changed: bool) -> None:
        for name in STATES:
            self.state.set(1.0 if name == state else 0.0, tags={"app": app, "state": name})
        self.weight.set(weight, tags={"app": app})
        if changed:
            self.transitions.inc(tags={"app": app, "to": state})


def metrics_actor():
    options = dict(name="canary-metrics", namespace=windows.NAMESPACE, lifetime="detached", get_if_exists=True)
    return CanaryMetrics.options(**options).remote()


class Canary:
    """One canary run: `run()` ticks until the candidate is promoted, rolled back or aborted."""

    def __init__(self, cfg: CanaryConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        tracking.use_store(cfg.tracking_uri)
        self.client = MlflowClient()
        self.dashboard = deploy.connect(cfg.address, start_if_none=False)
        self.entry = app_entry(self.dashboard, cfg.app)
        self.variants = {v["name"]: v["model"] for v in self.entry["args"]["variants"]}
        for role, name in (("stable_variant", cfg.stable_variant), ("candidate_variant", cfg.candidate_variant)):
            if name not in self.variants:
                raise ValueError(
                    f"{role}: application {cfg.app!r} has no variant {name!r}; it has {list(self.variants)}"
                )
        self.version = version_of(self.variants[cfg.candidate_variant], cfg.model)
        self.source = metrics_source(cfg)
        self.exporter = metrics_actor()
        recorded = read_status(self.client, cfg.model, self.version)  # a restarted canary goes on from here
        self.status = recorded or CanaryStatus(cfg.model, self.version, cfg.app)

    # -- transitions ---------------------------------------------------------------------------------------------

    def transition(self, state: str, reason: str = "", weight: float | None = None) -> None:
        changed = state != self.status.state
        if weight is not None and weight != self.status.weight:
            deploy.set_weights(self.dashboard, self.cfg.app, self.split(weight))
            self.status.weight = weight
        if changed:
            self.status.transitions.append(
                {"at": time.time(), "from": self.status.state, "to": state, "reason": reason}
            )
            self.log(
                f"canary {self.cfg.model} v{self.version}: {self.status.state} -> {state}"
                + (f" ({reason})" if reason else "")
            )
        self.status.state, self.status.reason = state, reason or self.status.reason
        self.save()
        self.exporter.update.remote(self.cfg.app, state, self.status.weight, changed)

    def split(self, weight: float) -> dict[str, float]:
        return {self.cfg.stable_variant: 100 - weight, self.cfg.candidate_variant: weight}

    def start_step(self, step: int) -> None:
        self.status.step, self.status.step_started_at = step, time.time()
        self.transition(PROGRESSING, f"step {step + 1}/{len(self.cfg.steps)}", weight=self.cfg.steps[step])

    def roll_back(self, state: str, reason: str) -> None:
        """All traffic to stable, through the live split change: nothing restarts. The result tag, which the
        promotion gate reads, changes first: a canary killed in between is never finished with `passed` on it."""
        result = "failed" if state == ROLLED_BACK else "aborted"
        self.client.set_model_version_tag(self.cfg.model, self.version, RESULT_TAG, result)
        self.transition(state, reason, weight=0)
        self.finish(result)

    def finish(self, result: str) -> None:
        report = self.report()
        self.client.set_model_version_tag(self.cfg.model, self.version, REPORT_TAG, json.dumps(report))
        self.client.set_model_version_tag(self.cfg.model, self.version, RESULT_TAG, result)
        out = Path(paths.resolve(f"canary/{self.cfg.app}-{self.cfg.model}-v{self.version}.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))

    def save(self) -> None:
        self.client.set_model_version_tag(self.cfg.model, self.version, STATUS_TAG, json.dumps(asdict(self.status)))

    def report(self) -> dict[str, Any]:
        return {**asdict(self.status), "thresholds": self.cfg.thresholds.model_dump(), "config_steps": self.cfg.steps}

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> CanaryStatus:
        if self.status.finished:
            self.log(f"canary of {self.cfg.model} v{self.version} already ended: {self.status.state}")
            return self.status
        if self.status.state == INITIALIZED:
            self.client.set_model_version_tag(self.cfg.model, self.version, RESULT_TAG, "running")
            self.new_command()  # one left from an earlier canary of this version is not for this one
            self.start_step(0)
        else:
            self.log(
                f"canary of {self.cfg.model} v{self.version} continues: {self.status.state}, "
                f"step {self.status.step + 1}"
            )
            if self.status.state == PROMOTING:
                self.promote()
        while not self.status.finished:
            self.tick()
            if not self.status.finished:
                time.sleep(self.cfg.interval_s)
        return self.status

    def new_command(self) -> str | None:
        """The command sent since the last one this canary took, or None. Each command carries the time it was
        sent and the tag is never deleted, so none sent while this canary acts on another is lost."""
        tag = self.client.get_model_version(self.cfg.model, self.version).tags.get(COMMAND_TAG, "")
        if not tag or tag == self.status.taken_command:
            return None
        self.status.taken_command = tag  # recorded with the transition it makes (one that makes none is a no-op)
        return tag.split()[0]

    def tick(self) -> None:
        command = self.new_command()
        if command == "abort":
            return self.roll_back(ABORTED, "aborted by command")
        if command == "pause" and self.status.state == PROGRESSING:
            return self.transition(PAUSED, "paused by command")
        if command == "resume" and self.status.state == PAUSED:
            return self.start_step(self.status.step)  # the bake starts over: paused time proved nothing
        self.check_step()

    def check_step(self) -> None:
        """Judge the step so far. A breach rolls back, paused or not (the candidate still takes its share); only a
        progressing canary times out or moves on."""
        cfg, status = self.cfg, self.status
        summary = self.source.summary(since=status.step_started_at)
        candidate = summary.get(cfg.candidate_variant, {})
        stable = stable_baseline(summary.get(cfg.stable_variant, {}), status.steps, cfg.stable_variant)
        checks, verdict = judge(candidate, stable, cfg.thresholds, cfg.min_requests)
        elapsed = time.time() - status.step_started_at
        if verdict == "fail":
            self.record_step(candidate, stable, checks)
            failed = ", ".join(f"{c.name} {c.value:.3g} > {c.limit:g}" for c in checks if not c.passed)
            paused = " (paused)" if status.state == PAUSED else ""
            return self.roll_back(ROLLED_BACK, f"step {status.step + 1} at {status.weight:g}%{paused}: {failed}")
        if status.state == PAUSED:
            return None
        if verdict == "wait" and elapsed > cfg.step_timeout_s:
            self.record_step(candidate, stable, checks)
            return self.roll_back(ROLLED_BACK, f"step {status.step + 1}: fewer than {cfg.min_requests} requests")
        if verdict == "pass" and elapsed >= cfg.bake_s:
            self.record_step(candidate, stable, checks)
            if status.step + 1 < len(cfg.steps):
                return self.start_step(status.step + 1)
            return self.promote()
        return None

    def record_step(self, candidate: dict, stable: dict, checks: list[Check]) -> None:
        self.status.steps.append(
            {
                "step": self.status.step + 1,
                "weight": self.status.weight,
                "seconds": round(time.time() - self.status.step_started_at, 1),
                self.cfg.candidate_variant: candidate,
                self.cfg.stable_variant: stable,
                "checks": [asdict(c) for c in checks],
            }
        )

    def promote(self) -> None:
        """The candidate passed at 100%: make it `stable` through the promotion gates, then serve it as the stable
        variant (all traffic back on that variant's name, so the next candidate starts from a clean split)."""
        self.transition(PROMOTING, "every step passed")
        if not self.cfg.promote:
            self.transition(SUCCEEDED, "passed (promotion off)")
            return self.finish("passed")
        self.client.set_model_version_tag(self.cfg.model, self.version, REPORT_TAG, json.dumps(self.report()))
        self.client.set_model_version_tag(self.cfg.model, self.version, RESULT_TAG, "passed")
        for attempt in range(1, PROMOTION_ATTEMPTS + 1):
            if history.alias_version(self.client, self.cfg.model, "stable") == self.version:  # a restart
                break
            try:
                promotion.promote(self.cfg.model, self.version, "stable", reason=self.cfg.reason)
                break
            except promotion.PromotionConflict as busy:  # another promotion of stable: its gates are checked again
                if attempt == PROMOTION_ATTEMPTS:
                    return self.roll_back(ROLLED_BACK, f"promotion refused: {busy}")
                name = f"canary {self.cfg.model} v{self.version}"
                self.log(f"{name}: {busy}; trying again ({attempt}/{PROMOTION_ATTEMPTS})")
                time.sleep(self.cfg.interval_s)
            except promotion.ReleaseError as refused:  # a gate failed
                return self.roll_back(ROLLED_BACK, f"promotion refused: {refused}")
        self.redeploy_stable()
        self.transition(SUCCEEDED, f"v{self.version} is stable")
        return self.finish("passed")

    def redeploy_stable(self) -> None:
        """Serve the candidate's version as the stable variant too, then move all traffic to it: while the stable
        replicas restart on the new version, the candidate still carries everything."""
        model = self.variants[self.cfg.candidate_variant]
        entry = promoted_entry(app_entry(self.dashboard, self.cfg.app), self.cfg.stable_variant, model, self.split(100))
        port = deploy.running_config(self.dashboard).get("http_options", {}).get("port", 8000)
        deploy.deploy_application(self.dashboard, entry, port)
        deploy.wait_until_running(self.dashboard, self.cfg.app)
        deploy.set_weights(self.dashboard, self.cfg.app, self.split(0))
        self.status.weight = 0


def stable_baseline(now: dict[str, Any], steps: list[dict[str, Any]], stable_variant: str) -> dict[str, Any]:
    """The stable variant's numbers to judge the candidate against: this step's, or, where stable takes no traffic
    (the last step, at 100%), those of the last judged step it served, so the latency ratios still hold there."""
    if now.get("requests"):
        return now
    served = [s for s in steps if s.get(stable_variant, {}).get("requests")]
    return {**served[-1][stable_variant], "from_step": served[-1]["step"]} if served else now


def promoted_entry(entry: dict[str, Any], stable_variant: str, model: str, weights: dict[str, float]) -> dict:
    """`entry` (an application's `serve deploy` config) with `stable_variant` serving `model` and the router on
    `weights`; the router's other live settings (variants added to running replica groups) stay."""
    entry = copy.deepcopy(entry)
    for variant in entry["args"]["variants"]:
        if variant["name"] == stable_variant:
            variant["model"] = model
    entry["deployments"] = [
        {**d, "user_config": {**d.get("user_config", {}), "weights": weights}} if d["name"] == deploy.ROUTER else d
        for d in entry.get("deployments", [])
    ]
    return entry


# -- reading a canary from anywhere ---------------------------------------------------------------------------------


def app_entry(dashboard: str, app: str) -> dict[str, Any]:
    entries = [a for a in deploy.running_config(dashboard)["applications"] if a["name"] == app]
    if not entries:
        raise ValueError(f"app: no application {app!r} is deployed")
    return entries[0]


def version_of(model_uri: str, model: str) -> str:
    """`models:/NAME/VERSION` -> VERSION; a canary judges a registered version, nothing else."""
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    if not model_uri.startswith("models:/") or name != model or not version.isdigit():
        raise ValueError(f"model: the candidate variant serves {model_uri!r}, not a version of {model!r}")
    return version


def status_from_tags(tags: dict[str, str]) -> CanaryStatus | None:
    raw = tags.get(STATUS_TAG)
    return CanaryStatus(**json.loads(raw)) if raw else None


def read_status(client: MlflowClient, model: str, version: str) -> CanaryStatus | None:
    return status_from_tags(client.get_model_version(model, version).tags)


def latest_canary(model: str) -> CanaryStatus | None:
    """The most recently started canary of `model`, from the registry (one search: versions come with their tags)."""
    found = [status_from_tags(v.tags) for v in MlflowClient().search_model_versions(f"name = '{model}'")]
    found = [s for s in found if s]
    return max(found, key=lambda s: s.started_at) if found else None


def send_command(model: str, command: str) -> CanaryStatus:
    """abort | pause | resume the running canary of `model`: its next tick acts on it."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    status = latest_canary(model)
    if status is None or status.finished:
        raise ValueError(
            f"model {model!r} has no running canary" + (f" (the last one {status.state})" if status else "")
        )
    MlflowClient().set_model_version_tag(model, status.version, COMMAND_TAG, f"{command} {time.time():.6f}")
    return status


def status_line(status: CanaryStatus) -> str:
    color = {SUCCEEDED: "green", ROLLED_BACK: "red", ABORTED: "red"}.get(status.state, "yellow")
    reason = f": {escape(status.reason)}" if status.reason else ""
    return (
        f"canary {status.model} v{status.version} on {status.app!r}: [{color}]{status.state}[/{color}] "
        f"at {status.weight:g}% (step {status.step + 1}){reason}"
    )


def status_table(status: CanaryStatus) -> Table:
    """Per judged step, the candidate against stable on every gated number, and the checks that failed."""
    table = Table("step", "weight", "variant", "requests", "errors", "p99 ms", "TTFT p99 ms", "checks")
    for step in status.steps:
        failed = [c["name"] for c in step["checks"] if not c["passed"]]
        verdict = "[red]failed: " + ", ".join(failed) + "[/red]" if failed else "[green]passed[/green]"
        variants = [name for name, numbers in step.items() if isinstance(numbers, dict)]
        for first, name in zip([True] + [False] * len(variants), variants, strict=False):
            numbers = step[name]
            table.add_row(
                str(step["step"]) if first else "",
                f"{step['weight']:g}%" if first else "",
                name,
                str(numbers.get("requests", 0)),
                str(numbers.get("errors", 0)),
                *(f"{numbers[k]:.0f}" if numbers.get(k) is not None else "-" for k in ("p99_ms", "ttft_p99_ms")),
                verdict if first else "",
            )
    return table


def run_canary(cfg: CanaryConfig, log: Callable[[str], None] = print) -> CanaryStatus:
    return Canary(cfg, log).run()
