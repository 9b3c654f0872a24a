"""Where Strata writes things: everything relative is rooted at $STRATA_HOME (default: the working directory).

Under `ray job submit --working-dir .` the working directory is a temporary copy of the checkout, so a job
that should write into a fixed place sets STRATA_HOME (or uses absolute paths / s3:// URIs in its config).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("STRATA_HOME") or os.getcwd()).expanduser().resolve()


def is_remote(uri: str) -> bool:
    return "://" in uri


def resolve(path: str) -> str:
    """An absolute local path or a remote URI, the same on every Ray worker."""
    if is_remote(path):
        return path
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else home() / candidate)
