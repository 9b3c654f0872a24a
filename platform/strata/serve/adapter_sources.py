"""Where a variant's weights come from, read from its config or the registry without loading anything: a base and,
unless it serves the base, a LoRA adapter. `strata deploy` checks replica groups with it before anything starts
(without torch), and `shared_base.SharedBase` loads what it names."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from strata.config import ServeConfig, VariantConfig, replica_groups
from strata.registry import ModelNotFound, fine_tune_of, pin


@dataclass(frozen=True)
class AdapterSource:
    """Where a variant's weights come from: a base (a `model` spec) and, unless it serves the base, an adapter."""

    base: str
    adapter: str | None
    info: dict[str, str]  # what the variant is, for its replica's stats


def adapter_source(variant: VariantConfig) -> AdapterSource:
    if variant.adapter:
        return AdapterSource(variant.model, variant.adapter, {"model": variant.model, "adapter": variant.adapter})
    tuned = fine_tune_of(variant.model)
    if tuned is None:
        return AdapterSource(variant.model, None, {"model": variant.model})
    info = {"model": variant.model, "base": tuned.base, "adapter": tuned.adapter, "method": tuned.method}
    return AdapterSource(tuned.base, tuned.adapter, info)


@contextmanager
def fetched_adapter(uri: str) -> Iterator[str]:
    """A local adapter directory as it is, or one downloaded from MLflow (`runs:/ID/adapter`, `models:/`, `s3://`)
    for the time it takes to load it: every replica that loads an adapter would otherwise leave a copy behind."""
    if ":/" not in uri:
        yield uri
        return
    import mlflow

    with tempfile.TemporaryDirectory(prefix="strata-adapter-") as scratch:
        yield mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch)


def adapter_config(name: str, adapter_dir: str | Path) -> dict:
    """A LoRA adapter's peft config, refused (ValueError naming the variant) where it does not stack beside other
    adapters on one base's plain linear layers."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"variant {name!r}: {adapter_dir} holds no peft adapter (no adapter_config.json)")
    config = json.loads(config_path.read_text())
    refusals = []
    if config.get("peft_type") != "LORA":
        refusals.append(f"a {config.get('peft_type')} adapter, not LoRA")
    if config.get("target_parameters"):
        refusals.append(
            f"its adapter sets target_parameters {config['target_parameters']} (LoRA on fused expert parameters), "
            "which does not stack beside other adapters"
        )
    if config.get("use_dora"):
        refusals.append("a DoRA adapter")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refusals.append("its adapter trains biases, which would change the shared base")
    if config.get("modules_to_save"):
        refusals.append(f"its adapter trains {config['modules_to_save']} in full")
    if refusals:
        raise ValueError(f"variant {name!r}: {refusals[0]}; serve it without replica_group")
    return config


def check_group(group: str, members: list[VariantConfig]) -> None:
    """Before anything loads (at deploy, and before a variant joins a running group), ValueError naming the
    variant: the group has an adapter to share its base with, every member is built on the same base (registry
    versions compared by number), and every adapter is there and stacks. Reads configs, never weights."""
    try:
        sources = {member.name: adapter_source(member) for member in members}
        pinned = {name: pin(source.base) for name, source in sources.items()}
    except ModelNotFound as err:
        raise ValueError(f"replica group {group!r}: {err}") from None
    adapted = [name for name, source in sources.items() if source.adapter]
    if not adapted:
        raise ValueError(
            f"replica group {group!r} ({', '.join(sources)}): none of its variants is a LoRA adapter or a registered "
            "LoRA/QLoRA fine-tune, so there is no base to share; deploy them without a replica group"
        )
    base = pinned[adapted[0]]
    for name, source in sources.items():
        if pinned[name] != base:
            raise ValueError(
                f"variant {name!r} is built on {source.base}, not on its replica group {group!r}'s base "
                f"{sources[adapted[0]].base} ({adapted[0]!r}'s): a group shares one base"
            )
        if source.adapter:
            check_adapter(name, source.adapter)


def check_adapter(name: str, uri: str) -> None:
    """The adapter at `uri` is there and stacks: its config alone, fetched into a directory that is then removed."""
    if ":/" not in uri:
        adapter_config(name, uri)
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/adapter_config.json", dst_path=scratch)
        except (MlflowException, OSError) as err:
            raise ValueError(f"variant {name!r}: no peft adapter at {uri} ({err})") from None
        adapter_config(name, Path(local).parent)


def check_groups(config: ServeConfig) -> None:
    for group, members in replica_groups(config.variants).items():
        check_group(group, members)
