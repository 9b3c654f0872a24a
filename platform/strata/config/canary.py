"""A canary release: the steps of traffic a candidate variant gets, how long each bakes, and every threshold that
rolls it back. The defaults follow what users already page on: error rate above 1%, p99 above 500 ms.

    model: strata-tiny          # the registered model, as the application serves it
    app: strata                 # the deployed A/B application
    stable_variant: stable
    candidate_variant: fast
    steps: [5, 25, 50, 100]     # percent of traffic to the candidate
    bake_s: 60
    min_requests: 50
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from strata.config.base import StrictModel


class CanaryThresholds(StrictModel):
    """The candidate fails a check when it is over any of these (latency ratios are candidate / stable)."""

    max_error_rate: float = Field(0.01, ge=0, le=1, description="5xx responses over all of the candidate's.")
    max_p99_latency_ms: float = Field(500, gt=0, description="The candidate's p99 request latency.")
    max_p99_latency_ratio: float = Field(1.5, gt=0, description="Candidate p99 latency / stable p99 latency.")
    max_ttft_ratio: float = Field(1.5, gt=0, description="Candidate p99 time to first token / stable's.")


class CanaryConfig(StrictModel):
    model: str = Field(..., description="The registered model the application serves (its `model_name`).")
    app: str = Field("strata", description="The deployed A/B application (`strata deploy --app`).")
    address: str | None = Field(None, description="The Ray cluster; default: $RAY_ADDRESS or the local one.")
    tracking_uri: str | None = Field(None, description="MLflow store holding the registry; default as for training.")
    stable_variant: str = "stable"
    candidate_variant: str = "fast"
    steps: list[float] = Field([5, 25, 50, 100], min_length=1, description="Percent of traffic to the candidate.")
    bake_s: float = Field(60, gt=0, description="Each step lasts at least this long...")
    min_requests: int = Field(50, gt=0, description="...and until the candidate has served this many in it.")
    step_timeout_s: float = Field(
        900, gt=0, description="A step that never gets `min_requests` in this long fails (no traffic, no proof)."
    )
    interval_s: float = Field(1.0, gt=0, description="How often the metrics are read and the checks run.")
    metrics: Literal["router", "prometheus"] = Field(
        "router",
        description="router: the application's own per-variant windows (needs nothing else); prometheus: PromQL "
        "over the router's exported metrics at `prometheus_url`.",
    )
    prometheus_url: str | None = None
    thresholds: CanaryThresholds = Field(default_factory=CanaryThresholds)
    promote: bool = Field(True, description="On success, promote the candidate to `stable` and redeploy.")
    reason: str = Field("canary passed", description="Recorded with the promotion.")

    @model_validator(mode="after")
    def _valid(self) -> CanaryConfig:
        if self.steps != sorted(self.steps) or self.steps[0] <= 0 or self.steps[-1] != 100:
            raise ValueError(f"steps must rise from above 0 to 100 (percent), got {self.steps}")
        if self.stable_variant == self.candidate_variant:
            raise ValueError("stable_variant and candidate_variant must differ")
        if self.metrics == "prometheus" and not self.prometheus_url:
            raise ValueError("metrics: prometheus needs prometheus_url")
        return self
