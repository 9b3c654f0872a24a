"""Per-layer expert load statistics from router logits: tokens per expert and router entropy.

Training reads them from `output.router_logits` (one (tokens, experts) tensor per MoE layer); serving
counts the same, real tokens only, with forward hooks on the routers (`ExpertLoadRecorder`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

logger = logging.getLogger(__name__)


@dataclass
class ExpertLoad:
    tokens_per_expert: torch.Tensor  # (layers, experts) routed token counts, each token counted top_k times
    router_entropy: torch.Tensor  # (layers,) mean entropy of the routing distribution, in nats

    @property
    def imbalance(self) -> float:
        """max/mean tokens per expert, averaged over layers: 1.0 is perfectly balanced."""
        counts = self.tokens_per_expert.float()
        return float((counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)).mean())

    def summary(self) -> dict[str, float]:
        return {"expert_imbalance": self.imbalance, "router_entropy": float(self.router_entropy.mean())}

    def to_dict(self) -> dict[str, list]:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "router_entropy": self.router_entropy.tolist(),
        }

    def __add__(self, other: ExpertLoad) -> ExpertLoad:
        total = self.tokens_per_expert + other.tokens_per_expert
        weight = self.tokens_per_expert.sum(1).float(), other.tokens_per_expert.sum(1).float()
        entropy = (self.router_entropy * weight[0] + other.router_entropy * weight[1]) / (weight[0] + weight[1])
        return ExpertLoad(total, entropy)


@torch.no_grad()
def expert_load(router_logits: Sequence[torch.Tensor], top_k: int) -> ExpertLoad:
    counts, entropies = [], []
    for logits in router_logits:
        probs = torch.softmax(logits.detach().float(), dim=-1)  # (tokens, experts)
        chosen = probs.topk(top_k, dim=-1).indices
        counts.append(torch.bincount(chosen.flatten(), minlength=probs.shape[-1]).cpu())
        entropies.append(-(probs * probs.clamp(min=1e-9).log()).sum(-1).mean().cpu())
    return ExpertLoad(torch.stack(counts), torch.stack(entropies))


class ExpertLoadRecorder:
    """Accumulates expert load over many forward passes (for serving) through hooks on the MoE routers.

    Only real tokens count: a pre-hook reads each forward's attention mask, whose last columns say which input
    positions are left-padding. Counts accumulate on the model's device and reach the host only in `take` (at the
    metrics interval), so no forward waits on a device-to-host copy. Forwards may run on several threads at once
    (engine loops sharing the model): each thread's mask is its own, and the counts are added under a lock. A hook
    never raises into the forward it watches: its exceptions go to `on_error`."""

    def __init__(self, model: torch.nn.Module, on_error: Callable[[Exception], None] | None = None):
        self.top_k = model.config.num_experts_per_tok
        self.on_error = on_error or (lambda err: logger.warning("expert load hook failed", exc_info=err))
        routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
        experts = getattr(model.config, "num_experts", None) or model.config.num_local_experts  # Qwen3-MoE, Mixtral
        device = next(model.parameters()).device
        self._counts = torch.zeros(len(routers), experts, dtype=torch.long, device=device)
        self._entropy = torch.zeros(len(routers), device=device)  # summed over the counted tokens
        self._forward = threading.local()  # .real: (batch x input positions,) 1 for a real token; None: all real
        self._lock = threading.Lock()
        self._handles = [model.register_forward_pre_hook(self._see_mask, with_kwargs=True)]
        self._handles += [r.register_forward_hook(partial(self._count, layer)) for layer, r in enumerate(routers)]

    def _see_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
            positions = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            real = mask[:, -positions:].reshape(-1).long() if mask is not None and mask.dim() == 2 else None
        except Exception as err:
            real = None
            self.on_error(err)
        self._forward.real = real

    @torch.no_grad()
    def _count(self, layer: int, module: torch.nn.Module, inputs: tuple, output) -> None:
        try:
            logits = output[0] if isinstance(output, tuple) else output
            probs = torch.softmax(logits.float(), dim=-1)  # (tokens, experts)
            chosen = probs.topk(self.top_k, dim=-1).indices
            entropy = torch.special.entr(probs).sum(-1)
            real = getattr(self._forward, "real", None)
            if real is None:
                weights, real_entropy = torch.ones_like(chosen), entropy.sum()
            else:
                weights, real_entropy = real[:, None].expand_as(chosen), (entropy * real).sum()
            with self._lock:
                self._counts[layer].index_add_(0, chosen.flatten(), weights.flatten())
                self._entropy[layer] += real_entropy
        except Exception as err:
            self.on_error(err)

    def take(self) -> ExpertLoad:
        """The load since the last `take`, and counting starts afresh."""
        with self._lock:
            counts, entropy = self._counts.to("cpu", copy=True), self._entropy.to("cpu", copy=True)
            self._counts.zero_()
            self._entropy.zero_()
        tokens = counts.sum(1) / self.top_k
        return ExpertLoad(counts, entropy / tokens.clamp(min=1))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
