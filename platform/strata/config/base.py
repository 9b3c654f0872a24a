"""What every job config shares: strict pydantic models, the YAML + `--set a.b=value` loader, and its errors.

Every job reads one file (`--config FILE`) plus `--set a.b=value` overrides. Validation happens here, before any
Ray work starts, and an error names the file and the dotted field that is wrong. Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A job configuration is invalid; the message names the file and the field."""


class StrictModel(BaseModel):
    # Unknown keys are errors: a misspelt option must never be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _set_dotted(tree: dict[str, Any], dotted: str, raw_value: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw_value)


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | os.PathLike, schema: type[StrictModel], overrides: list[str] = ()):
    """Read a YAML job config, apply `a.b=value` overrides and validate it against `schema`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(path, err)) from None


def format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        shown = e["type"] not in ("extra_forbidden", "missing") and not isinstance(e["input"], (dict, list))
        got = f" (got {e['input']!r})" if shown else ""
        lines.append(f"  {field}: {message}{got}")
    return "\n".join(lines)


def dump_config(config: StrictModel) -> str:
    """The resolved config as YAML, saved next to every checkpoint and tracked run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
