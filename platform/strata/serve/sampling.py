"""Next tokens from a batch of logits, each row with its own OpenAI sampling parameters.

The order is vLLM's: log-probabilities are reported from the model's raw logits; `logit_bias` and the presence and
frequency penalties (counted over generated tokens only, as OpenAI and vLLM do) then shift the logits; temperature 0
takes the argmax, any other temperature samples from the top-p nucleus. A request with a `seed` draws from a
generator of its own, so the same seed and request give the same tokens whatever else shares the batch.

Batches that use none of this stay on the cheap path: the checks are made on the host, and greedy rows need only the
argmax.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far...
    frequency_penalty: float = 0.0  # ...and this, times how often it was generated
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None
    logprobs: int | None = None  # None: none reported; k: the chosen token's and the k most likely ones

    @property
    def shifts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, logprob), most likely first


class Row(Protocol):
    """What sampling reads of a sequence in the batch (the engine's `Sequence`)."""

    params: SamplingParams
    generated: list[int]
    generator: torch.Generator | None


def sample(
    logits: torch.Tensor, rows: list[Row], generator: torch.Generator
) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """The next token of every row (a tensor on the logits' device) and, for rows that asked, its logprobs."""
    logits = logits.float()
    wants_logprobs = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    if any(r.params.shifts_logits for r in rows):
        logits = _shift(logits, rows)
    if any(r.params.temperature > 0 for r in rows):
        tokens = _draw(logits, rows, generator)
    else:
        tokens = logits.argmax(-1)
    reported = _logprobs(raw_logprobs, tokens, rows) if raw_logprobs is not None else [None] * len(rows)
    return tokens, reported


def _shift(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """logit_bias added, and OpenAI's penalties: logit[j] -= count[j] * frequency + (count[j] > 0) * presence."""
    shifts: list[tuple[int, int, float]] = []  # (row, token, added to its logit)
    for i, row in enumerate(rows):
        params = row.params
        shifts += [(i, token, bias) for token, bias in params.logit_bias.items()]
        if params.presence_penalty or params.frequency_penalty:
            counts = collections.Counter(row.generated)
            penalty = [-(params.presence_penalty + params.frequency_penalty * n) for n in counts.values()]
            shifts += [(i, token, value) for token, value in zip(counts, penalty, strict=True)]
    if not shifts:
        return logits
    row_ids, token_ids, values = (torch.tensor(column, device=logits.device) for column in zip(*shifts, strict=True))
    return logits.index_put((row_ids, token_ids), values.to(logits.dtype), accumulate=True)


def _draw(logits: torch.Tensor, rows: list[Row], generator: torch.Generator) -> torch.Tensor:
    """Temperature + nucleus (top-p) sampling for rows with temperature > 0, the argmax for the others."""
    temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
    sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    for i, row in enumerate(rows):
        if row.params.seed is not None and row.params.temperature > 0:
            if row.generator is None:
                row.generator = torch.Generator(device=logits.device).manual_seed(row.params.seed)
            choice[i] = torch.multinomial(sorted_probs[i], 1, generator=row.generator)
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(temperature > 0, sampled, logits.argmax(-1))


def _logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, rows: list[Row]) -> list[TokenLogprob | None]:
    """One device-to-host copy for the whole batch: chosen tokens' logprobs and the top k of every row."""
    k = max(r.params.logprobs or 0 for r in rows)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    top_values, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
    reported: list[TokenLogprob | None] = []
    for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
        wanted = row.params.logprobs
        top = tuple(zip(top_ids[i][:wanted], top_values[i][:wanted], strict=True)) if wanted else ()
        reported.append(None if wanted is None else TokenLogprob(token, chosen[i], top))
    return reported
