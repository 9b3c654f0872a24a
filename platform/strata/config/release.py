"""Release tracks: what a registered model version must show before a registry alias (a track) moves to it."""

from __future__ import annotations

from pydantic import Field, field_validator

from strata.config.base import StrictModel

# The registry aliases that `strata promote` moves: `fast` takes every good candidate, `stable` only canaried ones.
TRACKS = ("fast", "stable")
RUN_ID = "run_id"  # in `required_lineage`: the version's source run, not a tag


class PromotionGates(StrictModel):
    max_eval_loss_increase: float = Field(
        0.02, ge=0, description="How much worse (relative) the candidate's eval_loss may be than the holder's."
    )
    eval_metric: str = Field("eval_loss", description="The source run's metric that the eval gate compares.")
    required_lineage: list[str] = Field(
        ["base_model", "strata.dataset_hash", RUN_ID],
        description="Version tags (else run tags) a candidate must carry; `run_id` is its source run.",
    )
    canary_tracks: list[str] = Field(
        ["stable"], description="Tracks that need the version tag canary=passed (or --force) to move."
    )

    @field_validator("canary_tracks")
    @classmethod
    def _known_tracks(cls, tracks: list[str]) -> list[str]:
        unknown = [t for t in tracks if t not in TRACKS]
        if unknown:
            raise ValueError(f"unknown tracks {unknown}: expected some of {', '.join(TRACKS)}")
        return tracks
