"""Rows of one batch decoded with different LoRA adapters: each adapted linear layer of the base wrapped once, every
adapter's low-rank factors stacked beside it.

A wrapped layer computes  y = W x + B_cat (m * (A_cat x)):  A_cat stacks every adapter's A, B_cat every adapter's
B times its scaling, and m is, per row, 1 on the columns of that row's adapter and 0 elsewhere (all 0 for the base).
That is four kernels a layer however many adapters there are, where peft's mixed batch gathers, multiplies and
scatters each adapter's rows and builds their indices in Python, layer by layer (on the `small` preset with two
adapters, in-process, ~1.5x peft's tokens/s). On the brgemm kernels it is one call a layer (`BrgemmLinear.with_lora`),
all three matmuls on brgemm, the factors in bf16 there: the low-rank part is added to the base's fp32 tiles before
they are rounded. On `small`'s 384x384 projections at 32 rows (2 threads, an AVX512-BF16 EPYC) a call takes ~41 us
against the base layer's ~39 (the fp32 low-rank loops before it: ~94 us). Elsewhere the factors stay in fp32, as
peft keeps them.

The row mask belongs to the calling thread (`MixedAdapters.rows`), so engine loops sharing the model each decode
their own batch. Adapters are peft's LoRA format (adapter_config.json, adapter_model.safetensors), read here;
what cannot be stacked this way (DoRA, LoRA on embeddings or on fused expert parameters, trained biases) is refused
with the variant's name.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from strata.models.brgemm_bf16 import BrgemmLinear
from strata.serve.adapter_sources import adapter_config

BASE_ADAPTER = "__base__"  # the name of a row that takes no adapter
PREFIX, A_SUFFIX, B_SUFFIX = "base_model.model.", ".lora_A.weight", ".lora_B.weight"  # peft's saved keys


class MixedLoraLinear(nn.Module):
    """A base linear layer plus every adapter's factors, applied to each row as the calling thread's mask says."""

    def __init__(self, base: nn.Linear | BrgemmLinear, adapters: MixedAdapters):
        super().__init__()
        self.base = base
        self.mask = adapters.mask  # the calling thread's row mask
        zeros = partial(torch.zeros, dtype=torch.float32, device=adapters.model.device)
        self.register_buffer("lora_a", zeros(0, base.in_features))  # (total rank, in)
        self.register_buffer("lora_b_t", zeros(0, base.out_features))  # (total rank, out): B transposed, scaled
        self.packed_lora: tuple[torch.Tensor, torch.Tensor] | None = None  # both, in bf16 for the brgemm kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask()  # (sequences, total rank), or None: base only
        if mask is None or not self.lora_a.numel():
            return self.base(x)
        if self.packed_lora is not None:  # one call: the low-rank part added to the base's fp32 tiles
            return self.base.with_lora(x, self.packed_lora, mask)
        out = self.base(x)
        return out + (F.linear(x.float(), self.lora_a) * mask[:, None]).matmul(self.lora_b_t).to(out.dtype)

    def append(self, a: torch.Tensor | None, b: torch.Tensor | None, rank: int) -> None:
        """Stack one more adapter's columns: its A and scaled B, or zeros where it does not adapt this layer."""
        a = self.lora_a.new_zeros(rank, self.base.in_features) if a is None else a.to(self.lora_a)
        b = self.lora_b_t.new_zeros(self.base.out_features, rank) if b is None else b.to(self.lora_b_t)
        self.lora_a = torch.cat([self.lora_a, a])
        self.lora_b_t = torch.cat([self.lora_b_t, b.T])
        if isinstance(self.base, BrgemmLinear) and self.lora_a.numel():
            self.packed_lora = self.base.pack_lora(self.lora_a, self.lora_b_t)


class MixedAdapters:
    """The adapters of one base model: `add` loads one; `rows(names)` sets, for this thread's forward passes, the
    adapter of each row."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.columns: dict[str, slice] = {}  # adapter -> its columns in every layer's stack
        self.slot: dict[str, int] = {}  # adapter -> its row of `_masks`
        self._masks = torch.zeros(1, 0)  # (1 + adapters, width): the columns each adapter's rows keep
        self.layers: dict[str, MixedLoraLinear] = {}  # module path -> wrapped layer
        self._local = threading.local()

    def add(self, name: str, adapter_dir: str | Path) -> None:
        """Stack adapter `name` beside the others. Everything is checked before any layer changes, so an adapter
        refused here (ValueError naming the variant) leaves the model serving what it served."""
        if name in self.columns:
            raise ValueError(f"variant {name!r}: an adapter of that name is already loaded")
        factors = read_adapter(name, adapter_dir)
        for path, (a, b) in factors.items():
            self._check_fits(name, path, a, b)
        for path in factors:
            if path not in self.layers:
                self._wrap(name, path)
        rank = max(a.shape[0] for a, _ in factors.values())
        for path, layer in self.layers.items():
            a, b = factors.get(path, (None, None))
            if a is not None and a.shape[0] < rank:  # rank_pattern: a lower rank here, padded with zeros
                a, b = F.pad(a, (0, 0, 0, rank - a.shape[0])), F.pad(b, (0, rank - b.shape[1]))
            layer.append(a, b, rank)
        self.columns[name] = slice(self.width(), self.width() + rank)
        self.slot[name] = len(self.columns)
        self._masks = torch.zeros(len(self.columns) + 1, self.width(), device=self.model.device)  # row 0: the base
        for slot, columns in enumerate(self.columns.values(), 1):
            self._masks[slot, columns] = 1

    def _check_fits(self, name: str, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """The base has a linear layer at `path` whose shape the factors fit (an adapter of another base does not)."""
        layer = self.layers.get(path)
        try:
            module = layer.base if layer else self.model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"variant {name!r}: its adapter adapts {path}, which the base does not have") from None
        if not isinstance(module, nn.Linear | BrgemmLinear):
            raise ValueError(f"variant {name!r}: its adapter adapts {path}, a {type(module).__name__}, not a linear")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"variant {name!r}: its adapter's factors for {path} ({tuple(b.shape)} x {tuple(a.shape)}) do not "
                f"fit the base's {module.out_features} x {module.in_features} layer: an adapter of another base?"
            )

    def _wrap(self, name: str, path: str) -> None:
        parent, _, child = path.rpartition(".")
        layer = MixedLoraLinear(self.model.get_submodule(path), self)
        layer.append(None, None, self.width())  # the adapters loaded before, which do not adapt this layer
        setattr(self.model.get_submodule(parent), child, layer)
        self.layers[path] = layer

    @contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Row i of the forward passes inside takes adapter names[i] (BASE_ADAPTER: none)."""
        slots = [0 if name == BASE_ADAPTER else self.slot[name] for name in names]
        self._local.mask = self._masks[torch.tensor(slots, device=self._masks.device)]
        try:
            yield
        finally:
            self._local.mask = None

    def mask(self) -> torch.Tensor | None:
        return getattr(self._local, "mask", None)

    def width(self) -> int:
        """Columns of every layer's stack: the adapters' ranks added up."""
        return sum(s.stop - s.start for s in self.columns.values())


def read_adapter(name: str, adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft LoRA adapter's factors by module path: (A, B x scaling). Refuses, naming the variant, what does not
    stack onto plain linear layers."""
    config = adapter_config(name, adapter_dir)
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    unknown = [key for key in weights if not key.endswith((A_SUFFIX, B_SUFFIX))]
    if unknown:
        raise ValueError(f"variant {name!r}: its adapter holds {unknown[0]}, which is not a LoRA linear factor")
    from peft.utils.other import get_pattern_key  # here: peft costs a replica without adapters ~2 s to import

    factors = {}
    for key in weights:
        if key.endswith(A_SUFFIX):
            path = key.removeprefix(PREFIX).removesuffix(A_SUFFIX)
            a, b = weights[key], weights[key.removesuffix(A_SUFFIX) + B_SUFFIX]
            alpha = config.get("alpha_pattern", {}).get(
                get_pattern_key(config.get("alpha_pattern", {}), path), config["lora_alpha"]
            )
            scaling = alpha / (math.sqrt(a.shape[0]) if config.get("use_rslora") else a.shape[0])
            factors[path] = (a, b * scaling)
    if not factors:
        raise ValueError(f"variant {name!r}: its adapter in {adapter_dir} holds no LoRA factors")
    return factors
