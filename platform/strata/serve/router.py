"""The router: the OpenAI-compatible ingress in front of the model deployments.

    HTTP -> Router (auth, rate limit, validation, A/B split, audit) -> ModelServer[variant] (engine) -> tokens

The router owns everything about a request that does not need the model, so bad or unauthorised requests never
reach a replica holding one. Split weights live in the router's `user_config`: `serve deploy` of a config that
changes only them calls `reconfigure` on the running router, restarting nothing and failing no request in flight.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type of the endpoints'
# parameters, and Serve's ingress wrapper cannot resolve string annotations.
import asyncio
import collections
import logging
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
from strata.serve.auth import Authenticator, RateLimiter, key_hashes
from strata.serve.metrics import LATENCY_BUCKETS, ObservabilityErrors
from strata.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from strata.serve.routing import Split
from strata.serve.windows import CLIENT_CLOSED, Sample, WindowRecorder, waited

logger = logging.getLogger("ray.serve")  # the router replica's own log file

VARIANT_HEADER = "x-strata-variant"
SESSION_HEADER = "x-session-id"
ROLES = {"developer": "system"}


def engine_request(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    """What a ModelServer needs of a validated request (plain data: it crosses processes)."""
    chat = isinstance(body, ChatCompletionRequest)
    return {
        "prompts": None if chat else body.prompts(),
        # OpenAI's `developer` is the newer name of `system`, the role chat templates know.
        "messages": [{"role": ROLES.get(m.role, m.role), "content": m.text()} for m in body.messages] if chat else None,
        "n": body.n,
        "best_of": body.candidates(),
        "echo": not chat and body.echo,
        "logprobs": body.engine_logprobs(),
        "max_tokens": max_tokens,
        "temperature": float(body.temperature),
        "top_p": float(body.top_p),
        "stop": list(body.stop_sequences()),
        "seed": body.seed,
        "presence_penalty": float(body.presence_penalty),
        "frequency_penalty": float(body.frequency_penalty),
        "logit_bias": {token: float(bias) for token, bias in body.logit_bias.items()},
    }


def _completion(texts: dict[int, list[str]]) -> str | list[str]:
    """For the audit log: the text of the one choice, or of every choice in order."""
    joined = ["".join(texts[index]) for index in sorted(texts)]
    return joined[0] if len(joined) == 1 else joined


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
    completion: str | list[str] | None = None


async def _reply(pending: Awaitable[dict]) -> dict:
    """The first chunk of a ModelServer stream or its whole `complete` reply, or the ApiError it stands for.

    If the client goes away meanwhile, Serve cancels the router's request and, with it, this call to the replica."""
    try:
        reply = await pending
    except Exception as err:
        raise ApiError(500, f"the model replica failed: {type(err).__name__}", code="server_error") from err
    if "error" in reply:
        raise ApiError(reply["status"], reply["error"], param=reply.get("param"), code=reply.get("code"))
    return reply


async def _chunks(first: dict, stream) -> AsyncIterator[dict]:
    """The first chunk (already received: it told us the request was accepted), then the rest of the stream."""
    yield first
    async for chunk in stream:
        yield chunk


# -- the router ---------------------------------------------------------------------------------------------------

app = FastAPI(title="Strata", description="OpenAI-compatible serving of Strata MoE models, with A/B splits.")


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Router:
    def __init__(self, config: dict[str, Any], variants: dict[str, DeploymentHandle]):
        self.config = ServeConfig.model_validate(config)
        self.variants = variants
        self.variant_configs = {v.name: v for v in self.config.variants}
        auth, audit = self.config.auth, self.config.audit
        self.authenticate = Authenticator(key_hashes(auth), auth.allow_anonymous)
        # Each router replica enforces its share of the limits, so together they allow what the config says.
        self.rate_limit = RateLimiter(auth, auth.key_limits, replicas=self.config.router_replicas)
        self.audit = AuditLog(audit.path, audit.log_prompts, audit.max_bytes, audit.backup_count)
        self.split = Split(self.config.initial_weights, list(variants), salt=self.config.split_salt)

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
        # What a canary judges variants on, gathered from every router replica of this application.
        self.windows = WindowRecorder(serve.get_replica_context().app_name)
        self.observer_errors = ObservabilityErrors()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """New split weights, applied live: requests in flight keep the variant they were given. `variants` lists the
        variants added to a running replica group since the application started
        (`replica_groups.add_group_variant`): each is served by its group's handle, the group's replicas having loaded
        its adapter."""
        groups = {v.replica_group: self.variants[v.name] for v in self.config.variants if v.replica_group}
        for added in user_config.get("variants", []):
            variant = VariantConfig.model_validate(added)
            if variant.replica_group not in groups:
                raise ValueError(f"variant {variant.name!r} names no replica group of this application")
            self.variant_configs[variant.name] = variant  # first: a request may pick the variant once it is listed
            self.variants[variant.name] = groups[variant.replica_group]
        weights = user_config.get("weights") or self.config.initial_weights
        self.split = Split(weights, list(self.variants), salt=self.config.split_salt)
        for name, share in self.split.shares().items():
            self.weight.set(share, tags={"variant": name})

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: the audit lines still queued are written out."""
        if hasattr(self, "audit"):  # not when __init__ failed before opening it
            self.audit.close()

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
            request["variant"] = record.variant  # a replica group serves several: it picks the variant's adapter
            record.prompt = request["messages"] or body.prompt
            model_server = self.variants[record.variant]
            if body.stream:
                stream = model_server.options(stream=True).generate.remote(request)
                first = await _reply(stream.__anext__())
            else:
                reply = await _reply(model_server.complete.remote(request))
        except Exception as err:  # an ApiError, or a fault of the router's own: metrics and the audit see both
            if not isinstance(err, ApiError):
                logger.exception("request failed in the router")
                err = ApiError(500, f"the router failed: {type(err).__name__}", code="server_error")
            record.status = err.status
            self._finish(record)
            # A failure after the split chose a variant names it, as a success does: which version failed.
            chosen = {VARIANT_HEADER: record.variant} if record.variant != "-" else {}
            return JSONResponse(err.body(), status_code=err.status, headers={**err.headers, **chosen})
        except asyncio.CancelledError:
            record.status = CLIENT_CLOSED
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
        self._finish(record, reply, _completion({c["index"]: [c["text"]] for c in reply["choices"]}))
        usage = protocol.usage(reply["prompt_tokens"], reply["completion_tokens"])
        return JSONResponse(protocol.response_body(chat, rid, model, reply["choices"], usage), headers=headers)

    async def _events(self, stream, first, record: RequestRecord, chat: bool, rid: str, model: str, usage: bool):
        """Server-sent events, one choice per chunk; if the client disconnects, cancelling the stream frees the
        engine's batch slots."""
        last, texts, started = first, collections.defaultdict(list), set()
        try:
            async for chunk in _chunks(first, stream):
                last, index = chunk, chunk["index"]
                texts[index].append(chunk["text"])
                if chunk["text"] or chunk["finish_reason"] or chunk["logprobs"] or (chat and index not in started):
                    yield protocol.sse(protocol.chunk_body(chat, rid, model, chunk, index not in started))
                    started.add(index)
            if usage:
                yield protocol.sse(
                    protocol.usage_chunk(
                        chat, rid, model, protocol.usage(last["prompt_tokens"], last["completion_tokens"])
                    )
                )
            yield protocol.sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            record.status = CLIENT_CLOSED
            stream.cancel()
            raise
        except Exception as err:
            record.status = 500
            yield protocol.sse(ApiError(500, f"generation failed: {err}").body())
        finally:
            self._finish(record, last, _completion(texts))

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

    def _finish(
        self, record: RequestRecord, last: dict | None = None, completion: str | list[str] | None = None
    ) -> None:
        latency = time.perf_counter() - record.started
        if last:
            record.prompt_tokens, record.completion_tokens = last["prompt_tokens"], last["completion_tokens"]
        record.completion = completion
        tags = {"variant": record.variant}
        self.requests.inc(tags={**tags, "status": str(record.status)})
        if record.status >= 400:
            self.errors.inc(tags={**tags, "status": str(record.status)})
        elif record.completion_tokens:
            self.tokens.inc(record.completion_tokens, tags=tags)
        timed_latency, timed_ttft = waited(record.status, latency, record.ttft)
        if timed_latency is not None:
            self.latency.observe(timed_latency, tags=tags)
        if timed_ttft is not None:
            self.ttft.observe(timed_ttft, tags=tags)
        if record.variant != "-":  # refused before a variant was chosen: no variant's doing
            sample = Sample(time.time(), record.variant, record.status, latency, record.ttft)
            self.observer_errors.guard(self.windows.add, sample)
        self.audit.write(record, latency)
