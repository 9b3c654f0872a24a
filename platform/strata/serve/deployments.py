"""Ray Serve deployments: one `ModelServer` per model version, and the OpenAI `Router` in front of them.

    HTTP -> Router (auth, rate limit, validation, A/B split, audit) -> ModelServer[variant] (engine) -> tokens

The router owns everything about a request that does not need the model, so bad or unauthorised requests never
reach a replica holding one. Split weights live in the router's `user_config`: `serve deploy` of a config that
changes only them calls `reconfigure` on the running router, restarting nothing and failing no request in flight.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type of the endpoints'
# parameters, and Serve's ingress wrapper cannot resolve string annotations.
import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram

from strata.config import ServeConfig, VariantConfig
from strata.serve import protocol
from strata.serve.audit import AuditLog
from strata.serve.auth import Authenticator, RateLimiter, load_keys
from strata.serve.engine import Engine, Output, SamplingParams, StepStats
from strata.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from strata.serve.routing import Split

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
METRICS_INTERVAL_S = 1.0  # how often a replica exports its engine's batch, queue, token and expert metrics
VARIANT_HEADER = "x-strata-variant"
SESSION_HEADER = "x-session-id"


# -- helpers (defined before the deployments: Serve serialises a deployment's class when it is declared) --


def engine_request(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    """What a ModelServer needs of a validated request (plain data: it crosses processes)."""
    return {
        "prompt": body.prompt if isinstance(body, CompletionRequest) else None,
        "messages": [{"role": m.role, "content": m.text()} for m in body.messages]
        if isinstance(body, ChatCompletionRequest)
        else None,
        "max_tokens": max_tokens,
        "temperature": float(body.temperature),
        "top_p": float(body.top_p),
        "stop": list(body.stop_sequences()),
    }


def _nonzero(counts) -> list[tuple[tuple[int, int], int]]:
    return [((int(i), int(j)), int(counts[i, j])) for i, j in counts.nonzero().tolist()]


@dataclass
class RequestRecord:
    """What the audit log and the per-variant metrics learn about one request."""

    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    key_id: str = "-"
    variant: str = "-"
    status: int = 200
    user: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    prompt: Any = None
    completion: str | None = None


async def _reply(pending: Awaitable[dict]) -> dict:
    """The first chunk of a ModelServer stream or its whole `complete` reply, or the ApiError it stands for.

    If the client goes away meanwhile, Serve cancels the router's request and, with it, this call to the replica."""
    try:
        reply = await pending
    except Exception as err:
        raise ApiError(500, f"the model replica failed: {type(err).__name__}", code="server_error") from err
    if "error" in reply:
        raise ApiError(reply["status"], reply["error"], code=reply.get("code"))
    return reply


async def _chunks(first: dict, stream) -> AsyncIterator[dict]:
    """The first chunk (already received: it told us the request was accepted), then the rest of the stream."""
    yield first
    async for chunk in stream:
        yield chunk


@serve.deployment
class ModelServer:
    """One model version behind a continuous-batching engine. Its `generate` streams chunks of text.

    The first chunk is either an error (the prompt does not fit) or the result of the prefill, so a caller knows
    whether the request was accepted before it answers its client."""

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
        self.experts = ExpertLoadRecorder(model)
        self._experts_reported = None
        self._unreported_tokens, self._next_report = 0, 0.0
        self.streams = 0  # requests being streamed now
        settings = self.config.engine
        self.engine = Engine(
            model,
            self.tokenizer,
            settings.max_batch_size,
            on_step=self._record_step,
            admission_group=settings.admission_group,
            admission_wait_s=settings.admission_wait_s,
        )
        threading.Thread(target=self.engine.run, name="strata-engine", daemon=True).start()

        tags = {"model": model_name, "variant": self.config.name}
        self.ttft = Histogram(
            "strata_serve_time_to_first_token_seconds", boundaries=LATENCY_BUCKETS, tag_keys=tuple(tags)
        )
        self.tpot = Histogram(
            "strata_serve_time_per_output_token_seconds", boundaries=TOKEN_LATENCY_BUCKETS, tag_keys=tuple(tags)
        )
        self.batch_size = Gauge("strata_serve_batch_size", tag_keys=tuple(tags))
        self.queue_length = Gauge("strata_serve_queue_length", tag_keys=tuple(tags))
        self.tokens = Counter("strata_serve_generated_tokens", tag_keys=tuple(tags))
        self.expert_tokens = Counter("strata_serve_expert_tokens", tag_keys=(*tags, "layer", "expert"))
        self.requests = Counter("strata_serve_requests", tag_keys=(*tags, "finish_reason"))
        metrics = (self.ttft, self.tpot, self.batch_size, self.queue_length, self.tokens, self.expert_tokens)
        for metric in (*metrics, self.requests):
            metric.set_default_tags(dict(tags))  # Serve adds its tags to the dict it gets

    def _record_step(self, stats: StepStats) -> None:
        """Runs on the engine thread after every iteration. Exports at most every METRICS_INTERVAL_S, and when the
        engine runs dry: recording a metric costs more than a small model's decode step would like to pay."""
        self._unreported_tokens += stats.batch_size
        drained = not stats.queue_length and not stats.running
        now = time.monotonic()
        if now < self._next_report and not drained:
            return
        self._next_report = now + METRICS_INTERVAL_S
        self.batch_size.set(0 if drained else stats.batch_size)
        self.queue_length.set(stats.queue_length)
        if self._unreported_tokens:
            self.tokens.inc(self._unreported_tokens)
            self._unreported_tokens = 0
        load = self.experts.total
        if load is not None and load is not self._experts_reported:
            previous = self._experts_reported.tokens_per_expert if self._experts_reported else 0
            for (layer, expert), count in _nonzero(load.tokens_per_expert - previous):
                self.expert_tokens.inc(count, tags={"layer": str(layer), "expert": str(expert)})
            self._experts_reported = load

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
        request_id = self.engine.submit(ids, params, lambda o: loop.call_soon_threadsafe(outputs.put_nowait, o))
        finished, first_at = False, None
        if paced:
            self.streams += 1
        try:
            while not finished:
                batch = [await outputs.get()]
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                last = batch[-1]
                if last.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {self.engine.failure}")
                finished = last.finish_reason is not None
                if first_at is None:
                    first_at = time.perf_counter()
                    self.ttft.observe(first_at - started)
                yield {
                    "text": "".join(o.text for o in batch),
                    "finish_reason": last.finish_reason,
                    "prompt_tokens": last.prompt_tokens,
                    "completion_tokens": last.completion_tokens,
                }
                if paced and not finished:
                    await asyncio.sleep(self._stream_interval())  # let tokens gather into one chunk
            if last.completion_tokens > 1:
                self.tpot.observe((time.perf_counter() - first_at) / (last.completion_tokens - 1))
            self.requests.inc(tags={"finish_reason": last.finish_reason})
        finally:
            if paced:
                self.streams -= 1
            if not finished:  # the caller went away: free the batch slot
                self.engine.cancel(request_id)
                self.requests.inc(tags={"finish_reason": "cancelled"})

    def check_health(self) -> None:
        """Serve's periodic health check: a failed engine makes Serve replace this replica."""
        if self.engine.failure:
            raise RuntimeError(f"the engine failed: {self.engine.failure}")

    def _stream_interval(self) -> float:
        settings = self.config.engine
        return max(settings.stream_interval_s, self.streams / settings.stream_chunks_per_s)

    def stats(self) -> dict[str, Any]:
        replica = serve.get_replica_context().replica_id.unique_id
        return {**self.engine.stats(), "info": self.info, "replica": replica, "pid": os.getpid()}

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

    async def __call__(self, http: Request) -> JSONResponse:
        """Plain completions straight to this deployment, without the router (its latency baseline)."""
        try:
            body = protocol.parse_request(CompletionRequest, await http.body())
            max_tokens = protocol.max_tokens_of(
                body, self.config.engine.default_max_tokens, self.config.engine.max_tokens_limit
            )
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        reply = await self.complete(engine_request(body, max_tokens))
        if "error" in reply:
            return JSONResponse(ApiError(reply["status"], reply["error"]).body(), status_code=reply["status"])
        usage = protocol.usage(reply["prompt_tokens"], reply["completion_tokens"])
        rid = protocol.completion_id(chat=False)
        return JSONResponse(
            protocol.response_body(False, rid, body.model, reply["text"], reply["finish_reason"], usage)
        )


# -- the router ---------------------------------------------------------------------------------------------------

app = FastAPI(title="Strata", description="OpenAI-compatible serving of Strata MoE models, with A/B splits.")


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Router:
    def __init__(self, config: dict[str, Any], variants: dict[str, DeploymentHandle]):
        self.config = ServeConfig.model_validate(config)
        self.variants = variants
        self.variant_configs = {v.name: v for v in self.config.variants}
        self.authenticate = Authenticator(load_keys(self.config.auth.api_keys_file), self.config.auth.allow_anonymous)
        self.rate_limit = RateLimiter(self.config.auth, self.config.auth.key_limits)
        self.audit = AuditLog(self.config.audit.path, self.config.audit.log_prompts)
        self.split = Split(self.config.initial_weights, list(variants))

        tags = {"model": self.config.model_name}
        self.requests = Counter("strata_router_requests", tag_keys=("model", "variant", "status"))
        self.errors = Counter("strata_router_errors", tag_keys=("model", "variant", "status"))
        self.latency = Histogram(
            "strata_router_request_latency_seconds", boundaries=LATENCY_BUCKETS, tag_keys=("model", "variant")
        )
        self.ttft = Histogram(
            "strata_router_time_to_first_token_seconds", boundaries=LATENCY_BUCKETS, tag_keys=("model", "variant")
        )
        self.tokens = Counter("strata_router_generated_tokens", tag_keys=("model", "variant"))
        self.weight = Gauge("strata_router_split_weight", tag_keys=("model", "variant"))
        for metric in (self.requests, self.errors, self.latency, self.ttft, self.tokens, self.weight):
            metric.set_default_tags(dict(tags))  # Serve adds its tags to the dict it gets

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """New split weights, applied live: requests in flight keep the variant they were given."""
        self.split = Split(user_config.get("weights") or self.config.initial_weights, list(self.variants))
        for name, share in self.split.shares().items():
            self.weight.set(share, tags={"variant": name})

    # -- endpoints ------------------------------------------------------------------------------------------------

    @app.get("/health")
    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.config.model_name,
            "split": self.split.shares(),
            "replica": serve.get_replica_context().replica_id.unique_id,
        }

    @app.get("/v1/models")
    def models(self, http: Request) -> JSONResponse:
        try:
            self.authenticate(http.headers.get("authorization"))
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        ids = [self.config.model_name] + [f"{self.config.model_name}:{name}" for name in self.variants]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "strata"} for i in ids]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(self, http: Request):
        return await self._generate(http, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, http: Request):
        return await self._generate(http, ChatCompletionRequest)

    # -- the request path -----------------------------------------------------------------------------------------

    async def _generate(self, http: Request, schema: type[CompletionRequest | ChatCompletionRequest]):
        chat = schema is ChatCompletionRequest
        record = RequestRecord(endpoint=http.url.path)
        try:
            record.key_id = self.authenticate(http.headers.get("authorization"))
            self.rate_limit(record.key_id)
            body = protocol.parse_request(schema, await self._read_body(http))
            record.user = body.user or http.headers.get(SESSION_HEADER)
            record.variant = self._choose_variant(body.model, http.headers.get(VARIANT_HEADER), record.user)
            engine = self.variant_configs[record.variant].engine
            request = engine_request(
                body, protocol.max_tokens_of(body, engine.default_max_tokens, engine.max_tokens_limit)
            )
            record.prompt = request["messages"] or request["prompt"]
            model_server = self.variants[record.variant]
            if body.stream:
                stream = model_server.options(stream=True).generate.remote(request)
                first = await _reply(stream.__anext__())
            else:
                reply = await _reply(model_server.complete.remote(request))
        except ApiError as err:
            record.status = err.status
            self._finish(record)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        except asyncio.CancelledError:
            record.status = 499  # client closed the request
            self._finish(record)
            raise

        model = f"{self.config.model_name}:{record.variant}"
        headers = {VARIANT_HEADER: record.variant}
        rid = protocol.completion_id(chat)
        if body.stream:
            record.ttft = time.perf_counter() - record.started
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(stream, first, record, chat, rid, model, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        # The client saw no first token: count the time up to the replica's, leaving out the rest of its work.
        record.ttft = (time.perf_counter() - record.started) - reply["seconds"] + reply["ttft_s"]
        self._finish(record, reply, reply["text"])
        usage = protocol.usage(reply["prompt_tokens"], reply["completion_tokens"])
        return JSONResponse(
            protocol.response_body(chat, rid, model, reply["text"], reply["finish_reason"], usage), headers=headers
        )

    async def _events(self, stream, first, record: RequestRecord, chat: bool, rid: str, model: str, usage: bool):
        """Server-sent events; if the client disconnects, cancelling the stream frees the engine's batch slot."""
        last, text, is_first = first, [], True
        try:
            async for chunk in _chunks(first, stream):
                last = chunk
                text.append(chunk["text"])
                if chunk["text"] or chunk["finish_reason"] or (chat and is_first):
                    yield protocol.sse(
                        protocol.chunk_body(chat, rid, model, chunk["text"], chunk["finish_reason"], is_first)
                    )
                    is_first = False
            if usage:
                yield protocol.sse(
                    protocol.usage_chunk(
                        chat, rid, model, protocol.usage(last["prompt_tokens"], last["completion_tokens"])
                    )
                )
            yield protocol.sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            record.status = 499  # client closed the request
            stream.cancel()
            raise
        except Exception as err:
            record.status = 500
            yield protocol.sse(ApiError(500, f"generation failed: {err}").body())
        finally:
            self._finish(record, last, "".join(text))

    async def _read_body(self, http: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = http.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes, over the limit of {limit}")
        body = bytearray()
        async for part in http.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        return bytes(body)

    def _choose_variant(self, model: str, pinned: str | None, user: str | None) -> str:
        """`NAME` gets the split (sticky per user); `NAME:VARIANT` or the x-strata-variant header pins one."""
        name, _, variant = model.partition(":")
        if name != self.config.model_name or (variant and variant not in self.variants):
            raise ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        variant = variant or pinned
        if variant and variant not in self.variants:
            raise ApiError(404, f"no variant '{variant}'; there are {sorted(self.variants)}", code="model_not_found")
        return variant or self.split.assign(user)

    def _finish(self, record: RequestRecord, last: dict | None = None, completion: str | None = None) -> None:
        latency = time.perf_counter() - record.started
        if last:
            record.prompt_tokens, record.completion_tokens = last["prompt_tokens"], last["completion_tokens"]
        record.completion = completion
        tags = {"variant": record.variant}
        self.requests.inc(tags={**tags, "status": str(record.status)})
        if record.status >= 400:
            self.errors.inc(tags={**tags, "status": str(record.status)})
        else:
            self.latency.observe(latency, tags=tags)
            if record.ttft is not None:
                self.ttft.observe(record.ttft, tags=tags)
            if record.completion_tokens:
                self.tokens.inc(record.completion_tokens, tags=tags)
        self.audit.write(record, latency)


def build_application(config: ServeConfig, tracking_uri: str | None = None) -> serve.Application:
    """The A/B application: a ModelServer deployment per variant behind one Router."""
    variants = {}
    for variant in config.variants:
        scaling = (
            {"autoscaling_config": variant.autoscaling.model_dump()}
            if variant.autoscaling
            else {"num_replicas": variant.num_replicas}
        )
        variants[variant.name] = ModelServer.options(
            name=f"model-{variant.name}",
            ray_actor_options={"num_cpus": variant.num_cpus, "num_gpus": variant.num_gpus},
            # Enough concurrent requests per replica to fill the engine's batch, plus a queue behind it.
            max_ongoing_requests=2 * variant.engine.max_batch_size,
            **scaling,
        ).bind(config.model_name, variant.model_dump(), config.tracking_uri or tracking_uri)
    return Router.options(
        num_replicas=config.router_replicas,
        ray_actor_options={"num_cpus": config.router_num_cpus},
        user_config={"weights": config.initial_weights},
    ).bind(config.model_dump(), variants)
