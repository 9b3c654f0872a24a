"""The fine-tuning workbench as a user sees it: the MLflow UI (started by `strata ui`) in a real headless Chromium,
on runs logged with the same tracking helpers the drivers call; and what those helpers record."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Page, expect, sync_playwright
from transformers import AutoTokenizer

from strata import registry, tracking
from strata.config import SFTDataConfig
from strata.data.sft import load_sft_dataset
from strata.train.callbacks import MlflowMetricsCallback

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "strata-finetune"
MODEL = "strata-ui-sft"
WAIT_S = 120  # an upper bound for slow machines, never a measure: every wait ends as soon as its condition holds
# Two runs on different data, as a user compares them: name -> (SFT records, eval_loss at steps 0, 10, 20).
RUNS = {
    "lora-r8-functions": (
        [{"prompt": f"Write f{i}", "response": f"def f{i}(): return {i}"} for i in range(60)],
        [4.1, 2.9, 2.2],
    ),
    "lora-r8-classes": (
        [{"prompt": f"Write class C{i}", "response": f"class C{i}: pass"} for i in range(60)],
        [4.1, 3.3, 2.8],
    ),
}


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed here when missing; playwright's own browser download needs the internet."""
    if not shutil.which("chromium"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail("the MLflow UI tests need Debian's chromium: `apt-get update && apt-get install -y chromium`")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                pytest.fail(f"`{' '.join(command)}` failed, so the UI cannot be tested:\n{done.stderr[-3000:]}")
    return shutil.which("chromium")


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {WAIT_S} s")
        time.sleep(0.5)
    return result


def log_finetuning_run(run_name: str, records: list[dict], eval_losses: list[float], tiny_base: Path, tmp: Path):
    """What `run_finetuning` records, without the training: the same helpers, the same keys and tags."""
    train_file = tmp / f"{run_name}.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    dataset = load_sft_dataset(SFTDataConfig(train_file=str(train_file), eval_fraction=0.2), tokenizer)
    tags = {"strata.job": "finetune", "strata.method": "lora", "strata.dataset_hash": dataset.dataset_hash}
    params = {"method": "lora", "data.train_file": str(train_file)}
    with tracking.start_run(EXPERIMENT, run_name, params, tags=tags, kind=tracking.FINETUNING) as run:
        tracking.log_sft_data(dataset)
        metrics = MlflowMetricsCallback(mlflow.get_tracking_uri(), run.info.run_id)
        for step, loss in zip((0, 10, 20), eval_losses, strict=True):
            metrics.after_report(None, [{"step": step, "eval_loss": loss}], None)
        client = MlflowClient()
        wait_for(
            lambda: "system/cpu_utilization_percentage" in client.get_run(run.info.run_id).data.metrics,
            "system metrics",
        )
        version = registry.log_model(tiny_base, MODEL, tags={"strata.run_name": run_name, **tags})
    return run.info.run_id, version.version


@pytest.fixture(scope="module")
def store(tiny_base, tmp_path_factory):
    """A fresh store with two fine-tuning runs, each with a registered version."""
    root = tmp_path_factory.mktemp("workbench")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STRATA_HOME", str(root))
        for exported in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.delenv(exported, raising=False)
        uri = tracking.use_store()
        runs = {name: log_finetuning_run(name, *spec, tiny_base, root) for name, spec in RUNS.items()}
        yield uri, MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id, runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def runs_link(url: str, experiment_id: str) -> str:
    return f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory):
    """`strata ui` on the store, from a shell whose PATH has no venv in it (as `make ui` runs it)."""
    uri, _, _ = store
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "strata-ui.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": os.defpath}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), env.get("PYTHONPATH", "")])
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "ui", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: teardown stops the server and its workers
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or healthy(url), "MLflow UI")
        if server.poll() is not None:
            pytest.fail(f"`strata ui` exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        yield url, log.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tmp_path_factory, request):
    """A page 1600 px wide (the runs table shows its Dataset column) that leaves a screenshot behind."""
    expect.set_options(timeout=WAIT_S * 1000)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    yield page
    page.screenshot(path=tmp_path_factory.getbasetemp() / f"{request.node.name}.png")
    page.close()


# --- what the tracking helpers record --------------------------------------------------------------------


def test_experiments_are_tagged_with_their_kind_also_when_made_before(strata_home):
    tracking.use_store()
    client = MlflowClient()
    old = client.create_experiment("made-before")  # as Strata made experiments before they had a kind
    assert tracking.ensure_experiment("made-before", tracking.FINETUNING) == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"
    new = tracking.ensure_experiment("pretraining", tracking.PRETRAINING)
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracking.ensure_experiment("made-before", tracking.PRETRAINING)  # a kind once set is the user's to change
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


def test_pretraining_data_is_logged_as_a_dataset(strata_home, small_data):
    _, data = small_data
    tracking.use_store()
    with tracking.start_run("pretrain", "packed", {}, kind=tracking.PRETRAINING) as run:
        tracking.log_packed_data("stdlib", data)
    (logged,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "stdlib" and len(logged.dataset.digest) == 16
    assert json.loads(logged.dataset.source) == {"uri": data.packed_dir}
    assert json.loads(logged.dataset.schema)["mlflow_colspec"][0]["name"] == "input_ids"
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "training"


def test_finetuning_runs_carry_datasets_system_metrics_and_versions(store):
    _, experiment_id, runs = store
    client = MlflowClient()
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"
    digests = set()
    for name, (run_id, version) in runs.items():
        run = client.get_run(run_id)
        inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in run.inputs.dataset_inputs}
        assert {c: d.name for c, d in inputs.items()} == {"training": f"{name}-train", "eval": f"{name}-eval"}
        assert inputs["training"].digest == inputs["eval"].digest == run.data.tags["strata.dataset_hash"]
        assert json.loads(inputs["training"].source)["uri"].endswith(f"{name}.jsonl")
        assert [c["name"] for c in json.loads(inputs["training"].schema)["mlflow_colspec"]] == ["prompt", "response"]
        digests.add(inputs["training"].digest)
        for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            assert f"system/{key}" in run.data.metrics, key
        assert client.get_model_version(MODEL, version).run_id == run_id
    assert len(digests) == 2  # two runs on different data are told apart


def test_registered_versions_pin_their_requirements_to_the_installed_versions(store):
    _, _, runs = store
    _, version = next(iter(runs.values()))
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{MODEL}/{version}")).read_text().split()
    assert all("==" in line for line in requirements), requirements
    pins = dict(line.split("==") for line in requirements)
    assert {"torch", "transformers", "tokenizers", "mlflow"} <= pins.keys(), requirements
    for name, pinned in pins.items():
        assert pinned == metadata.version(name).split("+")[0], (name, pinned)


def test_strata_ui_runs_the_mlflow_of_its_own_python_and_links_the_training_runs(ui, store):
    url, printed = ui  # started with no venv on PATH (see the `ui` fixture)
    _, experiment_id, _ = store
    assert healthy(url)
    assert f"{EXPERIMENT}: {runs_link(url, experiment_id)}" in printed


# --- what a user sees in the browser ----------------------------------------------------------------------


def test_printed_link_opens_the_runs_with_their_datasets(ui, store, page: Page):
    url, printed = ui
    _, experiment_id, runs = store
    link = runs_link(url, experiment_id)
    assert link in printed
    page.goto(link)
    for name in runs:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
        expect(page.get_by_text(f"{name}-train").first).to_be_visible()  # the Dataset column


def test_chart_view_compares_eval_loss(ui, store, page: Page):
    url, _ = ui
    _, experiment_id, runs = store
    page.goto(f"{runs_link(url, experiment_id)}&compareRunsMode=CHART")
    chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(has_text="eval_loss")
    expect(chart.locator(".js-plotly-plot")).to_be_visible()  # drawn, not still loading
    for name in runs:
        expect(chart.get_by_text(f"{name} (eval_loss)")).to_be_visible()  # one line a run, in the legend
    expect(page.get_by_text("System metrics").first).to_be_visible()


def test_registered_version_names_its_run(ui, store, page: Page):
    url, _ = ui
    _, _, runs = store
    name, (_, version) = next(iter(runs.items()))
    page.goto(f"{url}/#/models/{MODEL}/versions/{version}")
    expect(page.get_by_text(f"Version {version}").first).to_be_visible()
    expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()  # Source Run
