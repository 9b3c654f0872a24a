"""LoRA, QLoRA and full fine-tuning: only the adapter trains, merges are faithful, Ray runs learn and register."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors import safe_open
from safetensors.torch import load_file

from strata import cli, registry, tracking
from strata.config import ConfigError, FinetuneConfig, LoraSettings, OptimConfig
from strata.models.adapters import ADAPTER_DIR, merged_model, save_trained, trainable_model
from strata.models.quantized_experts import QuantizedExpertWeight
from strata.paths import exists
from strata.train.finetune import run_finetuning
from strata.train.trainer import make_optimizer

CPU = torch.device("cpu")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
RECORDS = [{"prompt": f"Write function number {i}", "response": f"def f{i}():\n    return {i}\n"} for i in range(240)]


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> None:
    model.train()
    optimizer = make_optimizer(model, OptimConfig(lr=lr, warmup_steps=0, max_steps=10))
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_only_adapter_parameters_change(tiny_base, method):
    settings = LoraSettings(rank=4, dropout=0, target_parameters=["mlp.experts.gate_up_proj"])
    model = trainable_model(str(tiny_base), method, settings, CPU)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedExpertWeight)]
    assert len(quantized) == (4 if method == "qlora" else 0)  # QLoRA's experts are NF4 too (2 layers, 2 each)
    # state_dict() is the canonical form of 4-bit weights (bitsandbytes may repack them for CPU kernels).
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model)
    after = model.state_dict()
    base_keys = [k for k in before if "lora_" not in k]
    lora_b = [k for k in before if "lora_B" in k]
    assert base_keys and lora_b
    assert all(torch.equal(before[k], after[k]) for k in base_keys), "a frozen base weight changed"
    assert all(not torch.equal(before[k], after[k]) for k in lora_b), "an adapter did not train"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_model_matches_base_plus_adapter(tiny_base, tmp_path, method):
    settings = LoraSettings(rank=4, dropout=0, target_parameters=EXPERTS)
    model = trainable_model(str(tiny_base), method, settings, CPU)
    train_steps(model, lr=3e-3)
    save_trained(model, tmp_path, method)
    ids = torch.randint(5, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        # a resumed run reloads the adapter onto a freshly quantised base: it must compute exactly the same
        resumed = trainable_model(str(tiny_base), method, settings, CPU, adapter_dir=str(tmp_path / ADAPTER_DIR))
        assert torch.equal(resumed.eval()(input_ids=ids).logits, expected)
        got = merged_model(str(tiny_base), method, str(tmp_path / ADAPTER_DIR)).eval()(input_ids=ids).logits
    if method == "lora":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:
        # CPU 4-bit kernels compute in bf16, and a tiny difference can flip a token's top-k expert choice,
        # so QLoRA is held to agreement on the whole, not per element.
        assert (got - expected).abs().median() < 0.02
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_checkpoint_holds_the_adapter_only(tiny_base, tmp_path):
    model = trainable_model(str(tiny_base), "lora", LoraSettings(rank=4), CPU)
    save_trained(model, tmp_path, "lora")
    with safe_open(tmp_path / ADAPTER_DIR / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)


def finetune_config(base_uri: str, method: str, train_file: Path, max_steps: int, **extra) -> FinetuneConfig:
    return FinetuneConfig.model_validate(
        {
            "base_model": base_uri,
            "method": method,
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train_file": str(train_file), "eval_fraction": 0.15, "max_seq_len": 64},
            "optim": {
                "lr": 1e-2,
                "warmup_steps": 2,
                "max_steps": max_steps,
                "micro_batch_size": 4,
                "global_batch_size": 8,
            },
            "checkpoint": {"every_steps": 10, "keep_last": 2},
            "scaling": {"num_workers": 2},
            "tracking": {
                "experiment": "ft-test",
                "registered_model": "strata-test-sft",
                "log_every_steps": 5,
            },
            "sample_prompts": ["Write function number 7"],
            "max_new_tokens": 8,
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("models:/strata-test-base@nope", r"base_model: models:/strata-test-base@nope: .*nope"),
        ("models:/no-such-model/1", r"base_model: models:/no-such-model/1: "),
        ("models:/strata-test-base", r"base_model: models:/strata-test-base: name a version, an alias or latest"),
    ],
)
def test_a_base_the_registry_lacks_is_a_config_error_naming_base_model(
    registered_base, strata_home, base, message, capsys
):
    """Before any Ray work: the CLI exits 2 with the field, not an MLflow traceback."""
    train_file = strata_home / "sft.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config = strata_home / "job.yaml"
    config.write_text(yaml.safe_dump(finetune_config(base, "lora", train_file, max_steps=4).model_dump(mode="json")))
    with pytest.raises(ConfigError, match=message):
        run_finetuning(finetune_config(base, "lora", train_file, max_steps=4))
    assert cli.main(["finetune", "--config", str(config)]) == 2
    assert "base_model: " in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(("method", "storage"), [("lora", "s3"), ("qlora", "local")])
def test_finetuning_on_ray_lowers_eval_loss_and_registers(
    ray_session, object_store, registered_base, tiny_base, strata_home, method, storage
):
    """Two workers, so QLoRA's quantised experts also go through DDP's start-up broadcast (keep_out_of_ddp). The
    LoRA run keeps everything it reads and writes in object storage: the base model's registered files, the training
    file, the checkpoints and the run's MLflow artifacts (the adapter, samples, config) are s3:// URIs, as on a
    cluster without a shared disk."""
    train_file = strata_home / "sft.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + '{"prompt": "broken"}\n')
    cfg = finetune_config(registered_base, method, train_file, max_steps=20)
    base_version = "1"
    if storage == "s3":
        prefix = f"{object_store}/{strata_home.name}"
        with tracking.start_run("bases-on-s3", "tiny-base", {}, artifact_location=f"{prefix}/mlflow") as base_run:
            base_version = str(registry.log_model(tiny_base, "strata-test-base").version)  # its files on s3://
        assert base_run.info.artifact_uri.startswith(f"{prefix}/mlflow/bases-on-s3/")
        boto3.client("s3").upload_file(str(train_file), "strata-test", f"{strata_home.name}/sft.jsonl")
        train_file.unlink()
        tree = cfg.model_dump(mode="json")
        tree["base_model"] = f"models:/strata-test-base/{base_version}"
        tree["data"]["train_file"] = f"{prefix}/sft.jsonl"
        tree["checkpoint"]["storage_path"] = f"{prefix}/runs"
        tree["tracking"]["artifact_location"] = f"{prefix}/mlflow"
        cfg = FinetuneConfig.model_validate(tree)
    result = run_finetuning(cfg)

    assert result.run_name == f"{method}-r8-lr1e-2-sft"
    assert result.bad_records == 1
    assert result.metrics["eval_loss"] < result.first_eval_loss - 0.5, (
        result.first_eval_loss,
        result.metrics,
    )
    client = MlflowClient(tracking.tracking_uri())
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [5, 10, 15, 20], key
    assert [m.step for m in client.get_metric_history(result.run_id, "eval_loss")] == [0, 10, 20]
    run = client.get_run(result.run_id)
    assert int(run.data.params["trainable_params"]) < 0.02 * int(run.data.params["total_params"])
    assert run.data.metrics["bad_records"] == 1
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "samples.json", "adapter", "bad_records.txt"} <= artifacts
    assert_shown_as_training_in_the_ui(client, run)

    checkpoint = f"s3://{result.checkpoint_path}" if storage == "s3" else result.checkpoint_path
    assert checkpoint.startswith(cfg.checkpoint.resolved_storage_path)
    assert exists(f"{checkpoint}/{ADAPTER_DIR}/adapter_model.safetensors")
    assert not exists(f"{checkpoint}/model")  # the frozen base is not checkpointed
    if storage == "s3":
        assert run.info.artifact_uri.startswith(f"{cfg.tracking.artifact_location}/ft-test/")

    version = client.get_model_version("strata-test-sft", result.registered_version)
    assert version.tags["base_model"] == "strata-test-base" and version.tags["base_model_version"] == base_version
    assert version.tags["strata.method"] == method and len(version.tags["strata.dataset_hash"]) == 16
    merged_dir = registry.download_model(f"models:/strata-test-sft/{result.registered_version}")
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain, dequantised model anyone can load


def assert_shown_as_training_in_the_ui(client: MlflowClient, run) -> None:
    """What the MLflow UI needs: the experiment's kind, the data as datasets, and system metrics."""
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"
    datasets = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in run.inputs.dataset_inputs}
    assert {c: d.name for c, d in datasets.items()} == {"training": "sft-train", "eval": "sft-eval"}
    assert {d.digest for d in datasets.values()} == {run.data.tags["strata.dataset_hash"]}
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage"):
        assert f"system/{key}" in run.data.metrics, key


@pytest.mark.slow
def test_full_finetuning_on_ray_trains_every_weight_and_registers(ray_session, registered_base, tiny_base, strata_home):
    train_file = strata_home / "sft.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = finetune_config(
        registered_base,
        "full",
        train_file,
        max_steps=10,
        sample_prompts=[],  # no generation: this test is about what trains and what is saved
        optim={"lr": 3e-3, "warmup_steps": 2, "max_steps": 10, "micro_batch_size": 4, "global_batch_size": 8},
    )
    result = run_finetuning(cfg)

    assert result.run_name == "full-lr3e-3-sft"
    assert result.metrics["eval_loss"] < result.first_eval_loss - 0.5, (result.first_eval_loss, result.metrics)
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(result.run_id)
    assert run.data.params["trainable_params"] == run.data.params["total_params"]
    assert "adapter" not in {a.path for a in client.list_artifacts(result.run_id)}
    assert_shown_as_training_in_the_ui(client, run)

    checkpoint = Path(result.checkpoint_path)
    assert not (checkpoint / ADAPTER_DIR).exists()
    trained = load_file(checkpoint / "model" / "model.safetensors")  # the whole model is checkpointed
    base = load_file(tiny_base / "model.safetensors")
    assert trained.keys() == base.keys()
    assert [k for k in base if torch.equal(trained[k], base[k])] == [], "weights that did not train"

    version = client.get_model_version("strata-test-sft", result.registered_version)
    assert version.tags["strata.method"] == "full" and version.run_id == result.run_id
    registered = load_file(registry.download_model(f"models:/strata-test-sft/{version.version}") / "model.safetensors")
    assert registered.keys() == trained.keys() and all(torch.equal(registered[k], trained[k]) for k in trained)


@pytest.mark.slow
def test_finetuning_resumes_by_run_name_on_the_base_version_it_began_with(
    ray_session, registered_base, tiny_base, strata_home
):
    """The base is `@stable`; the alias moves to a new version between the two runs, and the resumed run goes on
    from (and records) the version its adapter was trained against."""
    train_file = strata_home / "sft.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    quick = dict(run_name="resume-me", sample_prompts=[])  # no generation: this test is about the steps
    first = run_finetuning(finetune_config(registered_base, "lora", train_file, max_steps=10, **quick))
    with tracking.start_run("bases", "tiny-base", {}):
        moved_to = registry.log_model(tiny_base, "strata-test-base").version
    registry.set_alias("strata-test-base", "stable", moved_to)
    second = run_finetuning(finetune_config(registered_base, "lora", train_file, max_steps=20, **quick))
    assert second.run_id == first.run_id
    client = MlflowClient(tracking.tracking_uri())
    steps = [m.step for m in client.get_metric_history(first.run_id, "loss")]
    assert sorted(steps) == [5, 10, 15, 20]  # steps 1-10 were not trained again
    registered = client.get_model_version("strata-test-sft", second.registered_version)
    assert str(moved_to) != "1" and registered.tags["base_model_version"] == "1"
