"""API keys and per-key rate limits for the OpenAI endpoints.

Keys come from `STRATA_API_KEYS` (comma-separated) and/or a keys file (one key per line, `#` comments). Only a
key's id, a short hash, ever appears in logs and metrics; the key itself is compared in constant time and never
stored anywhere but memory.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from strata.config import RateLimit
from strata.paths import resolve
from strata.serve.protocol import ApiError

KEYS_ENV = "STRATA_API_KEYS"


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def load_keys(keys_file: str | None) -> dict[str, str]:
    """key id -> key, from the environment and the keys file."""
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",")]
    if keys_file:
        lines = Path(keys_file).read_text().splitlines()
        keys += [line.split("#", 1)[0].strip() for line in lines]
    return {key_id(k): k for k in keys if k}


def ensure_keys_file(log: Callable[[str], None] = print) -> str | None:
    """None when $STRATA_API_KEYS is set; otherwise `$STRATA_HOME/serve/keys.txt`, made once with a fresh key."""
    if os.environ.get(KEYS_ENV):
        return None
    keys_file = Path(resolve("serve/keys.txt"))
    if not keys_file.exists():
        keys_file.parent.mkdir(parents=True, exist_ok=True)
        keys_file.write_text(f"sk-strata-{secrets.token_hex(16)}\n")
        keys_file.chmod(0o600)
        log(f"created an API key in {keys_file}")
    return str(keys_file)


class Authenticator:
    def __init__(self, keys: dict[str, str], allow_anonymous: bool = False):
        if not keys and not allow_anonymous:
            raise ValueError(f"no API keys: set {KEYS_ENV} or auth.api_keys_file (or auth.allow_anonymous: true)")
        self.keys = keys
        self.allow_anonymous = allow_anonymous and not keys

    def __call__(self, authorization: str | None) -> str:
        """The caller's key id from an `Authorization: Bearer KEY` header, or ApiError(401)."""
        if self.allow_anonymous:
            return "anonymous"
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        presented = presented.strip()
        kid = key_id(presented)
        known = self.keys.get(kid)
        if known is None or not hmac.compare_digest(known, presented):
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return kid


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `requests_per_minute`."""

    def __init__(self, default: RateLimit, per_key: dict[str, RateLimit] | None = None):
        self.default, self.per_key = default, per_key or {}
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, updated at)
        self._lock = threading.Lock()

    def __call__(self, kid: str) -> None:
        """Take one request from `kid`'s bucket, or raise ApiError(429) with Retry-After."""
        limit = self.per_key.get(kid, self.default)
        rate, burst = limit.requests_per_minute / 60.0, float(limit.burst)
        now = time.monotonic()
        with self._lock:
            tokens, updated = self._buckets.get(kid, (burst, now))
            tokens = min(burst, tokens + (now - updated) * rate)
            if tokens < 1.0:
                self._buckets[kid] = (tokens, now)
                retry_after = math.ceil((1.0 - tokens) / rate)
                err = ApiError(
                    429, f"rate limit exceeded for {kid}; retry in {retry_after}s", code="rate_limit_exceeded"
                )
                err.headers["Retry-After"] = str(retry_after)
                raise err
            self._buckets[kid] = (tokens - 1.0, now)
