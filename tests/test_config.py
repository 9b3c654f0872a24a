"""A bad config fails before any Ray work starts, with a message naming the file and the field."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from strata.config import ConfigError, FinetuneConfig, PretrainConfig, ServeConfig, load_config
from strata.config.tune import load_tune_config
from strata.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain-tiny.yaml"


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def base_tree() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("config_file", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(config_file):
    if config_file.name.startswith("tune"):
        sweep, _ = load_tune_config(config_file)  # the sweep and its base job config together
        assert sweep.search_space
        return
    if config_file.name.startswith("canary"):
        from strata.config import CanaryConfig

        assert load_config(config_file, CanaryConfig).steps[-1] == 100
        return
    schema = FinetuneConfig if config_file.name.startswith("finetune") else PretrainConfig
    cfg = load_config(config_file, schema)
    assert cfg.grad_accum_steps >= 1


def readme_yaml_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [textwrap.dedent(block) for block in re.findall(r"^ *```yaml\n(.*?)^ *```", text, re.S | re.M)]


@pytest.mark.parametrize("example", readme_yaml_examples(), ids=lambda text: text.split(":")[0])
def test_readme_yaml_examples_are_valid(example, tmp_path):
    """Each YAML block in the README is validated as what it shows: a sweep, serve variants or a pretraining part."""
    tree = yaml.safe_load(example)
    if "search_space" in tree:
        shutil.copy(ROOT / "configs" / tree["base_config"], tmp_path)
        sweep, _ = load_tune_config(write(tmp_path, tree))
        assert set(sweep.search_space) == set(tree["search_space"])
    elif "variants" in tree:
        serve = ServeConfig.model_validate({"model_name": "strata-tiny", **tree})
        assert [v.name for v in serve.variants] == [v["name"] for v in tree["variants"]]
    else:  # a part of a pretraining config, shown on the cluster example
        job = yaml.safe_load((ROOT / "configs" / "pretrain-cluster.yaml").read_text())
        for section, fields in tree.items():
            job[section] = {**job.get(section, {}), **fields}
        PretrainConfig.model_validate(job)


def test_finetune_config_errors_name_the_field(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("base_model: ./no-such-model\nmethod: qlora\n")
    with pytest.raises(ConfigError, match=r"base_model: .*neither a preset"):
        load_config(path, FinetuneConfig)
    path.write_text("base_model: tiny\nmethod: dora\n")
    with pytest.raises(ConfigError, match=r"method: Input should be 'full', 'lora' or 'qlora'"):
        load_config(path, FinetuneConfig)
    path.write_text("base_model: tiny\nlora: {target_parameters: [mlp.experts.down_proj], dropout: 0.1}\n")
    with pytest.raises(ConfigError, match=r"lora: dropout must be 0 with target_parameters"):
        load_config(path, FinetuneConfig)
    derived = load_config(path, FinetuneConfig, ["lora.dropout=0", "optim.lr=2e-4", "lora.rank=16", "method=qlora"])
    assert derived.resolved_run_name == "qlora-r16-lr2e-4-stdlib-docstrings"


def test_object_store_inputs_are_checked_where_they_are_named(tmp_path, object_store):
    path = tmp_path / "ft.yaml"
    path.write_text(f"base_model: tiny\ndata: {{train_file: {object_store}/no-such-file.jsonl}}\n")
    with pytest.raises(ConfigError, match=r"data.train_file: .*no-such-file.jsonl' does not exist"):
        load_config(path, FinetuneConfig)
    with pytest.raises(ConfigError, match=r"data.publish_to: .*must be an object-store URI"):
        load_config(TINY, PretrainConfig, [f"data.publish_to={tmp_path}"])


def test_overrides_apply_dotted_keys_with_yaml_types():
    cfg = load_config(TINY, PretrainConfig, ["optim.lr=3e-4", "scaling.num_workers=1", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4
    assert cfg.scaling.num_workers == 1
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.grad_accum_steps == 4  # 32 / (8 x 1)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda t: t["optim"].update(lr=-1), "optim.lr", "greater than 0"),
        (lambda t: t["optim"].update(lrr=1), "optim.lrr", "unknown key"),
        (lambda t: t.update(extra_section={}), "extra_section", "unknown key"),
        (lambda t: t["optim"].update(max_steps="many"), "optim.max_steps", "valid integer"),
        (lambda t: t["data"].update(source_dir="/no/such/dir"), "data.source_dir", "does not exist"),
        (lambda t: t["model"].update(name="./missing-model"), "model.name", "neither a preset"),
        (lambda t: t["optim"].update(global_batch_size=30), "(top level)", "multiple of"),
        (lambda t: t.pop("run_name"), "run_name", "Field required"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, change, field, message):
    tree = base_tree()
    change(tree)
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_config(path, PretrainConfig)
    text = str(err.value)
    assert str(path) in text
    assert f"  {field}: " in text
    assert message in text


def test_missing_config_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", PretrainConfig)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(TINY, PretrainConfig, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lr: Input should be greater than 0"):
        load_config(TINY, PretrainConfig, ["optim.lr=-3"])


def test_cli_rejects_bad_config_before_starting_ray():
    """In a fresh interpreter: this session's own Ray may already be up, and must not make the test pass or fail."""
    script = (
        "import sys, ray\n"
        "from strata.cli import main\n"
        f"code = main(['pretrain', '--config', {str(TINY)!r}, '--set', 'optim.lr=-1'])\n"
        "print('exit', code, 'ray', ray.is_initialized())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "exit 2 ray False" in proc.stdout, proc.stdout + proc.stderr
    assert "optim.lr" in proc.stderr and str(TINY) in proc.stderr


def test_job_entrypoint_exits_nonzero_with_field_in_message(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/pretrain.py"),
            "--config",
            str(TINY),
            "--set",
            "scaling.num_workers=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "scaling.num_workers" in proc.stderr


def test_flatten_gives_every_leaf_for_mlflow_params():
    flat = flatten(PretrainConfig(run_name="x"))
    assert flat["optim.lr"] == PretrainConfig(run_name="x").optim.lr
    assert "checkpoint.storage_path" in flat and "model.name" in flat
