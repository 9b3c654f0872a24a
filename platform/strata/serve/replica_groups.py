"""Adding a variant to a running replica group: its replicas load one more adapter, and nothing restarts.

Serve restarts every replica of an application whose `args` change (they are its code version), so a variant added
live stays out of the args: it goes to the `user_config` of its group's deployment, whose `reconfigure` loads its
adapter into the running replicas (and into any replica started later), and to the router's, which sends its
share of the traffic to the group's handle. Each is a config Serve applies with `reconfigure`, restarting nothing:
the base stays loaded and requests in flight go on. The group's config goes first, and the router's only once the
group serves the variant, so no request for it meets a replica that has not loaded it yet. Every running replica of
the group is asked (the handle reaches one at a time, so the answers are gathered until each replica Serve lists has
given one): an adapter that any of them failed to load is taken back out, and the router never hears of it.
"""

from __future__ import annotations

import copy
import time
import uuid

from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

from strata.config import ServeConfig, VariantConfig, replica_groups
from strata.serve.adapter_sources import adapter_source, check_group
from strata.serve.deploy import ROUTER, deploy, running_config
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
) -> int:
    """Serve variant `name` from replica group `group` of the running application `app`, with `weight` in the split:
    the group's base plus `adapter`, or the registered LoRA fine-tune `model` of that base. Its replica settings are
    the group's. Needs this driver connected to the cluster (`deploy.connect`): it asks the group's replicas whether
    they loaded the adapter. ValueError, naming the variant, for one that does not fit the group (checked before
    Serve sees it) or that any of its replicas failed to load (then taken back out). Returns how many replicas
    serve it."""
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

    server, revision = f"group-{group}", uuid.uuid4().hex  # the replicas answer for this config, no older one
    before = deployments.get(server, {"name": server})
    deployments[server] = {
        **before,
        "user_config": {"variants": [m.model_dump(mode="json") for m in [*members, variant]], "revision": revision},
    }
    entry["deployments"] = list(deployments.values())
    deploy(dashboard_url, config)
    verdicts = every_replicas_verdict(dashboard_url, app, server, name, revision)
    refusals = [why for why in verdicts.values() if why]
    if refusals or not verdicts:
        deployments[server] = before
        entry["deployments"] = list(deployments.values())
        deploy(dashboard_url, config)
        failed = f"on {len(refusals)} of {len(verdicts)} replicas ({refusals[0]})" if refusals else "in time"
        raise ValueError(f"variant {name!r}: replica group {group!r} failed to load its adapter {failed}; left out")

    added_dump = [v.model_dump(mode="json") for v in [*added, variant]]
    deployments[ROUTER] = {**router, "user_config": {**live, "weights": weights, "variants": added_dump}}
    entry["deployments"] = list(deployments.values())
    deploy(dashboard_url, config)
    return len(verdicts)


def every_replicas_verdict(
    dashboard_url: str, app: str, server: str, name: str, revision: str
) -> dict[str, str | None]:
    """Each running replica of deployment `server` by its id: None once it serves variant `name`, else why it
    refused it. Asks until every replica that Serve lists as running (the deployment healthy) has answered for the
    config `revision`; a replica that has not taken it yet (whose refusal may be an earlier attempt's) is asked
    again. Empty after LOAD_TIMEOUT_S (the caller takes the variant back out: "failed to load its adapter in time")."""
    from ray import serve

    handle = serve.get_deployment_handle(server, app_name=app)
    client = ServeSubmissionClient(dashboard_url)
    heard: dict[str, str | None] = {}
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        stats = handle.stats.remote().result()
        if stats["revision"] == revision:
            heard[stats["replica"]] = stats["refused"].get(name)
        details = client.get_serve_details().get("applications", {}).get(app, {})
        deployment = details.get("deployments", {}).get(server, {})
        running = {r["replica_id"] for r in deployment.get("replicas", []) if r["state"] == "RUNNING"}
        if deployment.get("status") == "HEALTHY" and running and running <= heard.keys():
            return {replica: heard[replica] for replica in running}
        time.sleep(0.2)
    return {}


def group_base(members: list[VariantConfig]) -> str:
    """The base a replica group's adapters apply to: a member's `model` is the base itself only when it names its
    adapter; a registered fine-tune's is the fine-tune, whose base its run recorded."""
    return next(source.base for source in map(adapter_source, members) if source.adapter)
