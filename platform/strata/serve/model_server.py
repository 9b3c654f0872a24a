"""The model deployment: one model version behind a continuous-batching engine, on its own scheduler thread.

It takes plain requests (a dict: prompt or messages, sampling settings) from the router and streams chunks of
text back; it knows nothing of HTTP, keys or splits.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from strata.config import VariantConfig
from strata.serve.engine import Engine, Output, SamplingParams, StepStats
from strata.serve.kv_cache import cache_tokens_in
from strata.serve.metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, ObservabilityErrors

METRICS_INTERVAL_S = 1.0  # how often a replica exports its engine's batch, queue, token and expert metrics


def _nonzero(counts) -> list[tuple[tuple[int, int], int]]:
    return [((int(i), int(j)), int(counts[i, j])) for i, j in counts.nonzero().tolist()]


@serve.deployment
class ModelServer:
    """One model version behind a continuous-batching engine. Its `generate` streams chunks of text.

    The first chunk is either an error (the prompt does not fit, or its prefill failed) or the result of the
    prefill, so a caller knows whether the request was accepted before it answers its client."""

    def __init__(self, model_name: str, variant: dict[str, Any], tracking_uri: str | None):
        import torch

        from strata import tracking
        from strata.models.moe_stats import ExpertLoadRecorder
        from strata.serve.loading import load_for_serving

        self.config = VariantConfig.model_validate(variant)
        if tracking_uri:
            tracking.use_store(tracking_uri)  # the registry too: a $MLFLOW_REGISTRY_URI on the node must not win
        torch.set_num_threads(self.config.engine.torch_threads or max(1, round(self.config.num_cpus)))
        model, self.tokenizer, self.info = load_for_serving(self.config)
        # Metrics and hooks record their failures here (logged, counted): observability never fails a request.
        self.observer_errors = ObservabilityErrors()
        self.experts = ExpertLoadRecorder(model, on_error=self.observer_errors.record)
        self._unreported_tokens, self._reported_errors, self._next_report = 0, 0, 0.0
        self.streams = 0  # requests being streamed now
        self.finish_reasons: collections.Counter[str] = collections.Counter()  # requests ended, by how
        settings = self.config.engine
        self.engine = Engine(
            model,
            self.tokenizer,
            settings.max_batch_size,
            on_step=self._record_step,
            admission_group=settings.admission_group,
            admission_wait_s=settings.admission_wait_s,
            kv_cache_tokens=settings.kv_cache_tokens or cache_tokens_in(model, settings.kv_cache_gb),
            observer_errors=self.observer_errors,
        )

        tags = {"model": model_name, "variant": self.config.name}
        self.ttft = Histogram(
            "strata_serve_time_to_first_token_seconds", boundaries=LATENCY_BUCKETS, tag_keys=tuple(tags)
        )
        self.tpot = Histogram(
            "strata_serve_time_per_output_token_seconds", boundaries=TOKEN_LATENCY_BUCKETS, tag_keys=tuple(tags)
        )
        self.batch_size = Gauge("strata_serve_batch_size", tag_keys=tuple(tags))
        self.queue_length = Gauge("strata_serve_queue_length", tag_keys=tuple(tags))
        self.cache_tokens = Gauge("strata_serve_kv_cache_tokens", tag_keys=tuple(tags))
        self.tokens = Counter("strata_serve_generated_tokens", tag_keys=tuple(tags))
        self.expert_tokens = Counter("strata_serve_expert_tokens", tag_keys=(*tags, "layer", "expert"))
        self.requests = Counter("strata_serve_requests", tag_keys=(*tags, "finish_reason"))
        self.errors = Counter("strata_serve_observability_errors", tag_keys=tuple(tags))
        metrics = (self.ttft, self.tpot, self.batch_size, self.queue_length, self.cache_tokens, self.tokens)
        for metric in (*metrics, self.expert_tokens, self.requests, self.errors):
            metric.set_default_tags(dict(tags))  # Serve adds its tags to the dict it gets
        threading.Thread(target=self.engine.run, name="strata-engine", daemon=True).start()

    def _record_step(self, stats: StepStats) -> None:
        """Runs on the engine thread after every iteration. Exports at most every METRICS_INTERVAL_S, and when the
        engine runs dry: recording a metric costs more than a small model's decode step would like to pay. Each
        export is guarded on its own, so one broken metric costs only its own data."""
        self._unreported_tokens += stats.batch_size
        drained = not stats.queue_length and not stats.running
        now = time.monotonic()
        if now < self._next_report and not drained:
            return
        self._next_report = now + METRICS_INTERVAL_S
        guard = self.observer_errors.guard
        guard(self.batch_size.set, 0 if drained else stats.batch_size)
        guard(self.queue_length.set, stats.queue_length)
        guard(self.cache_tokens.set, stats.cache_tokens)
        if self._unreported_tokens:
            tokens, self._unreported_tokens = self._unreported_tokens, 0
            guard(self.tokens.inc, tokens)
        guard(self._export_expert_load)
        errors = self.observer_errors.count
        if errors > self._reported_errors:
            guard(self.errors.inc, errors - self._reported_errors)
            self._reported_errors = errors

    def _export_expert_load(self) -> None:
        """Tokens routed to each expert since the last export: the one device-to-host copy of the expert counts."""
        for (layer, expert), count in _nonzero(self.experts.take().tokens_per_expert):
            self.expert_tokens.inc(count, tags={"layer": str(layer), "expert": str(expert)})

    def prompt_ids(self, request: dict[str, Any]) -> list[int]:
        if request.get("messages") is not None:
            return self.tokenizer.apply_chat_template(
                request["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        prompt = request["prompt"]
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt, add_special_tokens=False)

    async def generate(self, request: dict[str, Any], paced: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Chunks of new text. `paced` streams let tokens gather into a chunk for the stream interval (bounding what
        streaming costs); an unpaced reader takes each token as it comes, for a reply that waits on none."""
        started = time.perf_counter()
        ids = self.prompt_ids(request)
        params = SamplingParams(
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            top_p=request["top_p"],
            stop=tuple(request["stop"]),
        )
        if len(ids) + params.max_tokens > self.engine.max_context:
            yield {
                "error": f"This model's maximum context length is {self.engine.max_context} tokens; the prompt has "
                f"{len(ids)} and max_tokens asks for {params.max_tokens} more.",
                "status": 400,
                "code": "context_length_exceeded",
            }
            return
        if any(i < 0 or i >= len(self.tokenizer) for i in ids):
            yield {"error": "prompt token ids must lie in the vocabulary", "status": 400, "code": "invalid_prompt"}
            return

        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()
        try:
            request_id = self.engine.submit(ids, params, lambda o: loop.call_soon_threadsafe(outputs.put_nowait, o))
        except ValueError as err:  # more than this replica's KV cache can ever hold
            yield {"error": str(err), "status": 400, "code": "context_length_exceeded"}
            return
        guard = self.observer_errors.guard
        outcome, first_at = None, None  # outcome: the finish_reason the request is counted under, once it has one
        if paced:
            self.streams += 1
        try:
            while outcome is None:
                batch = [await outputs.get()]
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                last = batch[-1]
                outcome = last.finish_reason
                if outcome == "error":
                    if first_at is None:  # nothing sent yet: the client gets an OpenAI-style error
                        yield {"error": f"generation failed: {last.error}", "status": 503, "code": "server_error"}
                        return
                    raise RuntimeError(f"generation failed: {last.error}")
                if first_at is None:
                    first_at = time.perf_counter()
                    guard(self.ttft.observe, first_at - started)
                yield {
                    "text": "".join(o.text for o in batch),
                    "finish_reason": last.finish_reason,
                    "prompt_tokens": last.prompt_tokens,
                    "completion_tokens": last.completion_tokens,
                }
                if paced and outcome is None:
                    await asyncio.sleep(self._stream_interval())  # let tokens gather into one chunk
            if last.completion_tokens > 1:
                guard(self.tpot.observe, (time.perf_counter() - first_at) / (last.completion_tokens - 1))
        finally:
            if paced:
                self.streams -= 1
            if outcome is None:  # the caller went away: free the batch slot
                self.engine.cancel(request_id)
            self.finish_reasons[outcome or "cancelled"] += 1
            guard(self.requests.inc, tags={"finish_reason": outcome or "cancelled"})

    def check_health(self) -> None:
        """Serve's periodic health check: a failed engine makes Serve replace this replica."""
        if self.engine.failure:
            raise RuntimeError(f"the engine failed: {self.engine.failure}")

    def _stream_interval(self) -> float:
        settings = self.config.engine
        return max(settings.stream_interval_s, self.streams / settings.stream_chunks_per_s)

    def stats(self) -> dict[str, Any]:
        replica = serve.get_replica_context().replica_id.unique_id
        return {
            **self.engine.stats(),
            "finish_reasons": dict(self.finish_reasons),
            "info": self.info,
            "replica": replica,
            "pid": os.getpid(),
        }

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """The whole completion as one reply: an error, or the last chunk with all the text, the time to its first
        token (`ttft_s`) and the time it all took (`seconds`).

        Non-streaming requests take this path: one round trip from the router instead of a stream of chunks."""
        started, first_at, text, last = time.perf_counter(), None, [], {}
        async for chunk in self.generate(request, paced=False):
            if "error" in chunk:
                return chunk
            first_at = first_at or time.perf_counter()
            text.append(chunk["text"])
            last = chunk
        return {**last, "text": "".join(text), "ttft_s": first_at - started, "seconds": time.perf_counter() - started}
