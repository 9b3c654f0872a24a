"""The sweep: a base job config, a search space over its fields by dotted name, and how to search it.

    base_config: configs/finetune-lora-tiny.yaml
    search_space:
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      lora.rank: {choice: [4, 8, 16]}

Everything that can be checked before a trial starts is checked here: the base config, that every searched field
exists in the job's schema and accepts the values the distribution can draw, that ranges are non-empty, and that
the job reports the metric to optimise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from strata.config.base import ConfigError, StrictModel, format_validation_error, load_config
from strata.config.finetune import FinetuneConfig
from strata.config.pretrain import PretrainConfig

JOBS: dict[str, type[StrictModel]] = {"finetune": FinetuneConfig, "pretrain": PretrainConfig}

# What each job's worker loop reports (the metrics a sweep can optimise); the sweep and pretraining tests check
# that real runs report them.
REPORTED_METRICS: dict[str, tuple[str, ...]] = {
    "finetune": (
        "eval_loss",
        "eval_perplexity",
        "loss",
        "aux_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "peak_memory_mb",
    ),
    "pretrain": ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "expert_imbalance", "router_entropy"),
}

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class Distribution(StrictModel):
    """Exactly one of: `uniform: [lo, hi]`, `loguniform: [lo, hi]`, `randint: [lo, hi]` (hi inclusive),
    `choice: [a, b, ...]`, `grid: [a, b, ...]` (every value, each with `num_samples` draws of the rest)."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}; got {given or 'none'}")
        kind = given[0]
        if kind in ("choice", "grid") and not self.values():
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind} range [{low}, {high}] is empty or inverted: low must be below high")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs a positive low end, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def values(self) -> list[Any]:
        """The values to check against the job's schema: both ends of a range, or every listed value."""
        spec = getattr(self, self.kind)
        return list(spec)


class SchedulerSettings(StrictModel):
    type: Literal["asha", "fifo"] = Field("asha", description="asha stops poor trials early; fifo runs all to the end.")
    grace_period_steps: int = Field(20, gt=0, description="ASHA: steps every trial trains before it can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="ASHA: keep the best 1/factor at each rung.")


class TuneConfig(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The sweep; the same name resumes it.")
    job: Literal["finetune", "pretrain"] = "finetune"
    base_config: str = Field(..., description="The job config every trial starts from (relative to this file).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted fields set in every trial.")
    search_space: dict[str, Distribution] = Field(..., min_length=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="optuna: Bayesian (TPE); grid: every combination of `grid` values."
    )
    num_samples: int = Field(8, gt=0, description="Trials (with grid: draws per grid point).")
    seed: int = Field(0, description="Seeds random and Bayesian search, so a sweep draws the same trials again.")
    max_steps: int = Field(..., gt=0, description="Each trial's budget in optimizer steps (optim.max_steps).")
    report_every_steps: int = Field(
        10, gt=0, description="Trials evaluate, checkpoint and report this often: the scheduler's decision points."
    )
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    max_concurrent_trials: int = Field(1, gt=0)
    trial_driver_cpus: float = Field(
        0.1, gt=0, description="CPUs of each trial's driver, which mostly waits; its workers ask for their own."
    )
    storage_path: str = Field("runs/tune", description="Tune's and the trials' checkpoints (local or s3://).")
    experiment: str = "strata-tune"
    registered_model: str | None = Field(None, description="Where the best model is registered; default: the job's.")

    @field_validator("search_space")
    @classmethod
    def _dotted_names(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        for name in space:
            if not name or any(not part.isidentifier() for part in name.split(".")):
                raise ValueError(f"{name!r} is not a dotted field name such as optim.lr")
        return space

    @model_validator(mode="after")
    def _search_fits(self) -> TuneConfig:
        has_grid = any(d.kind == "grid" for d in self.search_space.values())
        if self.search == "grid" and not has_grid:
            raise ValueError("search: grid needs at least one `grid` distribution")
        if self.search == "optuna" and has_grid:
            raise ValueError("search: optuna cannot take `grid` distributions; use choice")
        if self.metric not in REPORTED_METRICS[self.job]:
            raise ValueError(
                f"metric {self.metric!r}: the {self.job} job never reports it; it reports "
                f"{', '.join(REPORTED_METRICS[self.job])}"
            )
        if self.scheduler.type == "asha" and self.scheduler.grace_period_steps > self.max_steps:
            raise ValueError(
                f"scheduler.grace_period_steps ({self.scheduler.grace_period_steps}) exceeds "
                f"max_steps ({self.max_steps})"
            )
        return self

    @property
    def schema(self) -> type[StrictModel]:
        return JOBS[self.job]

    def resolve_base(self, tune_file: Path) -> Path:
        path = Path(self.base_config).expanduser()
        return path if path.is_absolute() else (tune_file.parent / path).resolve()


def field_exists(schema: type[BaseModel], dotted: str) -> bool:
    """Whether `a.b.c` names a field of `schema` (through nested sections and free-form dicts such as overrides)."""
    model: Any = schema
    for part in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return model is dict  # inside a free-form mapping, any key is a field
        if part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = getattr(annotation, "__origin__", annotation)
    return True


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `tree` with `a.b.c` set to `value` (sections created as needed)."""
    *parents, leaf = dotted.split(".")
    root = copy.deepcopy(tree)
    node = root
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return root


def trial_tree(tune: TuneConfig, base_tree: dict[str, Any], params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """A trial's job config as a plain tree: the sweep's job tree (`load_tune_config`), the sweep's fixed settings,
    then the sampled params."""
    tree = base_tree
    fixed = {
        "run_name": run_name,
        "optim.max_steps": tune.max_steps,
        "checkpoint.every_steps": tune.report_every_steps,
        "checkpoint.storage_path": f"{tune.storage_path}/{tune.name}",
    }
    for dotted, value in {**fixed, **params}.items():
        tree = set_dotted(tree, dotted, value)
    return tree


def load_tune_config(path: str | Path, overrides: list[str] = ()) -> tuple[TuneConfig, dict[str, Any]]:
    """The sweep config and the job tree its trials start from: the base job config with the sweep's `overrides`
    applied, so that everything read before the trials (the pinned base model, the tracking store) sees them too.
    Both are checked together before any trial starts."""
    tune = load_config(path, TuneConfig, overrides)
    base_path = tune.resolve_base(Path(path))
    load_config(base_path, tune.schema)  # the base itself must be valid
    base_tree = yaml.safe_load(base_path.read_text()) or {}
    problems = []
    for dotted, value in tune.overrides.items():
        if field_exists(tune.schema, dotted):
            base_tree = set_dotted(base_tree, dotted, value)
        else:
            problems.append(f"  overrides.{dotted}: {tune.schema.__name__} has no field {dotted!r}")
    for dotted, distribution in tune.search_space.items():
        if not field_exists(tune.schema, dotted):
            problems.append(f"  search_space.{dotted}: {tune.schema.__name__} has no field {dotted!r}")
            continue
        for value in distribution.values():
            tree = trial_tree(tune, base_tree, {dotted: value}, run_name="check")
            try:
                tune.schema.model_validate(tree)
            except ValidationError as err:
                reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                problems.append(f"  search_space.{dotted}: value {value!r} is invalid for the job: {reason}")
                break
    job = None
    try:
        job = tune.schema.model_validate(trial_tree(tune, base_tree, {}, run_name="check"))
    except ValidationError as err:
        problems.append(format_validation_error(base_path, err))
    if problems:
        raise ConfigError(f"{path}: invalid sweep (base: {base_path.name}, job: {tune.job})\n" + "\n".join(problems))
    if job.tracking.registered_model and tune.registered_model is None:
        tune = tune.model_copy(update={"registered_model": job.tracking.registered_model})
    return tune, base_tree
