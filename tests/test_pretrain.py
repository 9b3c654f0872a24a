"""Pretraining on a real local Ray: checkpoints in storage, MLflow records and registry, resume by run name."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from strata import tracking
from strata.config import PretrainConfig
from strata.config.tune import REPORTED_METRICS
from strata.registry import generate_text
from strata.train.pretrain import run_pretraining
from strata.train.pretrain_loop import MODEL_DIR, TRAIN_STATE

pytestmark = pytest.mark.slow


def small_config(data_cfg, max_steps: int) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "run_name": "pretrain-test",
            "model": {"name": "tiny"},
            "data": data_cfg.model_dump(),
            "optim": {
                "lr": 3e-3,
                "warmup_steps": 3,
                "max_steps": max_steps,
                "micro_batch_size": 4,
                "global_batch_size": 16,
            },
            "checkpoint": {"every_steps": 10, "keep_last": 2, "storage_path": "runs"},
            "scaling": {"num_workers": 2},
            "tracking": {
                "experiment": "pretrain-test",
                "registered_model": "strata-test",
                "log_every_steps": 5,
            },
        }
    )


def test_pretraining_checkpoints_tracks_registers_and_resumes(ray_session, strata_home, small_data):
    data_cfg, _ = small_data
    result = run_pretraining(small_config(data_cfg, max_steps=30))

    # Checkpoints: every 10 steps into the run's storage path, only the last `keep_last` kept.
    run_dir = strata_home / "runs" / "pretrain-test"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_0000020",
        "checkpoint_0000030",
    ]
    latest = run_dir / "checkpoint_0000030"
    assert (latest / TRAIN_STATE).exists() and (latest / MODEL_DIR / "config.json").exists()
    assert "max_steps: 30" in (latest / "config.yaml").read_text()

    # MLflow: params, step metrics, artifacts, and a registered version with tags.
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(result.run_id)
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["model.name"] == "tiny"
    for key in REPORTED_METRICS["pretrain"]:  # what a sweep may optimise
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [5, 10, 15, 20, 25, 30], key
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns: seeded, so this margin is stable
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "tokenizer", "expert_load.json"} <= artifacts
    load = json.loads((latest / "expert_load.json").read_text())
    assert len(load["tokens_per_expert"]) == 2 and len(load["tokens_per_expert"][0]) == 8  # layers x experts
    assert sum(load["tokens_per_expert"][0]) == 8 * 64 * 2  # rank 0's 8 sequences of the step, each token to 2
    version = client.get_model_version("strata-test", result.registered_version)
    assert version.tags["strata.run_name"] == "pretrain-test" and version.run_id == result.run_id
    # Lineage for the promotion gates: trained from scratch, on this packed data (on the run and the version).
    digest = tracking.packed_digest(small_data[1])
    for tags in (version.tags, run.data.tags):
        assert tags["base_model"] == "scratch:tiny" and tags["strata.dataset_hash"] == digest

    # The final model is a plain transformers directory that loads and generates.
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert len(tokenizer(generate_text(model, tokenizer, "def main(", max_new_tokens=8))["input_ids"]) > 0

    # Resume by run name: continues at step 30 (no step is trained twice) in the same MLflow run.
    resumed = run_pretraining(small_config(data_cfg, max_steps=40))
    assert resumed.run_id == result.run_id
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert Counter(steps) == Counter([5, 10, 15, 20, 25, 30, 35, 40])
    assert resumed.metrics["step"] == 40
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_0000030",
        "checkpoint_0000040",
    ]
    assert int(resumed.registered_version) == int(result.registered_version) + 1
    resumed_run = client.get_run(result.run_id).data  # the first start's params, the values now in effect as tags
    assert resumed_run.params["optim.max_steps"] == "30"
    assert resumed_run.tags[tracking.PARAM_TAG + "optim.max_steps"] == "40"

    # Re-running a finished run trains nothing and registers nothing new.
    again = run_pretraining(small_config(data_cfg, max_steps=40))
    assert again.registered_version == resumed.registered_version
    assert len(client.get_metric_history(result.run_id, "loss")) == 8
