"""Move a release track (a registry alias: `fast`, `stable`) to a model version once its gates pass, or back.

    gates     eval_loss no worse than the holder's (by a relative margin), lineage present, and for `stable`
              a passed canary (the version tag canary=passed, set by the canary) unless forced
    lock      one promotion of MODEL@ALIAS at a time (`locks`), then compare-and-set: the alias must still be
              where it was when the gates were read
    history   written ahead (`history`): pending event -> alias -> done, so a kill leaves them consistent

Refusals are recorded too; a dry run only reads.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import time
from dataclasses import asdict, dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from rich.markup import escape
from rich.table import Table

from strata.config import TRACKS, PromotionGates
from strata.config.release import RUN_ID
from strata.release import history, locks
from strata.release.history import HistoryEvent

CANARY_TAG = "canary"  # "passed" lets a version onto a canary track (stable)
CANARY_REPORT_TAG = "canary.report"  # the canary's JSON report, copied into the history event


class ReleaseError(Exception):
    """A release command could not do what it was asked; nothing moved."""


class BadTarget(ReleaseError):
    """An unknown model, version or track; the message names which."""


class PromotionRefused(ReleaseError):
    """Gates failed (recorded in history); `promotion` holds the gate results."""

    def __init__(self, message: str, promotion: Promotion):
        super().__init__(message)
        self.promotion = promotion


class PromotionConflict(ReleaseError):
    """Another promotion of the same alias is running, or the alias moved while the gates were checked."""


@dataclass(frozen=True)
class Gate:
    gate: str
    passed: bool
    detail: str
    waived: bool = False  # failed, but --force let the promotion through


@dataclass(frozen=True)
class Promotion:
    model: str
    alias: str
    from_version: str | None
    to_version: str
    gates: list[Gate]
    event: HistoryEvent | None  # None for a dry run

    @property
    def passed(self) -> bool:
        return all(g.passed or g.waived for g in self.gates)

    @property
    def forced(self) -> bool:
        return any(g.waived for g in self.gates)


def failpoint(name: str) -> None:
    """A test hook, off unless STRATA_FAILPOINT names this point (comma-separated for several).
    `NAME` kills this process here with SIGKILL, a real crash; `NAME=SECONDS` sleeps here; `NAME=PATH` creates
    PATH.waiting (so that a test knows it got here) and waits until the file PATH exists (at most 60 s).
    Points: promotion:after-gates, promotion:hold-lock, promotion:before-alias, promotion:after-alias."""
    for spec in filter(None, os.environ.get("STRATA_FAILPOINT", "").split(",")):
        point, _, arg = spec.partition("=")
        if point != name:
            continue
        if not arg:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            time.sleep(float(arg))
        except ValueError:
            open(f"{arg}.waiting", "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(arg) and time.monotonic() < deadline:
                time.sleep(0.05)


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "unknown"


def model_version(client: MlflowClient, model: str, version: str | int | None = None) -> ModelVersion | None:
    """The version (None without one), or BadTarget naming the unknown model or version."""
    try:
        client.get_registered_model(model)
    except MlflowException:
        raise BadTarget(f"model: no registered model named {model!r}") from None
    if version is None:
        return None
    try:
        return client.get_model_version(model, str(version))
    except MlflowException:
        raise BadTarget(f"version: registered model {model!r} has no version {version!r}") from None


def check_track(track: str) -> None:
    if track not in TRACKS:
        raise BadTarget(f"track: unknown track {track!r}: expected one of {', '.join(TRACKS)}")


def source_run(client: MlflowClient, version: ModelVersion):
    if not version.run_id:
        return None
    try:
        return client.get_run(version.run_id)
    except MlflowException:  # deleted
        return None


def eval_gate(client: MlflowClient, model: str, candidate: ModelVersion, holder: str | None, cfg: PromotionGates):
    metric = cfg.eval_metric
    run = source_run(client, candidate)
    value = run.data.metrics.get(metric) if run else None
    if value is None and holder is None:  # a first release, e.g. a pretrained model: nothing to hold it to
        return Gate(metric, True, f"version {candidate.version} has no {metric}, and the track has no holder yet")
    if value is None:
        return Gate(metric, False, f"version {candidate.version} has no {metric} (its run: {candidate.run_id})")
    if holder is None:
        return Gate(metric, True, f"{value:.4f}; the track has no holder yet: nothing to compare against")
    held_run = source_run(client, client.get_model_version(model, holder))
    held = held_run.data.metrics.get(metric) if held_run else None
    if held is None:
        return Gate(metric, True, f"{value:.4f}; version {holder} has no {metric} (pretrained?): nothing to compare")
    limit = held + abs(held) * cfg.max_eval_loss_increase
    change = (value - held) / abs(held) if held else 0.0
    detail = f"{value:.4f} vs {held:.4f} (version {holder}): {change:+.1%}, limit {cfg.max_eval_loss_increase:+.1%}"
    return Gate(metric, value <= limit, detail)


def lineage(client: MlflowClient, version: ModelVersion) -> dict[str, str]:
    """Where a version comes from: its run tags, overridden by its own tags, and its source run."""
    run = source_run(client, version)
    found = {**(run.data.tags if run else {}), **version.tags}
    if run:
        found[RUN_ID] = run.info.run_id
    return found


def lineage_gate(client: MlflowClient, version: ModelVersion, cfg: PromotionGates) -> Gate:
    found = lineage(client, version)
    missing = [key for key in cfg.required_lineage if not found.get(key)]
    if missing:
        return Gate("lineage", False, "missing " + ", ".join(missing))
    return Gate("lineage", True, ", ".join(f"{key}={found[key]}" for key in cfg.required_lineage))


def canary_gate(version: ModelVersion, force: bool) -> Gate:
    result = version.tags.get(CANARY_TAG)
    if result == "passed":
        return Gate(CANARY_TAG, True, "canary passed")
    detail = f"canary {result!r}, not 'passed'" if result else "no canary result (version tag canary)"
    return Gate(CANARY_TAG, False, detail + (" (waived by --force)" if force else ""), waived=force)


def check_gates(
    client: MlflowClient, model: str, version: ModelVersion, alias: str, holder: str | None, cfg: PromotionGates, force
) -> list[Gate]:
    gates = [eval_gate(client, model, version, holder, cfg), lineage_gate(client, version, cfg)]
    if alias in cfg.canary_tracks:
        gates.append(canary_gate(version, force))
    return gates


def canary_report(version: ModelVersion):
    text = version.tags.get(CANARY_REPORT_TAG)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def promote(
    model: str,
    version: str | int,
    to: str,
    *,
    reason: str = "",
    actor: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    gates: PromotionGates | None = None,
    client: MlflowClient | None = None,
) -> Promotion:
    """Point alias `to` of `model` at `version` if the gates pass (or a failed canary gate is forced); returns
    the gate results and the history event. A dry run moves and records nothing. Raises PromotionRefused (gates
    failed; recorded), PromotionConflict (another promotion; not recorded), BadTarget."""
    client = client or MlflowClient()
    cfg = gates or PromotionGates()
    actor = actor or current_user()
    check_track(to)
    candidate = model_version(client, model, version)
    holder = history.alias_version(client, model, to)
    wanted = str(candidate.version)  # MLflow's store returns an int here
    if holder == wanted:
        raise ReleaseError(f"{model}@{to} already points to version {holder}")
    results = check_gates(client, model, candidate, to, holder, cfg, force)
    promotion = Promotion(model, to, holder, wanted, results, None)
    if dry_run:
        return promotion
    fields = dict(
        actor=actor,
        alias=to,
        from_version=holder,
        to_version=wanted,
        reason=reason,
        gates=[asdict(g) for g in results],
        canary=canary_report(candidate),
    )
    if not promotion.passed:
        event = history.append(client, model, kind="refused", status="done", **fields)
        failed = "; ".join(f"{g.gate}: {g.detail}" for g in results if not (g.passed or g.waived))
        message = f"{model} version {wanted} -> {to} refused by its gates: {failed}"
        raise PromotionRefused(message, Promotion(model, to, holder, wanted, results, event))
    failpoint("promotion:after-gates")
    event = move(client, model, to, holder, kind="forced" if promotion.forced else "promote", fields=fields)
    return Promotion(model, to, holder, wanted, results, event)


def move(client: MlflowClient, model: str, alias: str, expected: str | None, kind: str, fields: dict) -> HistoryEvent:
    """Move the alias under its lock, if it still points at `expected`, writing history ahead of the move."""
    lock = locks.lock_path(model, alias)
    try:
        with locks.hold(lock):
            failpoint("promotion:hold-lock")
            history.reconcile(client, model, alias)  # a killed promotion's pending event, before comparing
            now_at = history.alias_version(client, model, alias)
            if now_at != expected:
                raise PromotionConflict(
                    f"the alias {model}@{alias} moved from {expected or 'nowhere'} to {now_at or 'nowhere'} while "
                    "this promotion checked its gates: check them again"
                )
            event = history.append(client, model, kind=kind, status="pending", **fields)
            failpoint("promotion:before-alias")
            client.set_registered_model_alias(model, alias, fields["to_version"])
            failpoint("promotion:after-alias")
            return history.finish(client, model, event)
    except locks.LockBusy as busy:
        if busy.path != lock:  # the history lock, held too long
            raise
        raise PromotionConflict(f"another promotion of {model}@{alias} is in progress (pid {busy.pid})") from None


def rollback(
    model: str, track: str, *, reason: str = "", actor: str | None = None, client: MlflowClient | None = None
) -> Promotion:
    """Move `track` back to the version it held before its last promotion (per history; rollbacks unwind one
    promotion each). Raises ReleaseError if history knows of no earlier version, or the alias was moved
    outside Strata since."""
    client = client or MlflowClient()
    check_track(track)
    model_version(client, model)
    past = history.moves(history.events(model, client), track)
    stack: list[str | None] = []  # the holder before each promotion not yet rolled back
    for event in past:
        if event.kind == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(event.from_version)
    holder = history.alias_version(client, model, track)
    if past and past[-1].to_version != holder:
        raise ReleaseError(
            f"{model}@{track} is at version {holder}, but its last recorded move put it at {past[-1].to_version}: "
            "it was moved outside Strata; promote the version you want instead"
        )
    if not stack or stack[-1] is None:
        raise ReleaseError(f"nothing to roll back to: {model}@{track} had no earlier version in its release history")
    fields = dict(actor=actor or current_user(), alias=track, from_version=holder, to_version=stack[-1], reason=reason)
    event = move(client, model, track, holder, kind="rollback", fields=fields)
    return Promotion(model, track, holder, stack[-1], [], event)


def release_history(model: str, client: MlflowClient | None = None) -> list[HistoryEvent]:
    """`history.events` of a model that must exist (BadTarget if not), oldest first."""
    client = client or MlflowClient()
    model_version(client, model)
    return history.events(model, client)


def gates_table(promotion: Promotion) -> Table:
    table = Table(title=f"gates: {promotion.model} version {promotion.to_version} -> {promotion.alias}")
    for column in ("gate", "result", "detail"):
        table.add_column(column, overflow="fold")
    for g in promotion.gates:
        result = "[yellow]waived[/yellow]" if g.waived else "[green]pass[/green]" if g.passed else "[red]FAIL[/red]"
        table.add_row(escape(g.gate), result, escape(g.detail))
    return table
