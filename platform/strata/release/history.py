"""What MLflow does not keep: every move of a release track, and every refused one.

Each event is one registered-model tag, `strata.history.000007` = compact JSON, so the MLflow UI shows the
history on the model's page; the versions a move touched also get a readable `strata.release.ALIAS` tag.

A move is written ahead: its event is first stored `pending`, then the alias moves, then the event is marked
`done`. A process killed in between leaves a `pending` event that the next holder of the alias lock reconciles
from the alias itself (at `to_version`: `done`; else `aborted`), so history and alias always agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from rich.markup import escape
from rich.table import Table

from strata.release import locks

HISTORY_TAG = "strata.history."  # + a 6-digit sequence number
RELEASE_TAG = "strata.release."  # + an alias: on a version, what the track did with it last
# MLflow validates registered-model tag values up to 100,000 characters, but its SQL stores keep them in a
# VARCHAR(5000) column (dbmodels/models.py, SqlRegisteredModelTag): stay under the column.
MAX_TAG_VALUE = 5000
KINDS = ("promote", "forced", "rollback", "refused")
STATUSES = ("pending", "done", "aborted")  # a refused event is born `done`: nothing moved


@dataclass(frozen=True)
class HistoryEvent:
    seq: int
    at: str  # UTC, ISO 8601
    actor: str
    alias: str
    from_version: str | None  # None: the alias pointed nowhere
    to_version: str | None
    kind: str  # one of KINDS
    status: str  # one of STATUSES
    reason: str = ""
    gates: list[dict[str, Any]] = field(default_factory=list)  # {"gate", "passed", "detail"[, "waived"]}
    canary: Any = None  # the version's canary report (tag `canary.report`), if it had one

    @property
    def tag(self) -> str:
        return f"{HISTORY_TAG}{self.seq:06d}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def encode(event: HistoryEvent) -> str:
    """Compact JSON under MAX_TAG_VALUE: a long canary report is left to its version tag, then gate details and
    the reason are shortened."""
    record = asdict(event)
    shrinks = [
        lambda r: r.update(canary={"truncated": True, "full report": "version tag canary.report"}),
        lambda r: r.update(gates=[{**g, "detail": g.get("detail", "")[:200]} for g in r["gates"]]),
        lambda r: r.update(reason=r["reason"][:1000]),
        lambda r: r.update(gates=[{k: g[k] for k in ("gate", "passed")} for g in r["gates"]]),
    ]
    text = json.dumps(record, separators=(",", ":"))
    for shrink in shrinks:
        if len(text) <= MAX_TAG_VALUE:
            break
        shrink(record)
        text = json.dumps(record, separators=(",", ":"))
    assert len(text) <= MAX_TAG_VALUE, f"history event {event.seq} is still {len(text)} characters"
    return text


def decode(text: str) -> HistoryEvent:
    return HistoryEvent(**json.loads(text))


def stored_events(client: MlflowClient, model: str) -> list[HistoryEvent]:
    """The events as stored, oldest first, `pending` ones included."""
    tags = client.get_registered_model(model).tags
    return [decode(tags[key]) for key in sorted(tags) if key.startswith(HISTORY_TAG)]


def append(client: MlflowClient, model: str, **fields: Any) -> HistoryEvent:
    """Store a new event with the next sequence number (numbering is serialised by the model's history lock,
    so that promotions of two different aliases never take the same number)."""
    with locks.hold(locks.lock_path(model, "history"), wait_s=10):
        seq = max((e.seq for e in stored_events(client, model)), default=0) + 1
        event = HistoryEvent(seq=seq, at=now(), **fields)
        client.set_registered_model_tag(model, event.tag, encode(event))
    return event


def update(client: MlflowClient, model: str, event: HistoryEvent, **changes: Any) -> HistoryEvent:
    event = replace(event, **changes)
    client.set_registered_model_tag(model, event.tag, encode(event))
    return event


def alias_version(client: MlflowClient, model: str, alias: str) -> str | None:
    version = client.get_registered_model(model).aliases.get(alias)
    return None if version is None else str(version)  # MLflow returns ints here


def finish(client: MlflowClient, model: str, event: HistoryEvent) -> HistoryEvent:
    """After the alias moved: note the move on the versions it touched (for the MLflow UI), mark the event done."""
    verb = {"promote": "promoted", "forced": "promoted by force", "rollback": "rolled back to"}[event.kind]
    note = f"{verb} {event.at} by {event.actor}" + (f": {event.reason}" if event.reason else "")
    client.set_model_version_tag(model, event.to_version, RELEASE_TAG + event.alias, note)
    if event.from_version is not None:
        left = f"replaced by version {event.to_version} {event.at} ({event.kind}, {event.actor})"
        try:
            client.set_model_version_tag(model, event.from_version, RELEASE_TAG + event.alias, left)
        except MlflowException as err:  # deleted since (a killed move reconciled later): nothing left to note
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return update(client, model, event, status="done")


def reconcile(client: MlflowClient, model: str, alias: str) -> None:
    """Settle the `pending` events of `alias` left by a killed process. Call it holding the alias lock: then
    no live process owns them."""
    for event in stored_events(client, model):
        if event.alias == alias and event.status == "pending":
            if alias_version(client, model, alias) == event.to_version:
                finish(client, model, event)
            else:
                update(client, model, event, status="aborted")


def events(model: str, client: MlflowClient | None = None) -> list[HistoryEvent]:
    """The model's release history, oldest first. Pending events of a dead process are reconciled first; one
    whose promotion is still running (its alias lock is held) stays `pending`."""
    client = client or MlflowClient()
    for alias in sorted({e.alias for e in stored_events(client, model) if e.status == "pending"}):
        try:
            with locks.hold(locks.lock_path(model, alias)):
                reconcile(client, model, alias)
        except locks.LockBusy:
            pass
    return stored_events(client, model)


def moves(history: list[HistoryEvent], alias: str) -> list[HistoryEvent]:
    """The moves of `alias` that happened, oldest first."""
    return [e for e in history if e.alias == alias and e.status == "done" and e.kind != "refused"]


def history_table(model: str, history: list[HistoryEvent]) -> Table:
    table = Table(title=f"release history: {model}")
    for column in ("#", "when (UTC)", "who", "track", "move", "kind", "status", "reason", "gates"):
        table.add_column(column, overflow="fold")
    for e in history:
        failed = [g["gate"] for g in e.gates if not g["passed"] and not g.get("waived")]
        waived = [g["gate"] for g in e.gates if g.get("waived")]
        notes = [f"failed: {', '.join(failed)}"] if failed else []
        notes += [f"waived: {', '.join(waived)}"] if waived else []
        gates = "; ".join(notes) or ("passed" if e.gates else "")
        style = {"refused": "red", "forced": "yellow", "rollback": "cyan"}.get(e.kind, "")
        move = f"{e.from_version or '-'} -> {e.to_version or '-'}"
        row = (str(e.seq), e.at.replace("T", " ")[:19], e.actor, e.alias, move, e.kind, e.status, e.reason, gates)
        table.add_row(*map(escape, row), style=style)
    return table
