"""The OpenAI HTTP protocol: request schemas, response bodies, server-sent events and OpenAI-style errors.

Requests are validated here, in the router, so bad input is answered with a 4xx and never reaches a model replica.
Like OpenAI, unknown request fields are rejected rather than ignored, and so are OpenAI fields that Strata does not
implement (n > 1, logprobs, penalties): silently ignoring them would return something the client did not ask for.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    n: Literal[1] = 1
    seed: StrictInt | None = None  # accepted for compatibility; sampling is seeded per replica

    def stop_sequences(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(_Request):
    prompt: (
        StrictStr
        | Annotated[list[StrictInt], Field(min_length=1)]
        | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    )
    echo: Literal[False] = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None


def parse_request(schema: type[_Request], raw: bytes) -> _Request:
    """JSON bytes -> a validated request, or an ApiError(400) naming the offending field."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if _is_field(part)) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        raise ApiError(400, f"Invalid value for '{param}': {first['msg']}", param=param) from None


def max_tokens_of(request: _Request, default: int, limit: int) -> int:
    value = getattr(request, "max_completion_tokens", None) or request.max_tokens
    param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
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


def _choice(finish: str | None, **content: Any) -> dict[str, Any]:
    return {"index": 0, "finish_reason": finish, "logprobs": None, **content}


def response_body(chat: bool, rid: str, model: str, text: str, finish: str | None, usage_: dict) -> dict[str, Any]:
    if chat:
        choice = _choice(finish, message={"role": "assistant", "content": text})
    else:
        choice = _choice(finish, text=text)
    return _envelope("chat.completion" if chat else "text_completion", rid, model, [choice], usage=usage_)


def chunk_body(chat: bool, rid: str, model: str, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    if chat:
        choice = _choice(finish, delta={"role": "assistant", "content": text} if first else {"content": text})
    else:
        choice = _choice(finish, text=text)
    return _envelope("chat.completion.chunk" if chat else "text_completion", rid, model, [choice])


def usage_chunk(chat: bool, rid: str, model: str, usage_: dict) -> dict[str, Any]:
    return _envelope("chat.completion.chunk" if chat else "text_completion", rid, model, [], usage=usage_)


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
