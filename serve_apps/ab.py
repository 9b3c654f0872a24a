"""The A/B application builder: N versions of one model behind an OpenAI-compatible router with a weighted split.

`serve deploy serve_apps/ab.yaml` runs it from a config; `python jobs/deploy.py --model NAME --split stable=90,fast=10`
writes such a config from registry aliases and deploys it. The args are a `strata.config.ServeConfig`.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from strata.config import ServeConfig
from strata.serve.app import build_application
from strata.tracking import tracking_uri


def build_app(args: dict[str, Any]) -> serve.Application:
    config = ServeConfig.model_validate(args)
    # Replicas read the registry where the builder does, unless the config names a store.
    return build_application(config, tracking_uri(config.tracking_uri))
