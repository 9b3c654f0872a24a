"""The audit log: one JSON line per API request (who, which variant, how many tokens, how long, what status).

Keys appear only as their ids; prompts and completions only when `audit.log_prompts` is on. The router's event loop
only formats a line and queues it: a background thread writes it (`logging`'s QueueListener) and rotates the file by
size, so a slow disk never holds up a request and the log never fills it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from datetime import datetime, timezone
from logging.handlers import QueueHandler, QueueListener, RotatingFileHandler
from pathlib import Path
from typing import Any

from strata.paths import resolve


class JsonLines(logging.Formatter):
    """A record's fields as one JSON line, stamped with its time (`created`) to the millisecond, in UTC."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        return json.dumps({"time": when.removesuffix("+00:00") + "Z", **record.msg})


class AuditLog:
    def __init__(self, path: str, log_prompts: bool = False, max_bytes: int = 100 * 2**20, backup_count: int = 10):
        self.path = Path(resolve(path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_prompts = log_prompts
        lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._queue = QueueHandler(lines)
        self._queue.setFormatter(JsonLines())
        file = RotatingFileHandler(self.path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        self._writer: QueueListener | None = QueueListener(lines, file)
        self._writer.start()
        self._lock = threading.Lock()

    def write(self, record: Any, latency_s: float) -> None:
        fields: dict[str, Any] = {
            "endpoint": record.endpoint,
            "key_id": record.key_id,
            "variant": record.variant,
            "status": record.status,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "latency_ms": round(latency_s * 1000, 2),
            "ttft_ms": None if record.ttft is None else round(record.ttft * 1000, 2),
        }
        if self.log_prompts:
            fields["prompt"], fields["completion"] = record.prompt, record.completion
        with self._lock:  # the clock is read and the line queued in one step: the file's times never run backwards
            self._queue.handle(logging.makeLogRecord({"msg": fields, "created": time.time()}))

    def close(self) -> None:
        """Write out what is queued and close the file. Only the first call does anything: Serve calls the router's
        `__del__` when it stops the replica, and Python may call it again."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer:
            writer.stop()
            for handler in writer.handlers:
                handler.close()
