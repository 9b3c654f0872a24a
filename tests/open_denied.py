"""A real, per-process fault for tests: the kernel refuses one process the opening of one file (fanotify's
permission events; needs root, as tests here run), while every other process opens it as before. What a node that
cannot read a shared path sees, on a machine where every replica is one node."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

FAN_CLASS_CONTENT = 0x04
FAN_MARK_ADD = 0x01
FAN_OPEN_PERM = 0x00010000
FAN_ALLOW, FAN_DENY = 0x01, 0x02
AT_FDCWD = -100
EVENT = struct.Struct(
    "=IBBHQii"
)  # struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
RESPONSE = struct.Struct("=iI")  # struct fanotify_response: fd, response


@contextlib.contextmanager
def open_denied(path: Path, pid: int) -> Iterator[list[int]]:
    """While inside, process `pid` gets EPERM opening `path`; others open it. Yields the pids it refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
    fan = libc.fanotify_init(FAN_CLASS_CONTENT, os.O_RDONLY)
    if fan < 0:
        raise OSError(ctypes.get_errno(), "fanotify_init")
    if libc.fanotify_mark(fan, FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, str(path).encode()) < 0:
        os.close(fan)
        raise OSError(ctypes.get_errno(), f"fanotify_mark {path}")
    refused: list[int] = []
    stop = threading.Event()

    def answer() -> None:  # every open of the file waits for this thread's answer
        while not stop.is_set():
            if not select.select([fan], [], [], 0.1)[0]:
                continue
            data = os.read(fan, 4096)
            offset = 0
            while offset + EVENT.size <= len(data):
                event_len, _, _, _, _, event_fd, event_pid = EVENT.unpack_from(data, offset)
                offset += event_len
                deny = event_pid == pid
                os.write(fan, RESPONSE.pack(event_fd, FAN_DENY if deny else FAN_ALLOW))
                os.close(event_fd)
                if deny:
                    refused.append(event_pid)

    thread = threading.Thread(target=answer, name="open-denied", daemon=True)
    thread.start()
    try:
        yield refused
    finally:
        stop.set()
        thread.join()
        os.close(fan)  # the kernel allows any open still waiting
