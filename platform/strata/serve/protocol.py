"""The OpenAI HTTP protocol: request schemas, response bodies, server-sent events and OpenAI-style errors.

Requests are validated here, in the router, so bad input is answered with a 4xx and never reaches a model replica
(what needs the tokenizer, token ids in the vocabulary and the context length, is checked by the replica before
anything runs). The sampling parameters vLLM supports are honoured with OpenAI's semantics. Like OpenAI, unknown
request fields are rejected rather than ignored, and so are OpenAI fields no Strata model can honour (tools,
structured outputs, a fill-in-the-middle `suffix`): silently ignoring them would return something the client did not
ask for.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

Number = StrictFloat | StrictInt


class ApiError(Exception):
    """An error answered to the client with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers: dict[str, str] = {}

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_COMPLETIONS = 128  # completions one request may ask for (prompts x best_of), OpenAI's limit on `n`
LOGIT_BIAS_LIMIT = 300  # tokens one request may bias: each costs the engine work on every decode step

# OpenAI fields that no Strata model can honour. A request asking for one is refused, saying why; null, false and
# empty values ask for nothing, and so do the listed defaults.
NOT_SUPPORTED = {
    "tools": "this model has no tool calling",
    "tool_choice": "this model has no tool calling",
    "functions": "this model has no tool calling",
    "function_call": "this model has no tool calling",
    "response_format": "this server has no structured outputs",
    "audio": "this model reads and writes text only",
    "modalities": "this model reads and writes text only",
    "prediction": "this server has no predicted outputs",
    "reasoning_effort": "this model does not reason",
    "verbosity": "this model has no verbosity control",
    "moderation": "this server runs no moderation",
    "web_search_options": "this server has no web search",
    "store": "this server stores no completions",
    "metadata": "this server stores no completions",
}
NOT_SUPPORTED_DEFAULTS = {"response_format": [{"type": "text"}], "modalities": [["text"]], "function_call": ["none"]}


class _OpenAIObject(BaseModel):
    """A request object: unknown fields are errors, and null means the default (OpenAI's optional fields are
    nullable, and strict clients send them as null)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_OpenAIObject):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool = True  # Strata pads no chunks: there is nothing to leave out


class _Request(_OpenAIObject):
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(ge=0, le=1)] = 1.0
    n: Annotated[StrictInt, Field(ge=1, le=MAX_COMPLETIONS)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    logit_bias: Annotated[dict[int, Annotated[Number, Field(ge=-100, le=100)]], Field(max_length=LOGIT_BIAS_LIMIT)] = {}

    def stop_sequences(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    def candidates(self) -> int:
        """Completions generated per prompt (`best_of` for completions, else `n`)."""
        return self.n

    def engine_logprobs(self) -> int | None:
        """Top alternatives to report per token (0: the chosen token only), or None for no logprobs."""
        return None

    def check(self) -> None:
        """What a field's own type cannot say: combinations of fields. Raises ApiError(400)."""


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    best_of: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_form(cls, value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("a prompt is a string, a list of strings, token ids or a list of token id lists") from None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids. OpenAI answers `prompt_index * n + i` for each."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)

    def candidates(self) -> int:
        return self.n if self.best_of is None else self.best_of

    def engine_logprobs(self) -> int | None:
        return self.logprobs

    def check(self) -> None:
        prompts = self.prompts()
        if not prompts or not all(prompts):
            raise ApiError(400, "'prompt' must not be empty (nor any prompt in a list of them)", param="prompt")
        if self.suffix:
            raise ApiError(
                400, "suffix is not supported by this model: it was not trained to fill in the middle", param="suffix"
            )
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo cannot be combined with logprobs: prompt logprobs are not computed", param="echo")
        if self.candidates() < self.n:
            raise ApiError(400, f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of")
        if self.stream and self.candidates() > self.n:
            raise ApiError(400, "best_of > n cannot be streamed: the best are known only at the end", param="best_of")
        if len(prompts) * self.candidates() > MAX_COMPLETIONS:
            raise ApiError(
                400,
                f"{len(prompts)} prompts x {self.candidates()} completions each is over this server's limit of "
                f"{MAX_COMPLETIONS} completions per request",
                param="n" if self.best_of is None else "best_of",
            )


class TextPart(_OpenAIObject):
    type: Literal["text"]
    text: StrictStr


class Message(_OpenAIObject):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None
    refusal: StrictStr | None = None  # an earlier answer's, sent back with it; the chat template shows content only

    @field_validator("content", mode="wrap")
    @classmethod
    def _text_only(cls, value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("content is a string or a list of text parts: this model reads text only") from None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    # Hints that cannot change what is generated, accepted as OpenAI accepts them: no tools means no parallel calls,
    # the one service tier is the default one, and a prompt cache key or safety identifier only labels the request.
    parallel_tool_calls: StrictBool = True
    service_tier: Literal["auto", "default"] = "auto"
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")


def parse_request(schema: type[_Request], raw: bytes) -> _Request:
    """JSON bytes -> a validated request, or an ApiError(400) naming the offending field."""
    try:
        payload = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, and an integer past Python's 4,300 digits
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    try:
        json.dumps(payload, ensure_ascii=False).encode()  # JSON may escape a lone UTF-16 surrogate; no text holds one
    except UnicodeEncodeError as err:
        raise ApiError(400, f"the request body holds a lone UTF-16 surrogate: {err}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for name, why in NOT_SUPPORTED.items():
        value = payload.pop(name, None)
        if value not in (None, False, [], {}) and value not in NOT_SUPPORTED_DEFAULTS.get(name, []):
            raise ApiError(400, f"'{name}' is not supported: {why}", param=name)
    try:
        request = schema.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if _is_field(part)) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"Invalid value for '{param}': {message}", param=param) from None
    request.check()
    return request


def max_tokens_of(request: _Request, default: int, limit: int) -> int:
    value, param = getattr(request, "max_completion_tokens", None), "max_completion_tokens"  # the newer name wins
    if value is None:
        value, param = request.max_tokens, "max_tokens"
    if value is None:
        return min(default, limit)
    if value <= 0:
        raise ApiError(400, f"'{param}' must be at least 1, got {value}", param=param)
    if value > limit:
        raise ApiError(400, f"'{param}' is {value}, over this server's limit of {limit}", param=param)
    return value


def _is_field(loc_part: str | int) -> bool:
    """Pydantic adds union members ('str', 'list[int]') to error locations; OpenAI names only fields."""
    return isinstance(loc_part, int) or (loc_part.isidentifier() and loc_part not in {"str", "int", "float", "bool"})


# -- responses ----------------------------------------------------------------------------------------------------


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(obj: str, rid: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices, **extra}


def token_text(raw: bytes) -> str:
    """A token's text; one that ends inside a multi-byte character is shown by its bytes, as OpenAI does."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def logprobs_body(chat: bool, tokens: list[dict] | None) -> dict[str, Any] | None:
    """A choice's `logprobs` from the replica's tokens: {"bytes", "logprob", "top": [(bytes, logprob)], "offset"}.

    Chat lists each token with its bytes and top alternatives; completions have the older parallel lists, whose
    `top_logprobs` always include the chosen token, and `text_offset` (the token's character offset in the text)."""
    if tokens is None:
        return None
    if chat:
        content = [
            {
                "token": token_text(t["bytes"]),
                "logprob": t["logprob"],
                "bytes": list(t["bytes"]),
                "top_logprobs": [
                    {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)} for raw, logprob in t["top"]
                ],
            }
            for t in tokens
        ]
        return {"content": content, "refusal": None}
    return {
        "tokens": [token_text(t["bytes"]) for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [
            {**{token_text(raw): logprob for raw, logprob in t["top"]}, token_text(t["bytes"]): t["logprob"]}
            for t in tokens
        ],
        "text_offset": [t["offset"] for t in tokens],
    }


def _choice(chat: bool, choice: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": choice["index"],
        "finish_reason": choice["finish_reason"],
        "logprobs": logprobs_body(chat, choice["logprobs"]),
        **content,
    }


def response_body(chat: bool, rid: str, model: str, choices: list[dict], usage_: dict) -> dict[str, Any]:
    """The whole response. `choices` are the replica's: {"index", "text", "finish_reason", "logprobs"}."""
    if chat:
        body = [
            _choice(True, c, {"message": {"role": "assistant", "content": c["text"], "refusal": None}}) for c in choices
        ]
    else:
        body = [_choice(False, c, {"text": c["text"]}) for c in choices]
    return _envelope("chat.completion" if chat else "text_completion", rid, model, body, usage=usage_)


def chunk_body(chat: bool, rid: str, model: str, chunk: dict[str, Any], first: bool) -> dict[str, Any]:
    """One streamed chunk of one choice (`chunk["index"]`); a chat choice's first chunk names the role."""
    if chat:
        delta = {"role": "assistant", "content": chunk["text"]} if first else {"content": chunk["text"]}
        choice = _choice(True, chunk, {"delta": delta})
    else:
        choice = _choice(False, chunk, {"text": chunk["text"]})
    return _envelope("chat.completion.chunk" if chat else "text_completion", rid, model, [choice])


def usage_chunk(chat: bool, rid: str, model: str, usage_: dict) -> dict[str, Any]:
    return _envelope("chat.completion.chunk" if chat else "text_completion", rid, model, [], usage=usage_)


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
