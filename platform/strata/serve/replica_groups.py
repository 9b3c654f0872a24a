"""Adding a variant to a running replica group: its replicas load one more adapter, and nothing restarts.

Serve restarts every replica of an application whose `args` change (they are its code version), so a variant added
live stays out of the args: it goes to the `user_config` of its group's deployment, whose `reconfigure` loads its
adapter into the running replicas (and into any replica started later), and to the router's, which sends its
share of the traffic to the group's handle. Each is a config Serve applies with `reconfigure`, restarting nothing:
the base stays loaded and requests in flight go on. The group's config goes first, and the router's only once the
group serves the variant, so no request for it meets a replica that has not loaded it yet; an adapter the replicas
fail to load is taken back out, and the router never hears of it.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from strata.config import ServeConfig, VariantConfig, replica_groups
from strata.serve.adapter_sources import adapter_source, check_group
from strata.serve.deploy import ROUTER, deploy, running_config, wait_until_running
from strata.serve.routing import Split

LOAD_TIMEOUT_S = 300  # for the group's replicas to download and splice in the adapter


def add_group_variant(
    dashboard_url: str,
    app: str,
    group: str,
    name: str,
    weight: float,
    adapter: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Serve variant `name` from replica group `group` of the running application `app`, with `weight` in the split:
    the group's base plus `adapter`, or the registered LoRA fine-tune `model` of that base. Its replica settings are
    the group's. Needs this driver connected to the cluster (`deploy.connect`): it asks the group's replicas whether
    they loaded the adapter. ValueError, naming the variant, for one that does not fit the group (checked before
    Serve sees it) or that its replicas failed to load (then taken back out). Returns the config that was deployed."""
    config = copy.deepcopy(running_config(dashboard_url))
    entries = [a for a in config["applications"] if a["name"] == app]
    if not entries:
        raise ValueError(f"no application {app!r} is deployed; there are {[a['name'] for a in config['applications']]}")
    [entry] = entries
    deployments = {d["name"]: d for d in entry.get("deployments", [])}
    router = deployments.get(ROUTER, {"name": ROUTER})
    live = router.get("user_config", {})
    serve_config = ServeConfig.model_validate(entry["args"])
    added = [VariantConfig.model_validate(v) for v in live.get("variants", [])]
    members = replica_groups([*serve_config.variants, *added]).get(group)
    if not members:
        raise ValueError(f"application {app!r} has no replica group {group!r}")
    if not adapter and not model:
        raise ValueError("a variant added to a replica group needs an adapter or a registered fine-tune (model)")
    known = [v.name for v in [*serve_config.variants, *added]]
    if name in known:
        raise ValueError(f"application {app!r} already has a variant {name!r}")
    update = {"name": name, "model": model or group_base(members), "adapter": adapter}
    variant = VariantConfig.model_validate(members[0].model_dump() | update)  # the name's pattern, as in a config
    check_group(group, [*members, variant])
    weights = {**(live.get("weights") or serve_config.initial_weights), name: weight}
    Split(weights, [*known, name])  # refuse bad weights before Serve sees them

    server = f"group-{group}"
    before = deployments.get(server, {"name": server})
    deployments[server] = {
        **before,
        "user_config": {"variants": [m.model_dump(mode="json") for m in [*members, variant]]},
    }
    entry["deployments"] = list(deployments.values())
    deploy(dashboard_url, config)
    refusal = wait_until_loaded(app, server, name)
    if refusal:
        deployments[server] = before
        entry["deployments"] = list(deployments.values())
        deploy(dashboard_url, config)
        raise ValueError(f"variant {name!r}: replica group {group!r} failed to load its adapter ({refusal}); left out")
    wait_until_running(dashboard_url, app)  # every replica of the group has it, not only the one that answered

    added_dump = [v.model_dump(mode="json") for v in [*added, variant]]
    deployments[ROUTER] = {**router, "user_config": {**live, "weights": weights, "variants": added_dump}}
    entry["deployments"] = list(deployments.values())
    deploy(dashboard_url, config)
    return config


def wait_until_loaded(app: str, server: str, name: str) -> str | None:
    """Until a replica of deployment `server` serves variant `name` (None) or has refused it (why)."""
    from ray import serve

    handle = serve.get_deployment_handle(server, app_name=app)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        stats = handle.stats.remote().result()
        if name in stats["info"]:
            return None
        if name in stats["refused"]:
            return stats["refused"][name]
        time.sleep(0.5)
    return f"no replica of {server} had loaded it after {LOAD_TIMEOUT_S} s"


def group_base(members: list[VariantConfig]) -> str:
    """The base a replica group's adapters apply to: a member's `model` is the base itself only when it names its
    adapter; a registered fine-tune's is the fine-tune, whose base its run recorded."""
    return next(source.base for source in map(adapter_source, members) if source.adapter)
