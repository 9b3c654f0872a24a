"""Many LoRA variants on one base: the base loaded once, each variant's adapter stacked beside it under its name.

A variant's adapter is its `adapter` (a directory or an MLflow URI such as `runs:/ID/adapter`) applied to its
`model`, or, for a registered fine-tune, the adapter its run logged, applied to the base version it records.
Rows of every variant decode in one batch (`mixed_lora.MixedAdapters`: one name per row, `__base__` for the base's
own rows). Only LoRA on linear layers stacks that way: adapters of the fused experts (`target_parameters`), DoRA and
the like are refused with an error that says so: serve them on their own replicas (no `replica_group`). A QLoRA
adapter is served as QLoRA adapters usually are, on the base at the group's precision; it trained against the
NF4-rounded base, and its registered export folds it into that dequantised base, so the two can differ on a few
greedy tokens (its info says `method: qlora`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from strata.config import VariantConfig
from strata.registry import ResolvedModel, pin, resolve_model
from strata.serve.adapter_sources import AdapterSource, adapter_source, fetched_adapter
from strata.serve.mixed_lora import BASE_ADAPTER, MixedAdapters
from strata.serve.precision import to_serving_precision

logger = logging.getLogger("ray.serve")  # the replica's own log file


class SharedBase:
    """One base model and the adapters of the variants it serves. `add` loads a variant's adapter; the engine
    decodes a row of variant V with `adapter_of[V]` (through `adapters`)."""

    def __init__(self, variants: list[VariantConfig]):
        """Loads the base, then every variant's adapter. Every variant must name the same base (registry versions
        are compared by number, directories by path; `adapter_sources.check_group` says so at deploy)."""
        sources = {v.name: adapter_source(v) for v in variants}
        adapters = [name for name, source in sources.items() if source.adapter]
        if not adapters:
            raise ValueError(f"replica group {variants[0].replica_group!r} has no adapter to share its base with")
        self.settings = variants[0]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.base_spec = sources[adapters[0]].base
        self.resolved: ResolvedModel = resolve_model(self.base_spec)
        base = AutoModelForCausalLM.from_pretrained(self.resolved.directory)
        self.model, self.precision = to_serving_precision(base, self.settings, self.device)
        self.model.config.output_router_logits = False  # router logits feed training losses only
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.resolved.directory)
        self.adapters = MixedAdapters(self.model)
        self.adapter_of: dict[str, str] = {}
        self.info: dict[str, dict[str, str]] = {}
        for variant in variants:
            self.add(variant, sources[variant.name])
        self.added: list[VariantConfig] = []  # members added since it started (its `user_config`)
        self.refused: dict[str, str] = {}  # those of them whose adapter failed to load here: why
        self._loading = threading.Lock()
        self._last_try = 0.0

    def add(
        self,
        variant: VariantConfig,
        source: AdapterSource | None = None,
        splicing: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        """Serve one more variant: load its adapter (nothing for the base itself) next to the others. The registry
        lookup and the download run first; only splicing the adapter into the model runs inside `splicing` (for a
        running replica: its engine paused, so decoding stops for the splice alone)."""
        source = source or adapter_source(variant)
        if pin(source.base) != self.resolved.pinned:
            raise ValueError(
                f"variant {variant.name!r} is built on {source.base}, not on its replica group's base {self.base_spec}"
            )
        with fetched_adapter(source.adapter) if source.adapter else nullcontext() as adapter_dir, splicing():
            if adapter_dir:
                self.adapters.add(variant.name, adapter_dir)
            self.adapter_of[variant.name] = variant.name if adapter_dir else BASE_ADAPTER
            self.info[variant.name] = {**source.info, **self.precision}

    def serve_added(self, members: list[VariantConfig], splicing: Callable[[], AbstractContextManager]) -> None:
        """Serve the members added to the group (its `user_config`, all of them each time): load each it does not
        serve yet. One that fails is left out, its error kept in `refused`, and tried again by `retry_refused`;
        it never raises (Serve stops a replica whose reconfigure raises, and every variant it serves with it)."""
        with self._loading:
            self.added = members
            names = {m.name for m in members}
            self.refused = {name: why for name, why in self.refused.items() if name in names}  # taken back out
            self._load_missing(splicing)

    def retry_refused(self, splicing: Callable[[], AbstractContextManager]) -> None:
        """Try the refused members again, on a thread of their own, at most every ADAPTER_RETRY_S: a download that
        failed when this replica started (the registry or S3 unreachable for a moment) must not leave the variant
        answering 503 here until the group's config next changes. The replica's health check calls it."""
        if not self.refused or time.monotonic() - self._last_try < adapter_retry_s():
            return
        if self._loading.acquire(blocking=False):

            def retry() -> None:
                try:
                    self._load_missing(splicing)
                finally:
                    self._loading.release()

            threading.Thread(target=retry, name="strata-adapter-retry", daemon=True).start()

    def _load_missing(self, splicing: Callable[[], AbstractContextManager]) -> None:
        from strata.serve.loading import on_passing_thread

        for variant in self.added:
            if variant.name in self.adapter_of:
                continue
            try:
                on_passing_thread(functools.partial(self.add, variant, splicing=splicing))
                self.refused.pop(variant.name, None)
            except Exception as err:  # noqa: BLE001 - a bad adapter (any error of loading it) costs its variant only
                self.refused[variant.name] = f"{type(err).__name__}: {err}"
                logger.error("variant %r left out: %s", variant.name, self.refused[variant.name])
        self._last_try = time.monotonic()


def adapter_retry_s() -> float:
    """How long a replica waits before loading a refused adapter again: $STRATA_ADAPTER_RETRY_S, else 60 s."""
    return float(os.environ.get("STRATA_ADAPTER_RETRY_S", "60"))
