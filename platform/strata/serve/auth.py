"""API keys and per-key rate limits for the OpenAI endpoints.

The router knows keys by their sha256 digests only: those in `auth.api_key_hashes` (what `strata deploy` writes,
from the keys in the deploying shell), plus the keys in the router's own `$STRATA_API_KEYS` and `auth.api_keys_file`.
A presented key is hashed and compared in constant time; only a key's id, a short prefix of its digest, ever appears
in logs and metrics, and no key is ever written to a config.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from strata.config import AuthSettings, RateLimit
from strata.paths import resolve
from strata.serve.protocol import ApiError

KEYS_ENV = "STRATA_API_KEYS"


def hash_key(key: str) -> str:
    """What a config holds in place of a key: its sha256 hex digest."""
    return hashlib.sha256(key.encode()).hexdigest()


def id_of_hash(digest: str) -> str:
    return "key-" + digest[:10]


def key_id(key: str) -> str:
    return id_of_hash(hash_key(key))


def new_key() -> str:
    return f"sk-strata-{secrets.token_hex(16)}"


def parse_keys(text: str) -> list[str]:
    """Keys as a keys file holds them: one per line, `#` starts a comment."""
    return [key for key in (line.split("#", 1)[0].strip() for line in text.splitlines()) if key]


def read_keys(keys_file: str | None) -> list[str]:
    """The keys in $STRATA_API_KEYS (comma-separated) and in `keys_file` (relative paths: under $STRATA_HOME)."""
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if keys_file:
        keys += parse_keys(Path(resolve(keys_file)).read_text())
    return keys


def key_hashes(auth: AuthSettings) -> list[str]:
    """Every key the router accepts, as digests: the config's, and the keys in this process's env and keys file."""
    return [*auth.api_key_hashes, *map(hash_key, read_keys(auth.api_keys_file))]


def ensure_keys_file(log: Callable[[str], None] = print) -> str | None:
    """None when $STRATA_API_KEYS is set; otherwise `$STRATA_HOME/serve/keys.txt`, made once with a fresh key."""
    if os.environ.get(KEYS_ENV):
        return None
    keys_file = Path(resolve("serve/keys.txt"))
    if not keys_file.exists():
        keys_file.parent.mkdir(parents=True, exist_ok=True)
        keys_file.write_text(new_key() + "\n")
        keys_file.chmod(0o600)
        log(f"created an API key in {keys_file}")
    return str(keys_file)


class Authenticator:
    def __init__(self, digests: Iterable[str], allow_anonymous: bool = False):
        self.digests = {id_of_hash(digest): digest for digest in digests}
        if not self.digests and not allow_anonymous:
            raise ValueError(
                f"no API keys: set auth.api_key_hashes (`strata keys hash`), auth.api_keys_file or {KEYS_ENV} "
                "(or auth.allow_anonymous: true)"
            )
        self.allow_anonymous = allow_anonymous and not self.digests

    def __call__(self, authorization: str | None) -> str:
        """The caller's key id from an `Authorization: Bearer KEY` header, or ApiError(401)."""
        if self.allow_anonymous:
            return "anonymous"
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        digest = hash_key(presented.strip())
        kid = id_of_hash(digest)
        known = self.digests.get(kid)
        if known is None or not hmac.compare_digest(known, digest):
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return kid


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `requests_per_minute`.

    Each of `replicas` router replicas keeps its own buckets with its share (1/replicas) of the rate and the burst,
    so a key gets no more than the configured limit from the whole application (a little less when its requests
    happen to land unevenly on the replicas)."""

    def __init__(self, default: RateLimit, per_key: dict[str, RateLimit] | None = None, replicas: int = 1):
        self.default, self.per_key, self.replicas = default, per_key or {}, replicas
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, updated at)
        self._lock = threading.Lock()

    def __call__(self, kid: str) -> None:
        """Take one request from `kid`'s bucket, or raise ApiError(429) with Retry-After."""
        limit = self.per_key.get(kid, self.default)
        rate, burst = limit.requests_per_minute / 60.0 / self.replicas, limit.burst / self.replicas
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
