"""Synthetic traffic for a running endpoint: concurrent OpenAI clients, and what each variant served: a burst of
requests (`send`), or steady traffic for as long as a block runs (`BackgroundTraffic`)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import random
import statistics
import threading
import time
from dataclasses import dataclass

import httpx
from rich.progress import Progress

PROMPTS = ["def parse(", "import os\n", "class Config:\n    def", "for line in", "return self.", "    if not "]


@dataclass
class Sample:
    variant: str
    status: int
    latency_s: float
    ttft_s: float | None
    completion_tokens: int


async def _one(http: httpx.AsyncClient, base_url: str, body: dict) -> Sample:
    started, ttft, tokens = time.perf_counter(), None, 0
    if not body.get("stream"):
        response = await http.post(f"{base_url}/completions", json=body)
        latency = time.perf_counter() - started
        if response.status_code == 200:
            tokens = response.json()["usage"]["completion_tokens"]
        return Sample(response.headers.get("x-strata-variant", "-"), response.status_code, latency, None, tokens)
    async with http.stream("POST", f"{base_url}/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                ttft = ttft or time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return Sample(
            response.headers.get("x-strata-variant", "-"),
            response.status_code,
            time.perf_counter() - started,
            ttft,
            tokens,
        )


def send(
    base_url: str, api_key: str, model: str, requests: int, concurrency: int, max_tokens: int = 16, seed: int = 0
) -> list[Sample]:
    """`requests` completions from `concurrency` clients: half streamed, a third from 20 sticky users."""
    rng = random.Random(seed)
    bodies = []
    for i in range(requests):
        body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "temperature": 0.7}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        if i % 3 == 0:
            body["user"] = f"user-{rng.randrange(20)}"
        bodies.append(body)

    async def run() -> list[Sample]:
        headers = {"Authorization": f"Bearer {api_key}"}
        limits = httpx.Limits(max_connections=concurrency)
        semaphore = asyncio.Semaphore(concurrency)
        with Progress(transient=True) as progress:
            task = progress.add_task(f"{requests} requests, {concurrency} concurrent clients", total=requests)
            async with httpx.AsyncClient(headers=headers, limits=limits, timeout=120) as http:

                async def limited(body: dict) -> Sample:
                    async with semaphore:
                        sample = await _one(http, base_url, body)
                    progress.advance(task)
                    return sample

                return await asyncio.gather(*(limited(b) for b in bodies))

    return asyncio.run(run())


def summarize(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Per variant ("-" for requests refused before one was chosen): requests, share, errors by status,
    latency p50/p95 (ms), TTFT p50 (ms, streamed requests), generated tokens."""
    summary = {}
    for variant in sorted({s.variant for s in samples}):
        mine = [s for s in samples if s.variant == variant]
        ok = [s for s in mine if s.status == 200]
        latencies = sorted(s.latency_s * 1000 for s in ok) or [float("nan")]
        ttfts = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
        summary[variant] = {
            "requests": len(mine),
            "share": len(mine) / len(samples),
            "errors": len(mine) - len(ok),
            "error_statuses": dict(collections.Counter(s.status for s in mine if s.status != 200)),
            "latency_p50_ms": statistics.median(latencies),
            "latency_p95_ms": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "ttft_p50_ms": statistics.median(ttfts) if ttfts else float("nan"),
            "tokens": sum(s.completion_tokens for s in ok),
        }
    return summary


class BackgroundTraffic:
    """`clients` concurrent clients sending short completions until the block ends, as live users would during a
    canary; what each variant answered, as the clients saw it: `(variant, status, time.time() of the reply)`, the
    status an exception's name on a network error."""

    def __init__(self, base_url: str, api_key: str, model: str, clients: int = 3, max_tokens: int = 4):
        self.url, self.model, self.max_tokens = f"{base_url}/completions", model, max_tokens
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.stopped = threading.Event()
        self.seen: list[tuple[str, int | str, float]] = []
        self.threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(clients)]

    def _send(self, client: int) -> None:
        with httpx.Client(headers=self.headers, timeout=60) as http:
            for i in itertools.count(client):
                if self.stopped.is_set():
                    return
                body = {"model": self.model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": self.max_tokens}
                try:
                    response = http.post(self.url, json=body | {"temperature": 0.7})
                    variant = response.headers.get("x-strata-variant", "-")
                    self.seen.append((variant, response.status_code, time.time()))
                except httpx.HTTPError as err:
                    self.seen.append(("-", type(err).__name__, time.time()))

    def __enter__(self) -> BackgroundTraffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def failures(self) -> collections.Counter:
        """Failed requests per variant ("-": failed before the router chose one)."""
        return collections.Counter(variant for variant, status, _ in self.seen if status != 200)
