"""Where a variant's weights come from, read from its config or the registry without loading anything: a base and,
unless it serves the base, a LoRA adapter. `strata deploy` checks replica groups with it before anything starts
(without torch), and `shared_base.SharedBase` loads what it names."""

from __future__ import annotations

from dataclasses import dataclass

from strata.config import ServeConfig, VariantConfig, replica_groups
from strata.registry import fine_tune_of


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


def check_groups(config: ServeConfig) -> None:
    """Before anything loads (at deploy): each replica group has an adapter to share its base with."""
    for group, members in replica_groups(config.variants).items():
        if not any(adapter_source(member).adapter for member in members):
            names = [m.name for m in members]
            raise ValueError(
                f"replica group {group!r} ({', '.join(names)}): none of its variants is a LoRA adapter or a registered "
                "LoRA/QLoRA fine-tune, so there is no base to share; deploy them without a replica group"
            )
