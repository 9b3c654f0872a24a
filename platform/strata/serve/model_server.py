"""The model deployment: one model version behind a continuous-batching engine, each loop on its own scheduler thread.

It takes plain requests (a dict: prompt or messages, sampling settings) from the router and streams chunks of
text back; it knows nothing of HTTP, keys or splits.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import functools
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from strata.config import VariantConfig
from strata.serve.metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, ObservabilityErrors

# torch, transformers and the engine load in a replica, not on import: the Serve controller imports this module to
# build the application (`app.build_application`), and that build is on the path of every deploy (~6 s less here).
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from strata.serve.engine import Output, StepStats
    from strata.serve.sampling import SamplingParams, TokenLogprob

logger = logging.getLogger("ray.serve")  # the replica's own log file
METRICS_INTERVAL_S = 1.0  # how often a replica exports its engine's batch, queue, token and expert metrics


@serve.deployment
class ModelServer:
    """One model version behind a continuous-batching engine. Its `generate` streams chunks of text.

    The first chunk is either an error (the prompt does not fit, or its prefill failed) or the result of the
    prefill, so a caller knows whether the request was accepted before it answers its client.

    A replica group's server (`group`: its members' variant configs) serves several variants on one base, each row
    decoded with its variant's adapter (`shared_base.SharedBase`), with the first member's settings and metrics
    under the group's name. `reconfigure` loads a member added to its `user_config`, base untouched."""

    def __init__(
        self, model_name: str, variant: dict[str, Any], tracking_uri: str | None, group: list[dict] | None = None
    ):
        import torch

        from strata import tracking
        from strata.data.tokenizer import token_bytes
        from strata.models.moe_stats import ExpertLoadRecorder
        from strata.serve.engine_loops import EngineLoops
        from strata.serve.kv_cache import cache_tokens_in
        from strata.serve.loading import load_for_serving, on_passing_thread
        from strata.serve.shared_base import SharedBase

        self.config = VariantConfig.model_validate(variant)
        if tracking_uri:
            tracking.use_store(tracking_uri)  # the registry too: a $MLFLOW_REGISTRY_URI on the node must not win
        settings = self.config.engine
        threads = settings.torch_threads or max(1, round(self.config.num_cpus / settings.loops))  # per loop

        def load() -> tuple[SharedBase | None, Any, PreTrainedTokenizerBase, dict]:
            torch.set_num_threads(threads)
            if not group:
                return None, *load_for_serving(self.config)
            shared = SharedBase([VariantConfig.model_validate(v) for v in group])
            return shared, shared.model, shared.tokenizer, shared.info

        self.shared, model, self.tokenizer, self.info = on_passing_thread(load)
        self.revision: str | None = None  # of the last `user_config` applied
        self.token_bytes = token_bytes(self.tokenizer)  # what logprobs report of each token
        # Metrics and hooks record their failures here (logged, counted): observability never fails a request.
        self.observer_errors = ObservabilityErrors()
        self.experts = ExpertLoadRecorder(model, on_error=self.observer_errors.record)
        self._unreported_tokens, self._reported_errors, self._next_report = 0, 0, 0.0
        self.streams = 0  # choices being streamed now (each pass sends one chunk per choice)
        self.finish_reasons: collections.Counter[str] = collections.Counter()  # requests ended, by how
        self.engine = EngineLoops(
            model,
            self.tokenizer,
            settings.loops,
            settings.max_batch_size,
            kv_cache_tokens=settings.kv_cache_tokens or cache_tokens_in(model, settings.kv_cache_gb),
            on_step=self._record_step,
            observer_errors=self.observer_errors,
            admission_group=settings.admission_group,
            admission_wait_s=settings.admission_wait_s,
            torch_threads=threads,
            adapters=self.shared.adapters if self.shared else None,
        )

        tags = {"model": model_name, "variant": self.config.replica_group if group else self.config.name}
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
        self.engine.start()
        # Warm before ready: one-time set-up (and the first prefill of each prompt-length bucket) paid here, not by
        # a client, and a model that cannot generate is never ready (Serve retries it, and the deploy says why).
        adapters = list(dict.fromkeys(self.shared.adapter_of.values())) if self.shared else [None]
        seconds = self.engine.warm_up(adapters)
        self.experts.take()  # the warm-up's routed tokens are not traffic
        logger.info("warmed up in %.2f s: %d loop(s) x %d adapter(s)", seconds, settings.loops, len(adapters))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A replica group's members added since it started (`variants`): each new one's adapter is spliced in
        between two engine steps, once downloaded (`SharedBase.serve_added`: one that fails costs it alone)."""
        if not self.shared:
            raise ValueError("only a replica group's server takes a user_config (its `variants`)")
        members = [VariantConfig.model_validate(v) for v in user_config.get("variants", [])]
        self.shared.serve_added(members, splicing=self.engine.paused)
        self.revision = user_config.get("revision")  # which config `stats` answers for: a verdict is never stale

    def _record_step(self, stats: StepStats) -> None:
        """Runs on an engine thread after every iteration of one of its loops (one at a time; the stats are the
        replica's). Exports at most every METRICS_INTERVAL_S, and when the engine runs dry: recording a metric costs
        more than a small model's decode step would like to pay. Each export is guarded on its own, so one broken
        metric costs only its own data."""
        self._unreported_tokens += stats.tokens
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
        counts = self.experts.take().tokens_per_expert
        for layer, expert in counts.nonzero().tolist():
            self.expert_tokens.inc(int(counts[layer, expert]), tags={"layer": str(layer), "expert": str(expert)})

    def prompt_ids(self, request: dict[str, Any]) -> list[list[int]]:
        """Each prompt's token ids: the chat template applied to the messages, or each completion prompt."""
        if request.get("messages") is not None:
            return [
                self.tokenizer.apply_chat_template(
                    request["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            ]
        return [
            list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt, add_special_tokens=False)
            for prompt in request["prompts"]
        ]

    def sampling_params(self, request: dict[str, Any], candidate: int) -> SamplingParams:
        """The engine's params for one of a prompt's candidates. A seeded request's candidate i draws with seed + i,
        as in vLLM: n > 1 choices differ, and each is reproducible. Ranking best_of candidates needs logprobs."""
        from strata.serve.sampling import SamplingParams

        ranked = request["best_of"] > request["n"]
        return SamplingParams(
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            top_p=request["top_p"],
            stop=tuple(request["stop"]),
            presence_penalty=request["presence_penalty"],
            frequency_penalty=request["frequency_penalty"],
            logit_bias=request["logit_bias"],
            seed=None if request["seed"] is None else request["seed"] + candidate,
            logprobs=0 if ranked and request["logprobs"] is None else request["logprobs"],
        )

    def refusal(self, prompts: list[list[int]], request: dict[str, Any]) -> dict[str, Any] | None:
        """A 400 for what only the replica can check (it has the tokenizer), before anything is submitted."""
        vocab = min(len(self.tokenizer), self.engine.model.config.vocab_size)
        for ids in prompts:
            if not ids:
                return _bad_request("the prompt encodes to no tokens", "prompt", "invalid_prompt")
            if len(ids) + request["max_tokens"] > self.engine.max_context:
                return _bad_request(
                    f"This model's maximum context length is {self.engine.max_context} tokens; the prompt has "
                    f"{len(ids)} and max_tokens asks for {request['max_tokens']} more.",
                    "messages" if request.get("messages") else "prompt",
                    "context_length_exceeded",
                )
            if any(not 0 <= i < vocab for i in ids):
                return _bad_request(
                    f"prompt token ids must lie in the vocabulary (0..{vocab - 1})", "prompt", "invalid_prompt"
                )
        outside = sorted(t for t in request["logit_bias"] if not 0 <= t < vocab)
        if outside:
            return _bad_request(
                f"logit_bias names token ids outside the vocabulary (0..{vocab - 1}): {outside[:5]}", "logit_bias"
            )
        return None

    async def generate(self, request: dict[str, Any], paced: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Chunks of new text, each of one choice (`index`: prompt_index * candidates + i) and carrying the usage so
        far. `paced` streams let tokens gather into a chunk for the stream interval (bounding what streaming costs).
        An unpaced reader wants whole replies: the engine thread holds each choice's tokens and hands them over once
        it finishes, so no per-token wake-up takes the GIL from the engine loops; its chunks carry `ttft_s`."""
        started = time.perf_counter()
        try:
            prompts = self.prompt_ids(request)
        except TemplateError as err:  # a template that checks the conversation (roles alternating, a user turn)
            yield _bad_request(f"the model's chat template refuses these messages: {err}", "messages")
            return
        refusal = self.refusal(prompts, request)
        adapter = None
        if self.shared and not refusal:
            variant = request.get("variant")
            adapter = self.shared.adapter_of.get(variant)
            if why := self.shared.refused.get(variant):  # asked to serve it, failed to load it: the server's fault
                failed = f"variant {variant!r} failed to load on this replica: {why}"
                refusal = {"error": failed, "status": 503, "code": "server_error"}
            elif adapter is None:
                missing = f"this replica group serves no variant {variant!r}"
                refusal = {"error": missing, "status": 404, "code": "model_not_found"}
        if refusal:
            yield refusal
            return

        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        choices: dict[int, _Choice] = {}
        held: list[_Held] = []
        guard = self.observer_errors.guard
        first_at = None
        streamed = len(prompts) * request["best_of"] if paced else 0
        self.streams += streamed
        try:
            for prompt_index, ids in enumerate(prompts):
                for candidate in range(request["best_of"]):
                    index = prompt_index * request["best_of"] + candidate
                    params = self.sampling_params(request, candidate)
                    if paced:
                        sink = functools.partial(_deliver, loop, outputs, index)
                    else:
                        sink = _Held(loop, outputs, index)
                        held.append(sink)
                    try:
                        request_id = self.engine.submit(ids, params, sink, adapter)
                    except ValueError as err:  # more than this replica's KV cache can ever hold
                        yield _bad_request(str(err), "max_tokens", "context_length_exceeded")
                        return
                    except RuntimeError as err:  # every loop has failed: the health check replaces this replica
                        yield {"error": str(err), "status": 503, "code": "server_error"}
                        return
                    choices[index] = _Choice(
                        request_id, self.echo(request, prompt_index, ids), params.logprobs is not None
                    )
            while any(c.finish_reason is None for c in choices.values()):
                batch = [await outputs.get()]
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                failed = [(index, output) for index, output in batch if output.finish_reason == "error"]
                for index, _ in failed:
                    choices[index].finish_reason = "error"
                if failed:
                    reason = f"generation failed: {failed[0][1].error}"
                    if first_at is None:  # nothing sent yet: the client gets an OpenAI-style error
                        yield {"error": reason, "status": 503, "code": "server_error"}
                        return
                    raise RuntimeError(reason)
                if first_at is None:
                    first_at = min(h.first_at for h in held if h.first_at is not None) if held else time.perf_counter()
                    guard(self.ttft.observe, first_at - started)
                chunks: dict[int, dict[str, Any]] = {}
                for index, output in batch:
                    chunk = chunks.setdefault(index, choices[index].chunk(index))
                    chunk["text"] += output.text
                    chunk["finish_reason"] = choices[index].finish_reason = output.finish_reason
                    choices[index].completion_tokens = output.completion_tokens
                    if chunk["logprobs"] is not None:
                        chunk["logprobs"] += [choices[index].token(self.token_bytes, t) for t in output.logprobs]
                    if not paced:  # for `complete`'s best_of
                        chunk["cumulative_logprob"] = output.cumulative_logprob
                    if output.finish_reason and output.completion_tokens > 1:
                        per_token = (time.perf_counter() - first_at) / (output.completion_tokens - 1)
                        guard(self.tpot.observe, per_token)
                usage = {
                    "prompt_tokens": sum(len(ids) for ids in prompts),
                    "completion_tokens": sum(c.completion_tokens for c in choices.values()),
                    **({} if paced else {"ttft_s": first_at - started}),
                }
                for chunk in chunks.values():
                    yield {**chunk, **usage}
                if paced and any(c.finish_reason is None for c in choices.values()):
                    await asyncio.sleep(self._stream_interval())  # let tokens gather into one chunk
        finally:
            self.streams -= streamed
            for choice in choices.values():
                if choice.finish_reason is None:  # the caller went away: free the batch slot
                    self.engine.cancel(choice.request_id)
                reason = choice.finish_reason or "cancelled"
                self.finish_reasons[reason] += 1
                guard(self.requests.inc, tags={"finish_reason": reason})

    def echo(self, request: dict[str, Any], prompt_index: int, ids: list[int]) -> str:
        """The prompt as text, sent before its completion when the client asked for `echo`."""
        if not request["echo"]:
            return ""
        prompt = request["prompts"][prompt_index]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)

    def check_health(self) -> None:
        """Serve's periodic health check: a failed engine makes Serve replace this replica."""
        if self.engine.failure:
            raise RuntimeError(f"the engine failed: {self.engine.failure}")
        if self.shared:
            self.shared.retry_refused(splicing=self.engine.paused)

    def _stream_interval(self) -> float:
        settings = self.config.engine
        return max(settings.stream_interval_s, self.streams / settings.stream_chunks_per_s)

    def stats(self) -> dict[str, Any]:
        replica = serve.get_replica_context().replica_id.unique_id
        return {
            **self.engine.stats(),
            "finish_reasons": dict(self.finish_reasons),
            "info": self.info,
            "refused": dict(self.shared.refused) if self.shared else {},
            "revision": self.revision,
            "replica": replica,
            "pid": os.getpid(),
        }

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """The whole completion as one reply: an error, or the choices with the usage, the time to the first token
        (`ttft_s`) and the time it all took (`seconds`).

        Non-streaming requests take this path: one round trip from the router instead of a stream of chunks."""
        started, choices, scores, last = time.perf_counter(), {}, {}, {}
        async for chunk in self.generate(request, paced=False):
            if "error" in chunk:
                return chunk
            empty = {"index": chunk["index"], "text": "", "logprobs": None if chunk["logprobs"] is None else []}
            choice = choices.setdefault(chunk["index"], empty)
            choice["text"] += chunk["text"]
            choice["finish_reason"] = chunk["finish_reason"]
            if chunk["logprobs"] is not None:
                choice["logprobs"] += chunk["logprobs"]
            scores[chunk["index"]] = chunk["cumulative_logprob"]
            last = chunk
        return {
            "choices": best_of(sorted(choices.values(), key=lambda c: c["index"]), scores, request),
            "prompt_tokens": last["prompt_tokens"],
            "completion_tokens": last["completion_tokens"],  # of all candidates: each was generated
            "ttft_s": last["ttft_s"],
            "seconds": time.perf_counter() - started,
        }


@dataclass
class _Choice:
    """One engine request of a client request, and what its chunks still need."""

    request_id: int
    prefix: str  # the echoed prompt, sent with the first chunk
    logprobs: bool
    finish_reason: str | None = None
    completion_tokens: int = 0
    # The text of the tokens reported so far, decoded as the detokenizer does (invalid bytes become U+FFFD, a
    # character split between tokens waits for its end): `chars` is where the next token's text starts.
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    chars: int = 0

    def chunk(self, index: int) -> dict[str, Any]:
        chunk = {"index": index, "text": self.prefix, "finish_reason": None, "logprobs": [] if self.logprobs else None}
        self.prefix = ""
        return chunk

    def token(self, token_bytes: Callable[[int], bytes], logprob: TokenLogprob) -> dict[str, Any]:
        """A token's logprobs for the router: its bytes, its alternatives' and its character offset in the text."""
        raw, waiting = token_bytes(logprob.token), bool(self.decoder.getstate()[0])
        text = self.decoder.decode(raw)
        # Bytes left waiting by earlier tokens that this one shows invalid came out first, as one U+FFFD.
        offset = self.chars + int(waiting and text.startswith("\ufffd"))
        self.chars += len(text)
        top = [(token_bytes(token), value) for token, value in logprob.top]
        return {"bytes": raw, "logprob": logprob.logprob, "top": top, "offset": offset}


def best_of(choices: list[dict[str, Any]], scores: dict[int, float], request: dict[str, Any]) -> list[dict[str, Any]]:
    """The n of each prompt's best_of candidates with the highest cumulative logprob (`scores`, by index: of every
    token sampled, the EOS that ended a candidate included, as vLLM ranks them), best first, numbered
    prompt_index * n + i; their logprobs only if the client asked for them."""
    n, candidates = request["n"], request["best_of"]
    if candidates == n:
        return choices
    kept = []
    for first in range(0, len(choices), candidates):
        ranked = sorted(choices[first : first + candidates], key=lambda c: -scores[c["index"]])
        for i, choice in enumerate(ranked[:n]):
            logprobs = choice["logprobs"] if request["logprobs"] is not None else None
            kept.append({**choice, "index": first // candidates * n + i, "logprobs": logprobs})
    return kept


def _bad_request(message: str, param: str, code: str | None = None) -> dict[str, Any]:
    return {"error": message, "status": 400, "param": param, "code": code}


def _deliver(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, index: int, output: Output) -> None:
    """The engine thread's sink for one choice: hand its output to the request's event loop."""
    loop.call_soon_threadsafe(outputs.put_nowait, (index, output))


class _Held:
    """An unpaced reader's sink for one choice: keeps the outputs (noting when the first came), hands them on as one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, index: int):
        self.loop, self.outputs, self.index = loop, outputs, index
        self.parts: list[Output] = []
        self.first_at: float | None = None

    def __call__(self, output: Output) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.parts.append(output)
        if output.finish_reason:
            whole = replace(
                output,
                text="".join(part.text for part in self.parts),
                logprobs=tuple(itertools.chain.from_iterable(part.logprobs for part in self.parts)),
            )
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, (self.index, whole))
