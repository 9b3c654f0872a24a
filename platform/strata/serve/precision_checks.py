"""The deploy-time check of each variant's precision, before any replica starts: `strata deploy` runs it before it
deploys anything, and the Serve build of the application (`app.build_application`) on every deploy, a plain
`serve deploy` included.

Whether bitsandbytes runs nf4 is a property of a node (its CUDA, its install), not of the machine that deploys or
the head that builds the application, which may have no GPU at all. So the nf4 check is a Ray task with the replica's
own resources, pinned to each live node that could hold that replica, quantising on the device the replica would use.
torch and bitsandbytes load only in those tasks, and only when a variant asks for nf4."""

from __future__ import annotations

import json
import logging

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from strata.config import ServeConfig, VariantConfig

logger = logging.getLogger(__name__)

# A node too busy to run the check by then (full with the version now running) is left to the replica's own load.
NODE_CHECK_WAIT_S = 60


def nf4_unavailable() -> str | None:
    """Why bitsandbytes cannot quantise to nf4 here, or None: it imports and quantises a small tensor on the device a
    replica here would use (a GPU when one is visible, as `serve.loading` picks it)."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        bnbf.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16, device=device), quant_type="nf4")
    except Exception as err:  # an import error, or no backend for this device
        return f"{type(err).__name__}: {err}"
    return None


@ray.remote(max_retries=0)
def _nf4_unavailable_on_node() -> str | None:
    return nf4_unavailable()


def replica_resources(variant: VariantConfig) -> dict[str, float]:
    """What one replica of `variant` takes from a node, in `ray.nodes()` terms."""
    return {"CPU": variant.num_cpus, "GPU": variant.num_gpus, **(variant.resources or {})}


def nodes_that_fit(resources: dict[str, float]) -> list[dict]:
    """Live nodes whose total resources could hold one such replica."""
    return [
        node
        for node in ray.nodes()
        if node["Alive"]
        and all(node["Resources"].get(name, 0) >= amount for name, amount in resources.items() if amount)
    ]


def node_label(node: dict) -> str:
    """A node as an operator finds it: its name (its address unless `ray start --node-name` set one) and id."""
    return f"{node.get('NodeName') or node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def nf4_refusals(variant: VariantConfig) -> dict[str, str]:
    """Why nf4 cannot run, by each live node that could hold a replica of `variant` and refuses it. Where no live node
    fits yet (an autoscaler adds one for the replica), there is nothing to check here: the replica checks at load."""
    nodes = nodes_that_fit(replica_resources(variant))
    if not nodes:
        logger.info("variant %r: no live node fits its replica yet; nf4 is checked at load", variant.name)
        return {}
    checks = {
        _nf4_unavailable_on_node.options(
            num_cpus=variant.num_cpus,
            num_gpus=variant.num_gpus,
            resources=variant.resources or {},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(): node_label(node)
        for node in nodes
    }
    done, pending = ray.wait(list(checks), num_returns=len(checks), timeout=NODE_CHECK_WAIT_S)
    for ref in pending:
        logger.warning(
            "variant %r: nf4 not checked on %s (busy); its replica checks at load", variant.name, checks[ref]
        )
        ray.cancel(ref, force=True)
    refusals, checked = {}, 0
    for ref in done:
        try:
            reason = ray.get(ref)
        except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError) as err:
            # the node went (a reclaimed spot instance) after Ray listed it as alive: no replica goes there either
            logger.warning("variant %r: nf4 not checked on %s, which has gone: %s", variant.name, checks[ref], err)
            continue
        except ray.exceptions.RayError as err:  # the worker died importing or running bitsandbytes' native code
            reason = f"the check's worker failed: {err}"
        checked += 1
        if reason:
            refusals[checks[ref]] = reason
    logger.info("variant %r: nf4 checked on %d of %d nodes that fit its replica", variant.name, checked, len(nodes))
    return refusals


def check_precisions(config: ServeConfig) -> None:
    """ValueError naming the variant, the field and the node for a precision a replica could not load: nf4 where
    bitsandbytes cannot run (float16 on a CPU is refused by the config itself). Variants whose replicas take the same
    resources are checked once."""
    checked: dict[str, dict[str, str]] = {}
    for variant in config.variants:
        if variant.engine.quantization != "nf4":
            continue
        key = json.dumps(replica_resources(variant), sort_keys=True)
        if key not in checked:
            checked[key] = nf4_refusals(variant)
        if refusals := checked[key]:
            node, reason = next(iter(refusals.items()))
            raise ValueError(
                f"variant {variant.name!r}: engine.quantization nf4 needs bitsandbytes, which cannot run on "
                f"{len(refusals)} node(s) that could hold its replica ({node}: {reason}); use int8 or none"
            )
