"""The audit log: one JSON line per API request (who, which variant, how many tokens, how long, what status).

Keys appear only as their ids; prompts and completions only when `audit.log_prompts` is on.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from strata.paths import resolve


class AuditLog:
    def __init__(self, path: str, log_prompts: bool = False):
        self.path = Path(resolve(path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        self._file = self.path.open("a", buffering=1)  # line-buffered: each record lands whole

    def write(self, record: Any, latency_s: float) -> None:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
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
            line["prompt"], line["completion"] = record.prompt, record.completion
        with self._lock:
            self._file.write(json.dumps(line) + "\n")
