"""Real fault injection for drills, the demo and the recovery benchmark: kill a training worker process.

Ray Train must then restart the worker group from the latest checkpoint; nothing here is simulated.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import psutil

from strata.paths import join, read_text

SNAPSHOT = "checkpoint_manager_snapshot.json"


def read_snapshot(run_dir: str | Path) -> str:
    """Ray Train's record of the run's registered checkpoints, in local or object storage ('' before the first)."""
    try:
        return read_text(join(str(run_dir), SNAPSHOT))
    except FileNotFoundError:
        return ""


def checkpoint_registered(run_dir: str | Path, step: int) -> bool:
    """Whether Ray Train has *registered* the checkpoint of `step` (its directory appears earlier, during upload)."""
    return f"checkpoint_{step:07d}" in read_snapshot(run_dir)


def wait_for_checkpoint(run_dir: str | Path, step: int, timeout_s: float = 600) -> None:
    """Until Ray Train has registered the checkpoint of `step`."""
    deadline = time.time() + timeout_s
    while not checkpoint_registered(run_dir, step):
        if time.time() > deadline:
            raise TimeoutError(f"checkpoint {step} was not registered in {run_dir}/{SNAPSHOT} within {timeout_s:.0f}s")
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


def latest_checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered for the run, from its snapshot in storage:
    the checkpoint a restarted worker group resumes from (None before the first)."""
    for _ in range(100):
        text = read_snapshot(run_dir)
        if not text:
            return None
        try:
            latest = json.loads(text)["latest_checkpoint_result"]
        except json.JSONDecodeError:  # read while Ray Train rewrites it
            time.sleep(0.05)
            continue
        return latest and int(latest["metrics"]["step"])
    raise RuntimeError(f"{run_dir}/{SNAPSHOT} stayed unreadable")


def live_processes(pids: list[int]) -> list[psutil.Process]:
    """The processes of `pids` that still run: one may end between its listing and this (a finished run)."""
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            processes.append(psutil.Process(pid))
    return processes


class WorkerKiller:
    """A background thread that SIGKILLs one training worker `delay_s` after checkpoint `after_step` is registered.

    `checkpoint_at_kill` is then the latest checkpoint in storage once the killed worker group has ended (Ray
    Train tears down the survivors when it sees the failure, after taking in all they reported): the step the
    restarted group must resume from, however fast the machine trained meanwhile."""

    def __init__(self, run_dir: str | Path, after_step: int, delay_s: float = 1.0, within_pid: int | None = None):
        self.run_dir, self.after_step, self.delay_s = str(run_dir), after_step, delay_s
        self.within_pid = within_pid
        self.killed_pid: int | None = None
        self.killed_at: float | None = None
        self.checkpoint_at_kill: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> WorkerKiller:
        self._thread.start()
        return self

    def _worker_group(self) -> list[psutil.Process]:
        """The run's workers, once two listings a second apart agree (the whole group has started), or as listed
        when the checkpoint to kill after is already registered."""
        listed = None
        while True:
            pids = train_worker_pids(self.within_pid)
            if pids and pids == listed or checkpoint_registered(self.run_dir, self.after_step):
                return live_processes(pids)
            listed = pids
            time.sleep(1)

    def _run(self) -> None:
        # Listed before the checkpoint comes: the state API is slow on a busy machine, and the run goes on meanwhile.
        group = self._worker_group()
        wait_for_checkpoint(self.run_dir, self.after_step)
        time.sleep(self.delay_s)  # a few steps past the checkpoint: the steps a failure without notice costs
        if not all(p.is_running() for p in group):  # the group restarted since it was listed
            group = self._worker_group()
        try:
            group[-1].send_signal(signal.SIGKILL)
        except (IndexError, psutil.NoSuchProcess):  # the run ended first: killed_pid stays None
            return
        self.killed_pid, self.killed_at = group[-1].pid, time.time()
        _, alive = psutil.wait_procs(group, timeout=300)
        if not alive:
            self.checkpoint_at_kill = latest_checkpoint_step(self.run_dir)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
