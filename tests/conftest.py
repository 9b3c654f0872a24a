"""Shared fixtures: one real local Ray instance per test session, and small data to train on."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

# The node cache of registered model versions (`strata.paths.cache_dir`), one per session: set before Ray starts,
# so every worker, trial and replica the tests start reads it, and the tests never fill the user's ~/.cache.
os.environ["STRATA_CACHE"] = tempfile.mkdtemp(prefix="strata-cache-")
atexit.register(shutil.rmtree, os.environ["STRATA_CACHE"], ignore_errors=True)
os.environ["STRATA_ADAPTER_RETRY_S"] = "2"  # a group replica tries a refused adapter again this soon (default 60)

# A small, fixed slice of the standard library: enough text to learn from, quick to tokenize.
SMALL_CORPUS_FILES = 120


@pytest.fixture(scope="session")
def object_store() -> Iterator[str]:
    """A local S3-compatible server (moto's) with one bucket; its endpoint and test credentials are exported
    before Ray starts, so every worker reaches it the way nodes reach S3. Yields `s3://BUCKET`."""
    import time

    import boto3
    from raycluster import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    deadline = time.time() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="strata-test")
            break
        except Exception:
            assert server.poll() is None and time.time() < deadline, "the local S3 server did not start"
            time.sleep(0.5)
    yield "s3://strata-test"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session(object_store):
    """A fresh local Ray instance (never an existing cluster), shut down at the end of the session."""
    import ray

    from strata.runtime import strata_runtime_env

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=True, runtime_env=strata_runtime_env())
    yield ray
    ray.shutdown()


def isolate_home(env: pytest.MonkeyPatch, home: Path) -> Path:
    """STRATA_HOME at `home`, so runs, data and the MLflow store stay apart; `use_store` exports the MLflow URIs,
    so they are unset here and restored with the rest of `env` at teardown."""
    env.setenv("STRATA_HOME", str(home))
    for exported in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.delenv(exported, raising=False)
    return home


@pytest.fixture
def strata_home(tmp_path, monkeypatch) -> Path:
    """An empty STRATA_HOME for one test, which also runs in it."""
    monkeypatch.chdir(tmp_path)
    return isolate_home(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def module_home(tmp_path_factory) -> Iterator[Path]:
    """An empty STRATA_HOME shared by one module's tests (for its long-lived Serve application and store)."""
    with pytest.MonkeyPatch.context() as env:
        yield isolate_home(env, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """Corpus, tokenizer and packed sequences of a slice of the stdlib, built once per session."""
    from strata.config import DataConfig
    from strata.data.prepare import prepare_data

    data_dir = tmp_path_factory.mktemp("data")
    cfg = DataConfig(data_dir=str(data_dir), max_files=SMALL_CORPUS_FILES, vocab_size=1024, seq_len=64)
    return cfg, prepare_data(cfg)


@pytest.fixture(scope="session")
def tiny_base(small_data, tmp_path_factory) -> Path:
    """A freshly initialised `tiny` MoE with the small tokenizer, saved as a transformers directory."""
    from strata.data.tokenizer import load_tokenizer, stop_token_ids
    from strata.models.presets import build_model

    tokenizer = load_tokenizer(small_data[1].tokenizer_dir)
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    directory = tmp_path_factory.mktemp("tiny-base")
    model = build_model("tiny", len(tokenizer), special, seed=0)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)  # EOS and end of turn, as Strata's exports stop
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def registered_base(strata_home, tiny_base) -> str:
    """The tiny base registered in this test's MLflow store as `strata-test-base@stable`, as fine-tunes name a base."""
    from strata import registry, tracking

    tracking.use_store()
    with tracking.start_run("bases", "tiny-base", {}):
        version = registry.log_model(tiny_base, "strata-test-base")
    registry.set_alias("strata-test-base", "stable", version.version)
    return "models:/strata-test-base@stable"


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's prometheus package (prometheus + promtool), installed by the test set-up if missing."""
    if shutil.which("promtool") is None:
        install = ["apt-get", "install", "-y", "-q", "prometheus"]
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            done = subprocess.run(install, capture_output=True, text=True)
            assert done.returncode == 0, f"could not install prometheus: {done.stderr[-2000:]}"
    return shutil.which("promtool")
