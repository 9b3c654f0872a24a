"""Weighted, sticky assignment of requests to model variants: the A/B split.

A request that names a user (the OpenAI `user` field, or an `x-session-id` header) hashes to a fixed point in
[0, 1); the variant is the one whose share of the cumulative weights covers that point, so a user keeps one variant
for as long as the weights stay the same (and most users keep theirs when weights shift a little). Requests without
a user are spread by smooth weighted round-robin, which meets the weights exactly over any window of requests.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Mapping

from strata.config.serve import validate_weights


class Split:
    def __init__(self, weights: Mapping[str, float], variants: list[str]):
        validate_weights(weights, variants)
        self.weights = {name: float(weights.get(name, 0.0)) for name in variants}
        total = sum(self.weights.values())
        self.active = [name for name, w in self.weights.items() if w > 0]
        self._bounds = []
        cumulative = 0.0
        for name in self.active:
            cumulative += self.weights[name] / total
            self._bounds.append(cumulative)
        self._credit = dict.fromkeys(self.active, 0.0)
        self._lock = threading.Lock()

    def shares(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {name: w / total for name, w in self.weights.items()}

    def assign(self, sticky_key: str | None) -> str:
        if sticky_key:
            point = int.from_bytes(hashlib.sha256(sticky_key.encode()).digest()[:8], "big") / 2.0**64
            return self.active[min(bisect.bisect_right(self._bounds, point), len(self.active) - 1)]
        with self._lock:  # smooth weighted round-robin (as in nginx)
            total = 0.0
            for name in self.active:
                self._credit[name] += self.weights[name]
                total += self.weights[name]
            chosen = max(self.active, key=self._credit.__getitem__)
            self._credit[chosen] -= total
            return chosen


def parse_split(text: str) -> dict[str, float]:
    """`stable=90,fast=10` -> {"stable": 90.0, "fast": 10.0}."""
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad split entry {part!r}: expected NAME=WEIGHT, e.g. stable=90,fast=10") from None
    return weights
