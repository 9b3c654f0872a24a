"""The node cache of registered versions (`registry.cached_version`), on a real sqlite store: one download per
version, never an older model's files for a name registered again,
nothing cached from a download that failed.

Versions are made cheaply (a run that logged one text file, registered as a version's source): the cache reads
nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.tracking import MlflowClient

from strata import paths, registry, tracking

ROOT = Path(__file__).resolve().parents[1]
MODEL = "cache-test"


@pytest.fixture
def cache(strata_home, tmp_path, monkeypatch) -> Path:
    """This test's own cache and store."""
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    tracking.use_store()
    return tmp_path / "cache"


def add_version(weights: str) -> str:
    """A registered version of MODEL whose files are one `weights.txt`; `models:/MODEL/VERSION`."""
    client = MlflowClient()
    run = client.create_run(tracking.ensure_experiment("cache-test"))
    client.log_text(run.info.run_id, weights, "model/weights.txt")
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id)
    return f"models:/{MODEL}/{version.version}"


def stored_files(model_uri: str) -> Path:
    """The directory in the store's artifacts that a version's source points to."""
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    return Path(urlparse(MlflowClient().get_model_version(name, version).source).path)


def test_a_version_is_downloaded_once_and_then_read_from_the_cache(cache):
    uri = add_version("v1 weights")
    first = registry.cached_version(uri)
    assert first.is_relative_to(cache) and (first / "weights.txt").read_text() == "v1 weights"
    shutil.rmtree(stored_files(uri))  # the store lost the files: only the cache has them now
    assert registry.cached_version(uri) == first
    assert (first / "weights.txt").read_text() == "v1 weights"
    assert sorted(p.name for p in first.parent.iterdir() if not p.name.endswith((".lock", ".files.json"))) == [
        first.name
    ]


def test_a_model_registered_again_under_its_old_name_never_serves_the_old_files(cache):
    uri = add_version("old weights")
    old = registry.cached_version(uri)
    MlflowClient().delete_registered_model(MODEL)  # as a store made again: the same name, version 1 again
    assert add_version("new weights") == uri

    new = registry.cached_version(uri)
    assert new != old and (new / "weights.txt").read_text() == "new weights"


def test_a_download_that_fails_leaves_nothing_cached_and_the_next_one_is_whole(cache):
    uri = add_version("whole weights")
    weights = stored_files(uri) / "weights.txt"
    kept = weights.with_name("kept")
    weights.rename(kept)
    weights.symlink_to(weights.with_name("gone"))  # a real fault: the store lists a file it cannot read
    with pytest.raises(OSError):
        registry.cached_version(uri)
    versions = cache / "models" / MODEL
    assert [p.name for p in versions.iterdir() if not p.name.endswith(".lock")] == []

    weights.unlink()
    kept.rename(weights)
    assert (registry.cached_version(uri) / "weights.txt").read_text() == "whole weights"


def test_a_cached_version_whose_files_changed_is_downloaded_again_never_loaded(cache, caplog):
    """Real faults on the cache's own files: one truncated (a full disk), one deleted, one added by hand. Each read
    after finds it out from the sizes recorded at download and fetches the version again; the store is untouched."""
    client = MlflowClient()
    run = client.create_run(tracking.ensure_experiment("cache-test"))
    client.log_text(run.info.run_id, "the weights", "model/weights.txt")
    client.log_text(run.info.run_id, '{"layers": 2}', "model/config.json")
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id)
    uri = f"models:/{MODEL}/{version.version}"
    cached = registry.cached_version(uri)
    assert {p.name for p in cached.iterdir()} == {"weights.txt", "config.json"}

    for fault, seen in (
        (lambda: os.truncate(cached / "weights.txt", 3), "resized: weights.txt"),
        (lambda: (cached / "config.json").unlink(), "missing: config.json"),
        (lambda: (cached / "adapter_config.json").write_text("{}"), "added: adapter_config.json"),
    ):
        fault()
        caplog.clear()
        assert registry.cached_version(uri) == cached
        assert (cached / "weights.txt").read_text() == "the weights"
        assert {p.name for p in cached.iterdir()} == {"weights.txt", "config.json"}, seen
        assert seen in caplog.text and "downloading it again" in caplog.text
    caplog.clear()
    assert registry.cached_version(uri) == cached and "downloading it again" not in caplog.text  # whole: read as is
    assert [p.name for p in cached.parent.iterdir() if p.name.endswith(".partial")] == []


def test_a_download_killed_mid_way_is_cleared_by_the_next_one(cache):
    """A process killed with the partial download on disk (SIGKILL: no cleanup of its own runs) and its lock
    dropped by the kernel; the next download clears what it left and never takes it for cached."""
    uri = add_version("weights after the crash")
    script = (
        "import os, signal, mlflow.artifacts\n"
        "from strata import registry, tracking\n"
        "tracking.use_store()\n"
        "def killed(artifact_uri, dst_path):\n"
        "    os.makedirs(dst_path)\n"
        "    open(os.path.join(dst_path, 'weights.txt'), 'w').write('half')\n"
        "    open(os.path.join(dst_path, 'stale.bin'), 'w').write('from the killed download')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "mlflow.artifacts.download_artifacts = killed\n"
        f"registry.cached_version({uri!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    crashed = subprocess.run([sys.executable, "-c", script], env=env, cwd=paths.home(), timeout=120)
    assert crashed.returncode == -9
    left = [p for p in (cache / "models" / MODEL).iterdir() if p.name.endswith(".partial")]
    assert left and (left[0] / "weights.txt").read_text() == "half"

    cached = registry.cached_version(uri)
    assert sorted(p.name for p in cached.iterdir()) == ["weights.txt"]
    assert (cached / "weights.txt").read_text() == "weights after the crash"
    assert not left[0].exists()


def test_processes_on_one_node_download_a_version_once(cache, tmp_path):
    """Three processes ask for the same version at once: one downloads (slowly), the others wait and read it."""
    uri = add_version("shared weights")
    log = tmp_path / "downloads.log"
    script = (
        "import os, time, mlflow.artifacts\n"
        "from strata import registry, tracking\n"
        "tracking.use_store()\n"
        "download = mlflow.artifacts.download_artifacts\n"
        "def logged(artifact_uri, dst_path):\n"
        f"    open({str(log)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "    time.sleep(2)\n"
        "    return download(artifact_uri=artifact_uri, dst_path=dst_path)\n"
        "mlflow.artifacts.download_artifacts = logged\n"
        f"print(registry.cached_version({uri!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    command = [sys.executable, "-c", script]
    processes = [
        subprocess.Popen(command, env=env, cwd=paths.home(), stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outputs = {p.communicate(timeout=120)[0].strip() for p in processes}
    assert [p.returncode for p in processes] == [0, 0, 0]
    assert len(log.read_text().split()) == 1
    (cached,) = outputs
    assert (Path(cached) / "weights.txt").read_text() == "shared weights"


def test_generate_names_the_field_of_a_model_the_registry_does_not_have(cache, capsys):
    from strata import cli

    add_version("weights")
    assert cli.main(["generate", "--model", f"{MODEL}@stable", "--prompt", "def"]) == 2
    error = capsys.readouterr().err
    assert "--model" in error and f"models:/{MODEL}@stable" in error


def test_past_its_budget_a_download_evicts_versions_unused_for_an_hour_least_recent_first(cache, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE_MAX_GB", "0")  # every download finds the cache over budget
    old, recent = registry.cached_version(add_version("old")), registry.cached_version(add_version("recent"))
    two_hours_ago = time.time() - 2 * registry.EVICT_AFTER_IDLE_S
    os.utime(old, (two_hours_ago, two_hours_ago))

    newest = registry.cached_version(add_version("newest"))
    assert not old.exists() and recent.is_dir() and newest.is_dir()  # `recent`: read within the hour, so kept
    assert [p.name for p in (cache / "models" / MODEL).iterdir() if p.name.endswith(".partial")] == []

    os.utime(recent, (two_hours_ago, two_hours_ago))
    assert registry.cached_version(f"models:/{MODEL}/2") == recent  # a read marks it used again
    registry.cached_version(add_version("fourth"))
    assert recent.is_dir()
    assert (registry.cached_version(f"models:/{MODEL}/1") / "weights.txt").read_text() == "old"  # fetched again
