"""Exclusive file locks under $STRATA_HOME/locks: one promotion of an alias at a time, one history append at a time.

`flock` locks are held by an open file, so the kernel drops them when their process dies (a SIGKILL included):
a crashed promotion never leaves its alias locked. They exclude processes that share this machine's
$STRATA_HOME only, which is why release commands run on the head (`ray job submit jobs/promote.py`); the
compare-and-set in `promotion` still refuses a move whose alias changed elsewhere since its gates were read.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from strata.paths import home


class LockBusy(RuntimeError):
    """Another process holds the lock; `pid` is the one it wrote into the lock file (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is held by pid {pid}")
        self.path, self.pid = path, pid


def lock_path(model: str, name: str) -> Path:
    """The lock file of `name` (an alias, or `history`) of a registered model; any model name makes a file name."""
    return home() / "locks" / f"{quote(model, safe='')}@{quote(name, safe='')}.lock"


@contextmanager
def hold(path: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the exclusive lock on `path`, waiting up to `wait_s` for it; raises LockBusy if it stays taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(path, read_pid(fd)) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # who holds it, for the other side's message
        yield
    finally:
        os.close(fd)  # releases the lock


def read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
