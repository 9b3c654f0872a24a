"""cluster/aws.yaml: Ray's own schema and config checks, and what Ray does not check (node_config goes to boto3 as is).

Offline: `prepare_config` only merges `ray/autoscaler/aws/defaults.yaml` and fills per-type worker counts; it calls
no AWS API (the AWS bootstrap, `bootstrap_aws`, runs only in `ray up`). No Ray runtime is started.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster" / "aws.yaml"
INSTANCE_TYPES = yaml.safe_load((ROOT / "cluster" / "instance_types.yaml").read_text())
GIB = 1024**3


@pytest.fixture
def cfg() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def node_types(cfg: dict) -> dict:
    return cfg["available_node_types"]


def is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def commands(cfg: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"]
    keys += ["head_start_ray_commands", "worker_start_ray_commands"]
    return [c for key in keys for c in cfg.get(key) or []]


# One function per check, so that test_each_check_can_fail breaks the YAML once for each.


def check_ray_schema(cfg: dict) -> None:
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))


def check_head(cfg: dict) -> None:
    head = node_types(cfg)[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must run no tasks or actors (resources CPU: 0)"
    assert not is_spot(head), "the head must be on demand"
    assert cfg.get("idle_timeout_minutes", 0) > 0, "idle_timeout_minutes must be set"


def check_spot_options(cfg: dict) -> None:
    """`spot` (a resource jobs can name) marks the spot groups: they, and only they, request spot instances."""
    for name, node_type in node_types(cfg).items():
        options = node_type["node_config"].get("InstanceMarketOptions")
        if "spot" in node_type["resources"]:
            assert is_spot(node_type), f"{name}: a spot group without InstanceMarketOptions MarketType spot"
            assert options.get("SpotOptions", {}).get("InstanceInterruptionBehavior") == "terminate", name
        else:
            assert options is None, f"{name}: an on-demand group with InstanceMarketOptions {options}"


def check_groups(cfg: dict) -> None:
    """Spot training in two families or more, an on-demand fallback, serving GPUs, and job drivers."""
    types = node_types(cfg)
    spot_train = {n: t for n, t in types.items() if is_spot(t) and "train_gpu" in t["resources"]}
    families = {t["node_config"]["InstanceType"].split(".")[0] for t in spot_train.values()}
    assert len(families) >= 2, f"spot training groups span {families}: at least two instance families"
    for name, node_type in spot_train.items():
        assert node_type.get("min_workers", 0) == 0 and node_type["max_workers"] > 0, name
    fallback = [t for t in types.values() if not is_spot(t) and "train_gpu" in t["resources"]]
    assert fallback, "no on-demand group offers train_gpu"
    # The v2 autoscaler breaks ties by priority: spot before on-demand.
    assert max(t.get("priority", 0) for t in fallback) < min(t.get("priority", 0) for t in spot_train.values())
    assert any("serve_gpu" in t["resources"] and not is_spot(t) for t in types.values()), "no on-demand serve_gpu"
    assert any("driver" in t["resources"] and not is_spot(t) for t in types.values()), "no on-demand driver group"
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items() if n != cfg["head_node_type"])


def check_resources_match_instances(cfg: dict) -> None:
    for name, node_type in node_types(cfg).items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_TYPES, f"{name}: {instance} is not in cluster/instance_types.yaml"
        spec, resources = INSTANCE_TYPES[instance], node_type["resources"]
        if name != cfg["head_node_type"]:
            assert resources.get("CPU") == spec["vcpus"], f"{name}: CPU {resources.get('CPU')} on {instance}"
        assert resources.get("GPU", 0) == spec["gpus"], f"{name}: GPU {resources.get('GPU', 0)} on {instance}"
        if "memory" in resources:
            assert resources["memory"] < spec["memory_gib"] * GIB, f"{name}: memory beyond {instance}'s RAM"
        for custom in ("train_gpu", "serve_gpu"):
            if custom in resources:
                assert resources[custom] == spec["gpus"], f"{name}: {custom} must count the GPUs"


def check_paths_exist(cfg: dict) -> None:
    """Every repo path the commands name (/home/ubuntu/strata/... is the mounted checkout) exists here."""
    mounts = cfg.get("file_mounts", {})
    checkout = next(remote for remote, local in mounts.items() if local == ".")
    named = [m for c in commands(cfg) for m in re.findall(re.escape(checkout) + r"/([\w./-]+)", c)]
    assert named, "no command names a file of the checkout"
    for path in named:
        assert (ROOT / path).exists(), f"the YAML names {checkout}/{path}, which is not in the repo"
    for remote, local in mounts.items():
        # The auth token is the one file that comes from the launching machine, never from the repo.
        if not remote.endswith("/.ray/auth_token"):
            assert (ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repo"


def check_no_secrets(cfg: dict) -> None:
    text = yaml.safe_dump(cfg)
    patterns = {
        "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
        "secret-looking assignment": r"(?i)(secret|password|token)\w*\s*[=:]\s*['\"]?[A-Za-z0-9/+]{16,}",
        "credentials in a URI": r"://[^/\s:@]+:[^/\s@]+@",
        "a raw Ray auth token": r"\b[0-9a-f]{32,}\b",
    }
    for what, pattern in patterns.items():
        assert not re.search(pattern, text), f"the cluster YAML holds {what}"


def check_pinned_install(cfg: dict) -> None:
    """Strata comes from the mounted checkout (the version `ray up` ran from), torch and Ray at pinned versions."""
    setup = " ".join(cfg["setup_commands"])
    mounts = cfg["file_mounts"]
    assert "." in mounts.values(), "the checkout is not mounted on the nodes"
    checkout = next(remote for remote, local in mounts.items() if local == ".")
    assert re.search(r"pip install[^;&]* " + re.escape(checkout) + r"\b", setup), "strata is not installed from it"
    for command in cfg["setup_commands"]:
        rest = command.replace(checkout, "")
        assert not re.search(r"pip install[^;&]*[\s\"']strata\b", rest), f"strata from an index: {command}"
    assert re.search(r"torch==[\d.]+", setup), "torch is not pinned"
    assert '"ray[train,serve,tune]==' in (ROOT / "pyproject.toml").read_text(), "pyproject no longer pins Ray"


def check_cluster_wiring(cfg: dict) -> None:
    """Metrics export port, token auth, the tracking server and spot-watch beside ray start."""
    head_start, worker_start = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    for where, start in (("head", head_start), ("worker", worker_start)):
        assert "--metrics-export-port=" in start, f"{where}: Ray's metrics port is not fixed for Prometheus"
        assert "strata-env.sh" in start, f"{where}: ray start without the node's environment (auth, MLflow, S3)"
    env_script = (ROOT / "cluster" / "node_env.sh").read_text()
    assert "RAY_AUTH_MODE=token" in env_script and "MLFLOW_TRACKING_URI" in env_script
    assert any(remote.endswith("/.ray/auth_token") for remote in cfg["file_mounts"]), "no auth token on the nodes"
    assert "mlflow server" in head_start and "s3://$STRATA_S3_BUCKET" in head_start
    assert "sqlite:////home/" in head_start or "postgresql://" in head_start, "MLflow's database is not on EBS/RDS"
    spot_watch = [c for c in cfg["worker_start_ray_commands"] if "strata spot-watch" in c]
    assert spot_watch and "lifecycle.sh" in spot_watch[0], "spot-watch is not started on spot workers"
    assert cfg["worker_start_ray_commands"].index(spot_watch[0]) > 0, "spot-watch must start after ray start"
    bucket_setting = [c for c in cfg["setup_commands"] if "node_env.sh" in c]
    assert len(bucket_setting) == 1, "the bucket must be set in one place"


CHECKS = [
    check_ray_schema,
    check_head,
    check_spot_options,
    check_groups,
    check_resources_match_instances,
    check_paths_exist,
    check_no_secrets,
    check_pinned_install,
    check_cluster_wiring,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_cluster_yaml(cfg, check):
    check(cfg)


def _set(path: str, value):
    def breaks(cfg: dict) -> None:
        *parents, last = path.split("/")
        node = cfg
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return breaks


def _edit_commands(key: str, old: str, new: str):
    def breaks(cfg: dict) -> None:
        cfg[key] = [c.replace(old, new) for c in cfg[key]]

    return breaks


DELETE = object()
TYPES = "available_node_types"
# One way to break the YAML per check: each must make exactly that check fail.
BREAKAGES = {
    "check_ray_schema": _set(f"{TYPES}/serve-gpu/resources/GPU", 0.5),  # resources must be integers
    "check_head": _set(f"{TYPES}/head/resources", {"CPU": 2}),
    "check_spot_options": _set(f"{TYPES}/train-spot-g5/node_config/InstanceMarketOptions", DELETE),
    "check_groups": _set(f"{TYPES}/train-spot-g5/node_config/InstanceType", "g6e.12xlarge"),
    "check_resources_match_instances": _set(f"{TYPES}/train-spot-g5/resources/CPU", 96),
    "check_paths_exist": _edit_commands("worker_start_ray_commands", "cluster/lifecycle.sh", "cluster/gone.sh"),
    "check_no_secrets": _edit_commands(
        "setup_commands", "strata-example-bucket", "strata-example-bucket AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENG"
    ),
    "check_pinned_install": _edit_commands("setup_commands", "/home/ubuntu/strata ", "strata "),
    "check_cluster_wiring": _edit_commands("worker_start_ray_commands", "strata spot-watch", "true"),
}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_each_check_can_fail(cfg, check):
    broken = copy.deepcopy(cfg)
    BREAKAGES[check.__name__](broken)
    with pytest.raises((AssertionError, jsonschema.ValidationError, ValueError, RuntimeError)):
        check(broken)


def test_idle_timeout_is_required(cfg):
    del cfg["idle_timeout_minutes"]
    with pytest.raises(AssertionError, match="idle_timeout_minutes"):
        check_head(cfg)
