"""Reference decoding written out with OpenAI's definitions, against which the engine and the endpoint are checked."""

from __future__ import annotations

import collections

import torch


def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own logits at every position of `ids`: one plain forward, no cache, no batch."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def openai_greedy(model, ids: list[int], max_tokens: int, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """Greedy decoding under OpenAI's definitions: logit[j] += bias[j] - count[j] * frequency - (count[j] > 0) *
    presence, where count[j] counts token j among the generated tokens (never the prompt's)."""
    generated: list[int] = []
    for _ in range(max_tokens):
        logits = model_logprobs(model, ids + generated)[-1]
        for token, value in (bias or {}).items():
            logits[token] += value
        for token, count in collections.Counter(generated).items():
            logits[token] -= presence + frequency * count
        generated.append(int(logits.argmax()))
    return generated
