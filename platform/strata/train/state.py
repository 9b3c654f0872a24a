"""Per-rank training state for exact resume: data cursor and the RNG states of Python, NumPy and torch.

Every rank writes `rank_state/<rank>.pt` into the same checkpoint (Ray Train merges the ranks' directories),
so a resumed rank continues with exactly the random numbers it would have drawn (LoRA dropout, sampling).
A run resumed on a different number of workers keeps the (rank-independent) data cursor and reseeds.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray.train
import torch

RANK_STATE_DIR = "rank_state"
TRAIN_STATE = "train_state.pt"  # step, data cursor, optimizer and scheduler: written by rank 0


def seed_everything(seed: int, rank: int) -> None:
    """Distinct, reproducible streams per rank."""
    random.seed(seed * 1000 + rank)
    np.random.seed(seed * 1000 + rank)
    torch.manual_seed(seed * 1000 + rank)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(checkpoint_dir: Path, rank: int, world_size: int, cursor: dict) -> None:
    directory = checkpoint_dir / RANK_STATE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"world_size": world_size, "cursor": cursor, "rng": rng_state()}, directory / f"{rank}.pt")


def restore_rank_state(checkpoint_dir: Path, rank: int, world_size: int) -> bool:
    """Restore this rank's RNG streams; False when the checkpoint came from another world size."""
    path = checkpoint_dir / RANK_STATE_DIR / f"{rank}.pt"
    if not path.exists():
        return False
    state = torch.load(path, weights_only=False)
    if state["world_size"] != world_size:
        return False
    set_rng_state(state["rng"])
    return True


def save_train_state(directory: Path, step: int, cursor: dict, optimizer, scheduler) -> None:
    state = {"step": step, "cursor": cursor, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, directory / TRAIN_STATE)


def report_with_checkpoint(
    metrics: dict, step: int, rank: int, world_size: int, cursor: dict, write_rank0: Callable[[Path], None]
) -> None:
    """Report `metrics` with a checkpoint: rank 0 writes the shared files, every rank its own RNG state
    (Ray Train merges the ranks' directories into one checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            write_rank0(Path(tmp))
        save_rank_state(Path(tmp), rank, world_size, cursor)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:07d}")
