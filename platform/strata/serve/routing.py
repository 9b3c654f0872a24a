"""Weighted, sticky assignment of requests to model variants: the A/B split.

A request that names a user (the OpenAI `user` field, or an `x-session-id` header) goes to the variant that wins a
weighted rendezvous (highest random weight) draw seeded by the experiment's salt, the variant's name and the user:
each variant draws `-ln(u) / weight` for a uniform `u` hashed from the three, and the smallest wins, which happens
with probability `weight / total`. So a user keeps one variant for as long as the weights stay; raising a variant's
weight only moves users to it; the order the variants are listed in plays no part; and another experiment (another
salt) draws its users afresh instead of sending the same ones to the small variant again. Requests without a user
are spread by smooth weighted round-robin, which meets the weights exactly over any window of requests.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping

from strata.config.serve import validate_weights


def _uniform(*parts: str) -> float:
    """A point in (0, 1) hashed from `parts`: the same everywhere, for every process and every run."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64


class Split:
    def __init__(self, weights: Mapping[str, float], variants: list[str], salt: str = ""):
        validate_weights(weights, variants)
        self.weights = {name: float(weights.get(name, 0.0)) for name in variants}
        self.salt = salt
        self.active = [name for name, w in self.weights.items() if w > 0]
        self._credit = dict.fromkeys(self.active, 0.0)
        self._lock = threading.Lock()

    def shares(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {name: w / total for name, w in self.weights.items()}

    def assign(self, sticky_key: str | None) -> str:
        if sticky_key:
            return min(self.active, key=lambda name: self._draw(name, sticky_key))
        with self._lock:  # smooth weighted round-robin (as in nginx)
            total = 0.0
            for name in self.active:
                self._credit[name] += self.weights[name]
                total += self.weights[name]
            chosen = max(self.active, key=self._credit.__getitem__)
            self._credit[chosen] -= total
            return chosen

    def _draw(self, variant: str, sticky_key: str) -> float:
        """The variant's draw for this user: exponential with its weight as the rate, so it is the smallest with
        probability weight / total."""
        return -math.log(_uniform(self.salt, variant, sticky_key)) / self.weights[variant]


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
