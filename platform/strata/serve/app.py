"""The A/B application: a ModelServer deployment per variant behind one Router, composed in one expression.

Variants of one replica group share one ModelServer deployment (`group-NAME`): the router holds the same handle
under each of their names and tells the replica which variant a request is for. The group's members go to that
deployment's `user_config` as well, where `replica_groups.add_group_variant` adds one to the running replicas."""

from __future__ import annotations

from ray import serve

from strata import tracking
from strata.config import ServeConfig, VariantConfig, replica_groups
from strata.serve.adapter_sources import check_groups
from strata.serve.model_server import ModelServer
from strata.serve.precision_checks import check_precisions
from strata.serve.router import Router


def _model_server(name: str, variant: VariantConfig, user_config: dict | None = None):
    """The ModelServer deployment's options: the variant's replicas, resources and autoscaling."""
    scaling = (
        {"autoscaling_config": variant.autoscaling.model_dump()}
        if variant.autoscaling
        else {"num_replicas": variant.num_replicas}
    )
    return ModelServer.options(
        name=name,
        ray_actor_options={
            "num_cpus": variant.num_cpus,
            "num_gpus": variant.num_gpus,
            **({"resources": variant.resources} if variant.resources else {}),
        },
        # Enough concurrent requests per replica to fill the engine's batch, plus a queue behind it.
        max_ongoing_requests=2 * variant.engine.max_batch_size,
        **({"user_config": user_config} if user_config else {}),
        **scaling,
    )


def build_application(config: ServeConfig, tracking_uri: str | None = None) -> serve.Application:
    """The A/B application: a ModelServer deployment per variant or replica group, behind one Router. A precision a
    replica could not load, and a replica group whose members could not share a base, are refused here, before any
    replica starts: a plain `serve deploy` of a config file gets the same checks as `strata deploy`."""
    check_precisions(config)
    tracking_uri = config.tracking_uri or tracking_uri
    if replica_groups(config.variants):
        tracking.use_store(tracking_uri)  # the group's registered versions are looked up where replicas load them
        check_groups(config)
    groups = {}
    for group, members in replica_groups(config.variants).items():
        dumped = [m.model_dump() for m in members]
        server = _model_server(f"group-{group}", members[0], {"variants": dumped})
        groups[group] = server.bind(config.model_name, dumped[0], tracking_uri, group=dumped)
    variants = {
        v.name: groups[v.replica_group]
        if v.replica_group
        else _model_server(f"model-{v.name}", v).bind(config.model_name, v.model_dump(), tracking_uri)
        for v in config.variants
    }
    return Router.options(
        num_replicas=config.router_replicas,
        ray_actor_options={
            "num_cpus": config.router_num_cpus,
            **({"resources": config.router_resources} if config.router_resources else {}),
        },
        user_config={"weights": config.initial_weights},
    ).bind(config.model_dump(), variants)
