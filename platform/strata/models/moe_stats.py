"""Per-layer expert load statistics from router logits: tokens per expert and router entropy.

Training reads them from `output.router_logits` (one (tokens, experts) tensor per MoE layer); serving
collects the same tensors with forward hooks on the routers (`ExpertLoadRecorder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
    """Accumulates expert load over many forward passes (for serving) through hooks on the MoE routers."""

    def __init__(self, model: torch.nn.Module):
        self.top_k = model.config.num_experts_per_tok
        self._logits: list[torch.Tensor] = []
        self.total: ExpertLoad | None = None
        routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
        self._handles = [r.register_forward_hook(self._hook) for r in routers]
        self.num_layers = len(routers)

    def _hook(self, module: torch.nn.Module, inputs, output) -> None:
        self._logits.append(output[0] if isinstance(output, tuple) else output)
        if len(self._logits) == self.num_layers:
            load = expert_load(self._logits, self.top_k)
            self.total = load if self.total is None else self.total + load
            self._logits.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
