"""Histogram buckets shared by the model replicas' and the router's latency metrics, and the guard that keeps
observability (metrics, hooks, callbacks) from ever failing a request."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]  # seconds
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]  # seconds per output token

logger = logging.getLogger(__name__)


class ObservabilityErrors:
    """Counts exceptions raised by observability code and logs them, at most once per `log_every_s`: a broken
    metric or hook costs its data, never a request. Thread-safe (the engine thread and the replica's event loop
    both record)."""

    def __init__(self, log_every_s: float = 60.0):
        self.count = 0
        self.log_every_s = log_every_s
        self._next_log = 0.0
        self._lock = threading.Lock()

    def record(self, err: Exception) -> None:
        with self._lock:
            self.count += 1
            count, now = self.count, time.monotonic()
            if now < self._next_log:
                return
            self._next_log = now + self.log_every_s
        logger.warning("observability failed (%d times so far); requests go on", count, exc_info=err)

    def guard(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """`call(*args, **kwargs)`, its exception recorded instead of raised."""
        try:
            call(*args, **kwargs)
        except Exception as err:
            self.record(err)
