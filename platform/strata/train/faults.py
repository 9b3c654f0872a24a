"""Real fault injection for drills, the demo and the recovery benchmark: kill a training worker process.

Ray Train must then restart the worker group from the latest checkpoint; nothing here is simulated.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil

SNAPSHOT = "checkpoint_manager_snapshot.json"


def wait_for_checkpoint(run_dir: str | Path, step: int, timeout_s: float = 600) -> None:
    """Until Ray Train has *registered* the checkpoint of `step` (its directory appears earlier, during upload)."""
    snapshot, name = Path(run_dir) / SNAPSHOT, f"checkpoint_{step:07d}"
    deadline = time.time() + timeout_s
    while not (snapshot.exists() and name in snapshot.read_text()):
        if time.time() > deadline:
            raise TimeoutError(f"{name} was not registered in {snapshot} within {timeout_s:.0f}s")
        time.sleep(0.05)


def train_worker_pids(within_pid: int | None = None) -> list[int]:
    """Live Ray Train workers of *our* cluster: the connected one (Ray's state API), or the processes under
    `within_pid` (a `ray start` node we launched). Never a scan of the whole machine: other people's runs."""
    if within_pid is None:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        return sorted(a.pid for a in actors)
    children = psutil.Process(within_pid).children(recursive=True)
    return sorted(p.pid for p in children if (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker"))


class WorkerKiller:
    """A background thread that SIGKILLs one training worker `delay_s` after checkpoint `after_step` exists."""

    def __init__(self, run_dir: str | Path, after_step: int, delay_s: float = 1.0, within_pid: int | None = None):
        self.run_dir, self.after_step, self.delay_s = Path(run_dir), after_step, delay_s
        self.within_pid = within_pid
        self.killed_pid: int | None = None
        self.killed_at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> WorkerKiller:
        self._thread.start()
        return self

    def _run(self) -> None:
        wait_for_checkpoint(self.run_dir, self.after_step)
        time.sleep(self.delay_s)  # a few steps past the checkpoint: the steps a failure without notice costs
        pids = train_worker_pids(self.within_pid)
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            self.killed_pid, self.killed_at = pids[-1], time.time()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
