"""The A/B application: a ModelServer deployment per variant behind one Router, composed in one expression."""

from __future__ import annotations

from ray import serve

from strata.config import ServeConfig
from strata.serve.model_server import ModelServer
from strata.serve.precision import check_precisions
from strata.serve.router import Router


def build_application(config: ServeConfig, tracking_uri: str | None = None) -> serve.Application:
    """The A/B application: a ModelServer deployment per variant behind one Router. A precision a replica could not
    load is refused here, before any replica starts."""
    check_precisions(config)
    variants = {}
    for variant in config.variants:
        scaling = (
            {"autoscaling_config": variant.autoscaling.model_dump()}
            if variant.autoscaling
            else {"num_replicas": variant.num_replicas}
        )
        variants[variant.name] = ModelServer.options(
            name=f"model-{variant.name}",
            ray_actor_options={
                "num_cpus": variant.num_cpus,
                "num_gpus": variant.num_gpus,
                **({"resources": variant.resources} if variant.resources else {}),
            },
            # Enough concurrent requests per replica to fill the engine's batch, plus a queue behind it.
            max_ongoing_requests=2 * variant.engine.max_batch_size,
            **scaling,
        ).bind(config.model_name, variant.model_dump(), config.tracking_uri or tracking_uri)
    return Router.options(
        num_replicas=config.router_replicas,
        ray_actor_options={
            "num_cpus": config.router_num_cpus,
            **({"resources": config.router_resources} if config.router_resources else {}),
        },
        user_config={"weights": config.initial_weights},
    ).bind(config.model_dump(), variants)
