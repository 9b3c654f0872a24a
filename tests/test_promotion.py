"""Release tracks against a real MLflow sqlite store: gates, history, rollback, locking and crash safety.

Versions are made cheaply (a run with an eval_loss metric and lineage tags, registered without a real model):
the gates read nothing else. Races and crashes use real processes and STRATA_FAILPOINT, never timing luck.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from strata import cli, tracking
from strata.release import PromotionConflict, PromotionRefused, ReleaseError, history, promote, rollback
from strata.release.history import MAX_TAG_VALUE, stored_events

ROOT = Path(__file__).resolve().parents[1]
MODEL = "release-test"
LINEAGE = {"base_model": "scratch:tiny", "strata.dataset_hash": "0123456789abcdef"}


@pytest.fixture
def client(strata_home) -> MlflowClient:
    tracking.use_store()
    return MlflowClient()


def add_version(
    client: MlflowClient, eval_loss: float | None, run_tags: dict | None = None, version_tags: dict | None = None
) -> str:
    """A registered version whose source run logged `eval_loss` and carries `run_tags` (default: full lineage)."""
    run = client.create_run(tracking.ensure_experiment("release-test"), tags=LINEAGE if run_tags is None else run_tags)
    if eval_loss is not None:
        client.log_metric(run.info.run_id, "eval_loss", eval_loss)
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id, tags=version_tags)
    return str(version.version)


def alias(client: MlflowClient, name: str) -> str | None:
    return history.alias_version(client, MODEL, name)


def strata(*args: str, failpoint: str = "") -> subprocess.Popen:
    """`python -m strata.cli ARGS` in its own process, on this test's STRATA_HOME."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform"), "STRATA_FAILPOINT": failpoint}
    command = [sys.executable, "-m", "strata.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_eval_gate_refuses_a_worse_model_and_dry_run_moves_nothing(client, capsys):
    v1 = add_version(client, 1.00)
    first = promote(MODEL, v1, "fast", reason="first", actor="alice")
    assert first.passed and "no holder" in first.gates[0].detail and alias(client, "fast") == v1

    worse = add_version(client, 1.03)  # 3% worse than the holder's; the margin is 2%
    dry = promote(MODEL, worse, "fast", dry_run=True)
    assert not dry.passed and not dry.gates[0].passed and dry.event is None
    assert alias(client, "fast") == v1 and len(history.events(MODEL)) == 1  # a dry run moves and records nothing

    assert cli.main(["promote", MODEL, worse, "--to", "fast", "--dry-run"]) == 1
    assert "would refuse" in capsys.readouterr().err
    with pytest.raises(PromotionRefused, match="eval_loss"):
        promote(MODEL, worse, "fast", reason="try", actor="bob")
    assert alias(client, "fast") == v1
    refused = history.events(MODEL)[-1]
    assert (refused.kind, refused.from_version, refused.to_version, refused.actor) == ("refused", v1, worse, "bob")
    assert [g["gate"] for g in refused.gates if not g["passed"]] == ["eval_loss"]

    within = add_version(client, 1.015)  # 1.5% worse: inside the margin
    assert promote(MODEL, within, "fast").passed and alias(client, "fast") == within
    assert cli.main(["promote", MODEL, add_version(client, 0.9), "--to", "fast", "--actor", "carol"]) == 0
    assert [e.kind for e in history.events(MODEL)] == ["promote", "refused", "promote", "promote"]
    assert client.get_model_version(MODEL, v1).tags["strata.release.fast"].startswith(f"replaced by version {within}")

    assert cli.main(["history", MODEL]) == 0
    table = capsys.readouterr().err
    assert "refused" in table and "carol" in table and "eval_loss" in table


def test_a_first_release_needs_no_eval_loss_but_every_later_one_does(client):
    """A pretrained model reports no eval_loss: as a track's first holder it has nothing to be held to."""
    pretrained = add_version(client, None)
    first = promote(MODEL, pretrained, "fast")
    assert first.passed and "no holder yet" in first.gates[0].detail
    with pytest.raises(PromotionRefused, match="has no eval_loss"):
        promote(MODEL, add_version(client, None), "fast")
    assert alias(client, "fast") == pretrained


def test_lineage_and_canary_gates(client):
    holder = add_version(client, 1.0, version_tags={"canary": "passed"})
    promote(MODEL, holder, "stable")
    no_hash = add_version(client, 0.9, run_tags={"base_model": "scratch:tiny"})
    with pytest.raises(PromotionRefused, match="lineage.*strata.dataset_hash"):
        promote(MODEL, no_hash, "fast")
    # Lineage read from the version's own tags when its run has none (a pretraining run from before lineage).
    tagged = add_version(client, 0.9, run_tags={}, version_tags=LINEAGE)
    assert promote(MODEL, tagged, "fast").passed

    with pytest.raises(PromotionRefused, match="canary"):
        promote(MODEL, tagged, "stable")  # no canary result
    failed = add_version(client, 0.9, version_tags={"canary": "failed"})
    with pytest.raises(PromotionRefused, match="canary"):
        promote(MODEL, failed, "stable")
    assert alias(client, "stable") == holder

    forced = promote(MODEL, failed, "stable", force=True, reason="hotfix", actor="dana")
    assert forced.forced and forced.event.kind == "forced" and alias(client, "stable") == failed
    assert client.get_model_version(MODEL, failed).tags["strata.release.stable"].endswith("by dana: hotfix")
    with pytest.raises(PromotionRefused, match="eval_loss"):  # --force waives the canary, never the eval gate
        promote(MODEL, add_version(client, 2.0, version_tags={"canary": "failed"}), "stable", force=True)

    # The canary's report goes into the event; a huge one is left to its version tag, under MLflow's column size.
    report = {"verdict": "passed", "requests": 1000, "samples": ["x" * 100] * 100}
    canaried = add_version(client, 0.8, version_tags={"canary": "passed", "canary.report": json.dumps(report)})
    event = promote(MODEL, canaried, "stable").event
    assert event.kind == "promote"
    stored = client.get_registered_model(MODEL).tags[event.tag]
    assert len(stored) <= MAX_TAG_VALUE and json.loads(stored)["canary"]["truncated"] is True
    small = add_version(client, 0.8, version_tags={"canary": "passed", "canary.report": '{"verdict": "passed"}'})
    assert promote(MODEL, small, "stable").event.canary == {"verdict": "passed"}


def test_rollback_returns_to_the_previous_holder(client, capsys):
    versions = [add_version(client, 1.0 - i / 10, version_tags={"canary": "passed"}) for i in range(3)]
    with pytest.raises(ReleaseError, match="nothing to roll back to"):
        rollback(MODEL, "stable")  # never promoted
    for v in versions:
        promote(MODEL, v, "stable")
    assert cli.main(["rollback", MODEL, "--track", "stable", "--reason", "p99 latency", "--actor", "eve"]) == 0
    assert alias(client, "stable") == versions[1]
    event = history.events(MODEL)[-1]
    assert (event.kind, event.from_version, event.to_version, event.reason) == (
        "rollback",
        *versions[2:0:-1],
        "p99 latency",
    )

    assert rollback(MODEL, "stable").to_version == versions[0]  # a second rollback unwinds one more promotion
    assert alias(client, "stable") == versions[0]
    capsys.readouterr()
    assert cli.main(["rollback", MODEL, "--track", "stable"]) == 1  # the first holder had nothing before it
    assert "nothing to roll back to" in capsys.readouterr().err and alias(client, "stable") == versions[0]

    client.set_registered_model_alias(MODEL, "stable", versions[2])  # moved outside Strata
    with pytest.raises(ReleaseError, match="moved outside Strata"):
        rollback(MODEL, "stable")


def test_concurrent_promotions_of_one_alias_do_not_interleave(client, strata_home):
    holder = add_version(client, 1.0)
    promote(MODEL, holder, "fast")
    a, b = add_version(client, 0.9), add_version(client, 0.8)
    # Whichever process takes the lock first waits there until `release` exists; the other must meet the lock.
    release = strata_home / "release"
    hold = f"promotion:hold-lock={release}"
    procs = [strata("promote", MODEL, v, "--to", "fast", failpoint=hold) for v in (a, b)]
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    assert winner.poll() is None, "the winner holds the lock until the test releases it"
    assert loser.returncode == 1
    message = " ".join(loser.stderr.read().split())
    assert f"another promotion of {MODEL}@fast is in progress (pid {winner.pid})" in message

    release.touch()
    assert winner.wait(timeout=120) == 0, winner.stderr.read()
    moved = [e for e in history.events(MODEL) if e.to_version in (a, b)]
    assert len(moved) == 1 and moved[0].status == "done" and alias(client, "fast") == moved[0].to_version


def test_promotion_refuses_if_the_alias_moved_while_it_checked_its_gates(client, strata_home):
    first = add_version(client, 1.0)
    promote(MODEL, first, "fast")
    slow, quick = add_version(client, 0.9), add_version(client, 0.8)
    go = strata_home / "go"
    proc = strata("promote", MODEL, slow, "--to", "fast", failpoint=f"promotion:after-gates={go}")
    deadline = time.monotonic() + 60
    while not (strata_home / "go.waiting").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)  # until it has read its gates
    assert (strata_home / "go.waiting").exists(), proc.stderr.read() if proc.poll() is not None else "no gates read"
    promote(MODEL, quick, "fast")  # this one moves the alias while `proc` waits between gates and lock
    go.touch()
    assert proc.wait(timeout=120) == 1
    assert f"moved from {first} to {quick}" in " ".join(proc.stderr.read().split())
    assert alias(client, "fast") == quick and [e.to_version for e in history.events(MODEL)] == [first, quick]


@pytest.mark.parametrize("point", ["after-alias", "before-alias"])
def test_a_killed_promotion_leaves_alias_and_history_consistent(client, point):
    holder, candidate = add_version(client, 1.0), add_version(client, 0.9)
    promote(MODEL, holder, "fast")
    proc = strata("promote", MODEL, candidate, "--to", "fast", failpoint=f"promotion:{point}")
    assert proc.wait(timeout=120) == -9, proc.stderr.read()  # SIGKILL: a real crash
    assert stored_events(client, MODEL)[-1].status == "pending"

    event = history.events(MODEL)[-1]  # reading history reconciles the dead process's event
    if point == "after-alias":
        assert alias(client, "fast") == candidate and event.status == "done"
        assert client.get_model_version(MODEL, candidate).tags["strata.release.fast"].startswith("promoted")
    else:
        assert alias(client, "fast") == holder and event.status == "aborted"
        assert promote(MODEL, candidate, "fast").passed  # the kill left no lock behind
    assert [e.status for e in history.events(MODEL)][-1] == "done"


def test_a_killed_promotion_whose_replaced_version_was_deleted_since_still_reconciles(client):
    """The move's note goes on the version it replaced; one deleted before the reconcile must not block every later
    move of the alias (each reconciles first)."""
    holder, candidate, later = add_version(client, 1.0), add_version(client, 0.9), add_version(client, 0.8)
    promote(MODEL, holder, "fast")
    proc = strata("promote", MODEL, candidate, "--to", "fast", failpoint="promotion:after-alias")
    assert proc.wait(timeout=120) == -9, proc.stderr.read()
    client.delete_model_version(MODEL, holder)

    assert history.events(MODEL)[-1].status == "done"
    assert promote(MODEL, later, "fast").passed and alias(client, "fast") == later


def test_bad_input_is_a_clear_error_that_changes_nothing(client, capsys):
    v1 = add_version(client, 1.0)
    promote(MODEL, v1, "fast")
    before = client.get_registered_model(MODEL)
    cases = [
        (["promote", "no-such-model", "1", "--to", "fast"], "model: no registered model named 'no-such-model'"),
        (["promote", MODEL, "99", "--to", "fast"], "version: registered model 'release-test' has no version '99'"),
        (["promote", MODEL, "one", "--to", "fast"], "version:"),
        (["rollback", "no-such-model", "--track", "fast"], "model:"),
        (["history", "no-such-model"], "model:"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exit_:
        cli.main(["promote", MODEL, v1, "--to", "beta"])
    assert exit_.value.code == 2 and "--to: invalid choice: 'beta'" in capsys.readouterr().err
    with pytest.raises(ReleaseError, match="track: unknown track 'beta'"):
        promote(MODEL, v1, "beta")  # the Python API checks it too
    assert cli.main(["promote", MODEL, v1, "--to", "fast"]) == 1  # already there
    job = subprocess.run(  # the `ray job submit` entrypoint is the same command
        [sys.executable, str(ROOT / "jobs" / "promote.py"), MODEL, "99", "--to", "fast"], capture_output=True, text=True
    )
    assert job.returncode == 2 and "has no version '99'" in job.stderr
    after = client.get_registered_model(MODEL)
    assert after.aliases == before.aliases and after.tags == before.tags


def test_conflict_error_names_the_lock_holder(client, strata_home):
    """In-process check of the lock message (the subprocess race above proves it across processes)."""
    from strata.release import locks

    v1 = add_version(client, 1.0)
    with locks.hold(locks.lock_path(MODEL, "fast")):
        with pytest.raises(PromotionConflict, match=rf"in progress \(pid {os.getpid()}\)"):
            promote(MODEL, v1, "fast")
    assert alias(client, "fast") is None and [e.kind for e in history.events(MODEL)] == []


def test_reading_history_never_aborts_a_running_promotion(client):
    """`strata history` settles only pending events whose process is gone: a live one holds the alias lock."""
    from strata.release import locks

    v1 = add_version(client, 1.0)
    with locks.hold(locks.lock_path(MODEL, "fast")):  # a promotion between its intent and its alias move
        history.append(
            client, MODEL, actor="x", alias="fast", from_version=None, to_version=v1, kind="promote", status="pending"
        )
        assert [e.status for e in history.events(MODEL)] == ["pending"]
    assert [e.status for e in history.events(MODEL)] == ["aborted"]  # its process "died" before moving the alias
