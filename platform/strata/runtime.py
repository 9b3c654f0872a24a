"""Connecting to Ray so that every worker, on every node, can import `strata`.

A job submitted with `--working-dir .` ships the checkout, but `strata` lives under `platform/`, which is
not on the workers' path; so the driver ships the package itself as a `py_modules` entry. An installed
`strata` (pip install on the cluster image) needs nothing shipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

import strata


def strata_runtime_env() -> dict:
    package_dir = Path(strata.__file__).resolve().parent
    return {"py_modules": [str(package_dir)]}


def init_ray(address: str | None = None, **kwargs) -> None:
    """Join RAY_ADDRESS (set inside `ray job submit`) or `address`; otherwise start a fresh local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, runtime_env=strata_runtime_env(), log_to_driver=True, **kwargs)
