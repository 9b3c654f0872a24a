"""The last minutes of requests per variant, gathered from every router replica of one application.

A canary judges its candidate on these: error rate, p99 latency and TTFT against the stable variant's over the same
period. They need nothing but Ray (no Prometheus), so a canary works on a laptop. The store is a detached actor
named after the application, so it outlives router restarts, and any driver on the cluster can read it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass
from typing import Any

import ray

NAMESPACE = "strata"
HORIZON_S = 900.0  # samples older than this are dropped: a canary's window is minutes


def actor_name(app: str) -> str:
    return f"variant-windows:{app}"


@dataclass(frozen=True)
class Sample:
    finished_at: float  # time.time(): comparable across the cluster's processes
    variant: str
    status: int
    latency_s: float
    ttft_s: float | None


CLIENT_CLOSED = 499  # the client went away (disconnected, timed out) before its answer


def waited(status: int, latency_s: float, ttft_s: float | None) -> tuple[float | None, float | None]:
    """The (latency, TTFT) a request counts in the percentiles with: a success's own; for one its client gave up
    on, how long it had waited, a lower bound (its TTFT too, if no token came), so a variant too slow for its
    clients does not drop out of its own p99 (every request of a hung one ends that way); none for the rest."""
    if status < 400:
        return latency_s, ttft_s
    if status == CLIENT_CLOSED:
        return latency_s, latency_s if ttft_s is None else ttft_s
    return None, None


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (None for no values): the p99 of 50 samples is their largest but one."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Per variant: requests, server errors (5xx: a client's bad request is not the model's fault), error rate,
    p50/p99 latency and p99 TTFT (ms) of the successful ones and of those their clients gave up on (`waited`)."""
    by_variant: dict[str, list[Sample]] = collections.defaultdict(list)
    for sample in samples:
        by_variant[sample.variant].append(sample)
    summary = {}
    for variant, mine in by_variant.items():
        errors = sum(1 for s in mine if s.status >= 500)
        timed = [waited(s.status, s.latency_s, s.ttft_s) for s in mine]
        latencies = [latency * 1000 for latency, _ in timed if latency is not None]
        ttfts = [ttft * 1000 for _, ttft in timed if ttft is not None]
        summary[variant] = {
            "requests": len(mine),
            "errors": errors,
            "error_rate": errors / len(mine),
            "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99),
            "ttft_p99_ms": percentile(ttfts, 0.99),
        }
    return summary


@ray.remote(num_cpus=0)
class VariantWindows:
    def __init__(self, horizon_s: float = HORIZON_S):
        self.horizon_s = horizon_s
        self.samples: collections.deque[Sample] = collections.deque()

    def record(self, samples: list[Sample]) -> None:
        self.samples.extend(samples)
        oldest = time.time() - self.horizon_s
        while self.samples and self.samples[0].finished_at < oldest:
            self.samples.popleft()

    def summary(self, since: float) -> dict[str, dict[str, Any]]:
        """What each variant served since `since` (time.time())."""
        return summarize([s for s in self.samples if s.finished_at >= since])


def windows_actor(app: str, create: bool = False):
    """The application's store; with `create`, made if missing (routers do this, a canary only reads)."""
    if create:
        options = dict(name=actor_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True)
        return VariantWindows.options(**options).remote()
    return ray.get_actor(actor_name(app), namespace=NAMESPACE)


class WindowRecorder:
    """A router replica's side: samples go to the store in batches, every `flush_every_s`, from a task on the
    replica's event loop, so recording costs a request nothing it waits for."""

    def __init__(self, app: str, flush_every_s: float = 0.25):
        self.store = windows_actor(app, create=True)
        self.flush_every_s = flush_every_s
        self.pending: list[Sample] = []
        self.flusher: asyncio.Task | None = None

    def add(self, sample: Sample) -> None:
        """Called on the event loop, where the first call starts the flusher."""
        self.pending.append(sample)
        if self.flusher is None:
            self.flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_every_s)
            if self.pending:
                batch, self.pending = self.pending, []
                self.store.record.remote(batch)
