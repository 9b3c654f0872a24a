"""Deploying the A/B application the declarative way (`serve deploy`), and changing its split live.

A config names each variant by the registry *version* its alias pointed to when the config was written: a replica
started later (autoscaling, a restart) must load the same weights as its siblings even if the alias has moved since.
It names API keys by their sha256 digests only, taken from the deploying shell, so a deploy from any shell works
against any cluster and no key is ever written to a config. Before deploying, the cluster is checked to have room
for every replica and the router: Serve would otherwise wait for resources forever.
Changing the split re-deploys the running config with only the router's `user_config` changed, which Serve applies
with `reconfigure` on the live router: no replica restarts and no request in flight fails.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

from strata import paths, tracking
from strata.config import AuthSettings, ConfigError, EngineSettings, ServeConfig, VariantConfig, replica_groups
from strata.serve.adapter_sources import check_groups
from strata.serve.auth import KEYS_ENV, ensure_keys_file, hash_key, read_keys
from strata.serve.precision_checks import check_precisions
from strata.serve.routing import Split

IMPORT_PATH = "serve_apps.ab:build_app"
ROUTER = "Router"
DASHBOARD_WAIT_S = 60  # a head's dashboard may register a while after the head answers


class DeployError(RuntimeError):
    """The application cannot run: the cluster is too small for it, or Serve failed to start it."""


@dataclass(frozen=True)
class DeployRequest:
    """What `strata deploy` asks for: registry aliases of one model, a split, and the resources per replica."""

    model: str
    weights: dict[str, float]
    app: str = "strata"
    port: int = 8000
    route_prefix: str = "/"
    num_cpus: float = 0.5
    num_gpus: float = 0
    resources: dict[str, float] | None = None  # custom Ray resources per model replica (a cluster's serve group)
    max_batch_size: int = 32
    loops: int = 1  # engine loops per replica over one copy of the weights
    torch_threads: int | None = None  # per loop; None: the replica's CPUs / loops
    dtype: str = "auto"
    quantization: str = "none"
    share_base: bool = False  # the variants in one replica group: one base, each fine-tune's adapter beside it
    requests_per_minute: float = 600
    burst: int = 60
    keys_file: str | None = None
    out: str | None = None
    address: str | None = None
    cluster_cpus: int | None = None
    wait_timeout_s: float = 300
    experiment: str | None = None
    check_resources: bool = True  # off for a cluster that autoscales: its nodes come once the replicas ask


@dataclass(frozen=True)
class Deployed:
    base_url: str
    config_path: Path
    key_hint: str  # how a shell gets a key: `$(head -1 FILE)` or from $STRATA_API_KEYS


def serve_config_from_aliases(request: DeployRequest, tracking_uri: str, key_hashes: list[str]) -> ServeConfig:
    """The application's config: one variant per alias, pinned to the version it points to now."""
    try:
        variants = variants_from_aliases(
            request.model,
            list(request.weights),
            num_cpus=request.num_cpus,
            num_gpus=request.num_gpus,
            resources=request.resources or {},
            engine=EngineSettings(
                max_batch_size=request.max_batch_size,
                loops=request.loops,
                torch_threads=request.torch_threads,
                dtype=request.dtype,
                quantization=request.quantization,
            ),
            replica_group="shared" if request.share_base else None,
        )
        config = ServeConfig(
            model_name=request.model,
            variants=variants,
            weights=request.weights,
            tracking_uri=tracking_uri,
            auth=AuthSettings(
                api_key_hashes=key_hashes, requests_per_minute=request.requests_per_minute, burst=request.burst
            ),
            audit={"path": paths.resolve("logs/audit.jsonl")},
            experiment=request.experiment,
        )
        check_groups(config)
        return config
    except (ValueError, ValidationError) as err:
        raise ConfigError(str(err)) from None


def deploy_aliases(
    request: DeployRequest, log: Callable[[str], None] = print, on_status: Callable[[str], None] | None = None
) -> Deployed:
    """Resolve the aliases, check the cluster has room and its nodes run each variant's precision, deploy the
    application beside any others, write the deployed `serve deploy` config (so the same deployment can be re-applied
    by hand) and wait until it runs."""
    tracking_uri = tracking.use_store()
    keys_file = request.keys_file or ensure_keys_file(log)
    key_hashes = [hash_key(key) for key in read_keys(keys_file)]
    if not key_hashes:
        raise ConfigError(f"no API keys in {keys_file or '$' + KEYS_ENV}: add one (`strata keys new`)")
    config = serve_config_from_aliases(request, tracking_uri, key_hashes)
    for variant in config.variants:
        log(f"  {variant.name}: {variant.model} (weight {request.weights[variant.name]:g})")
    dashboard = connect(request.address, num_cpus=request.cluster_cpus)
    if request.check_resources:
        check_fits(dashboard, config, request.app)
    try:  # on the cluster's nodes, before anything is deployed; the application builder checks again (`serve deploy`)
        check_precisions(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    serve_config = deploy_application(dashboard, application(config, request.app, request.route_prefix), request.port)
    out = Path(request.out or paths.resolve(f"serve/{request.app}.yaml"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(serve_config, sort_keys=False))
    wait_until_running(
        dashboard,
        request.app,
        request.wait_timeout_s,
        on_poll=on_status and (lambda s: on_status(f"{request.app}: {s}")),
    )
    port = serve_config["http_options"]["port"]
    base_url = f"http://127.0.0.1:{port}{request.route_prefix.rstrip('/')}/v1"
    key_hint = f"$(head -1 {keys_file})" if keys_file else "${" + KEYS_ENV + "%%,*}"
    return Deployed(base_url, out, key_hint)


def variants_from_aliases(model_name: str, aliases: list[str], **variant_options: Any) -> list[VariantConfig]:
    """One variant per registry alias (`stable`, `fast`), pinned to the version the alias points to now."""
    client = MlflowClient()
    variants = []
    for alias in aliases:
        try:
            version = client.get_model_version_by_alias(model_name, alias).version
        except MlflowException as err:
            raise ValueError(f"registered model {model_name!r} has no alias {alias!r}: {err.message}") from None
        variants.append(VariantConfig(name=alias, model=f"models:/{model_name}/{version}", **variant_options))
    return variants


def application(config: ServeConfig, name: str = "strata", route_prefix: str = "/") -> dict[str, Any]:
    """One `applications:` entry of a `serve deploy` config; the split goes to the router's user_config, each replica
    group's members to its deployment's (`replica_groups.add_group_variant` adds to both, restarting nothing)."""
    args = config.model_dump(exclude_defaults=True)
    groups = [
        {"name": f"group-{group}", "user_config": {"variants": [m.model_dump(mode="json") for m in members]}}
        for group, members in replica_groups(config.variants).items()
    ]
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": ROUTER, "user_config": {"weights": config.initial_weights}}, *groups],
    }


def deploy(dashboard_url: str, config: dict[str, Any]) -> None:
    """What `serve deploy config.yaml` does. Applications missing from `config` are deleted, as with the CLI."""
    ServeSubmissionClient(dashboard_url).deploy_applications(config)


def wait_until_running(
    dashboard_url: str, app: str, timeout_s: float = 300, on_poll: Callable[[str], None] | None = None
) -> None:
    """Until `app` runs; DeployError if Serve gives up on it, TimeoutError after `timeout_s`, both with Serve's
    reasons (a replica's own error, or the resources it waits for)."""
    client = ServeSubmissionClient(dashboard_url)
    deadline = time.monotonic() + timeout_s
    while True:
        details = client.get_serve_details().get("applications", {}).get(app)
        status = details["status"] if details else "NOT_STARTED"
        if on_poll:
            on_poll(status)
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise DeployError(f"application {app!r} failed to deploy.\n{serve_reasons(details)}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"application {app!r} is still {status} after {timeout_s:g}s (a longer wait: --wait-timeout).\n"
                + serve_reasons(details)
            )
        time.sleep(1)


def serve_reasons(details: dict[str, Any] | None) -> str:
    """What Serve says about an application: its own message, and each deployment's that is not healthy, which
    holds a replica's error (the application's only names the deployments that failed)."""
    reasons = [details["message"]] if details and details.get("message") else []
    for name, deployment in (details or {}).get("deployments", {}).items():
        if deployment["status"] != "HEALTHY" and deployment.get("message"):
            reasons.append(f"{name}: {deployment['message']}")
    return "\n".join(reasons) or "Serve gives no reason."


def required_resources(config: ServeConfig) -> dict[str, dict[str, float]]:
    """Per deployment, what the application holds once it runs: replicas x resources per replica (the minimum
    replicas of an autoscaled variant). Serve's controller and proxies hold no CPU."""
    needed = {ROUTER: {"replicas": config.router_replicas, "CPU": config.router_num_cpus, "GPU": 0.0}}
    for variant in config.variants:  # a replica group's replicas, once: what its first member asks for
        replicas = variant.autoscaling.min_replicas if variant.autoscaling else variant.num_replicas
        name = f"group-{variant.replica_group}" if variant.replica_group else f"model-{variant.name}"
        needed.setdefault(name, {"replicas": replicas, "CPU": variant.num_cpus, "GPU": variant.num_gpus})
    return needed


def held_by(details: dict[str, Any], app: str) -> dict[str, float]:
    """The CPUs and GPUs that the replicas of the running application `app` hold (freed when it is replaced)."""
    held = {"CPU": 0.0, "GPU": 0.0}
    for deployment in details.get("applications", {}).get(app, {}).get("deployments", {}).values():
        for resource in held:
            held[resource] += len(deployment["replicas"]) * deployment["required_resources"].get(resource, 0)
    return held


def check_fits(dashboard_url: str, config: ServeConfig, app: str) -> None:
    """DeployError, naming the numbers, if the cluster lacks the CPUs or GPUs for every replica of `app`: Serve
    would wait for them forever. What is free: Ray's available resources, plus what `app` holds if it runs now."""
    needed = required_resources(config)
    total, available = ray.cluster_resources(), ray.available_resources()
    freed = held_by(ServeSubmissionClient(dashboard_url).get_serve_details(), app)
    for resource, flag in (("CPU", "--num-cpus"), ("GPU", "--num-gpus")):
        asks = sum(d["replicas"] * d[resource] for d in needed.values())
        free = available.get(resource, 0.0) + freed[resource]
        if asks > free + 1e-9:
            parts = ", ".join(f"{name} {d['replicas']} x {d[resource]:g}" for name, d in needed.items() if d[resource])
            has = total.get(resource, 0.0)
            held = f", {has - free:g} of them held by other applications and actors" if has > free else ""
            raise DeployError(
                f"application {app!r} needs {asks:g} {resource}s ({parts}), but the cluster has {has:g}{held}: "
                f"lower {flag} (per model replica) or add {resource}s to the cluster (one that autoscales: "
                "--no-resource-check)."
            )


def running_config(dashboard_url: str) -> dict[str, Any]:
    """The config Serve is running now (every application), as `serve deploy` last received it."""
    details = ServeSubmissionClient(dashboard_url).get_serve_details()
    applications = [a["deployed_app_config"] for a in details.get("applications", {}).values()]
    config = {"applications": [a for a in applications if a]}
    if details.get("http_options"):
        config["http_options"] = {k: details["http_options"][k] for k in ("host", "port")}
    if details.get("proxy_location"):
        config["proxy_location"] = details["proxy_location"]
    return config


def set_weights(dashboard_url: str, app: str, weights: dict[str, float]) -> dict[str, Any]:
    """Change `app`'s split live; returns the config that was deployed."""
    config = copy.deepcopy(running_config(dashboard_url))
    entries = [a for a in config["applications"] if a["name"] == app]
    if not entries:
        raise ValueError(f"no application {app!r} is deployed; there are {[a['name'] for a in config['applications']]}")
    [entry] = entries
    deployments = [d for d in entry.get("deployments", []) if d["name"] != ROUTER]
    router = next((d for d in entry.get("deployments", []) if d["name"] == ROUTER), {"name": ROUTER})
    live = router.get("user_config", {})  # also the variants added to running replica groups, if any
    names = [v["name"] for v in [*entry["args"]["variants"], *live.get("variants", [])]]
    Split(weights, names)  # refuse bad weights before Serve sees them
    entry["deployments"] = [*deployments, {**router, "user_config": {**live, "weights": weights}}]
    deploy(dashboard_url, config)
    return config


def connect(address: str | None = None, start_if_none: bool = True, num_cpus: int | None = None) -> str:
    """Join a Ray cluster and return its dashboard URL, which `serve deploy` talks to: this driver's own, `address`,
    $RAY_ADDRESS, or the one `ray start` last started on this machine.

    With none running, start one with `ray start --head`: unlike a driver's own `ray.init`, it outlives this
    process, so the application keeps serving after the deploy command exits."""
    started_output = ""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if not (address or last_started_cluster()):
            if not start_if_none:
                raise ConnectionError("no Ray cluster is running here: name one with --address or $RAY_ADDRESS")
            started_output = start_head(num_cpus)
        # "auto" joins the recorded cluster and, as Ray does only for one found this way, takes up the token auth
        # that `ray start` turns on when ~/.ray/auth_token exists.
        ray.init(address=address or "auto", log_to_driver=False)
    url = ray._private.worker.get_dashboard_url() or wait_for_dashboard_url(DASHBOARD_WAIT_S)
    if not url:
        raise RuntimeError(
            f"the Ray cluster has no dashboard after {DASHBOARD_WAIT_S} s, and `serve deploy` needs one (start the "
            f"cluster with one; its log is dashboard.log in the session's logs directory){started_output}"
        )
    return url if "://" in url else f"http://{url}"


def start_head(num_cpus: int | None) -> str:
    """`ray start --head` with this environment's Ray; returns what it printed, to show if its dashboard fails.
    The dashboard and its agent take Ray's usual ports (8265, 52365) when free, and other free ports when another
    Ray on this machine (a notebook's `ray.init`) holds them: `ray start` would otherwise start without them."""
    ray_cli = str(Path(sys.executable).parent / "ray")  # this environment's, as `make` runs it unactivated
    command = [ray_cli, "start", "--head", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"]
    command += [f"--dashboard-port={port_or_free(8265)}", f"--dashboard-agent-listen-port={port_or_free(52365)}"]
    if num_cpus:
        command += ["--num-cpus", str(num_cpus)]
    started = subprocess.run(command, capture_output=True, text=True)
    if started.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{started.stdout}{started.stderr}")
    return f"\n`{' '.join(command)}` printed:\n{started.stdout}{started.stderr}"


def port_or_free(preferred: int) -> int:
    """`preferred` if nothing listens on it, else a free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("", preferred))
            return preferred
        except OSError:
            probe.bind(("", 0))
            return probe.getsockname()[1]


def wait_for_dashboard_url(timeout_s: float) -> str | None:
    """The dashboard's address once it has registered with the cluster. A head on a loaded machine can answer
    before its dashboard does: the driver's view of it (`get_dashboard_url`) is read once, when it connects."""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        key, namespace = ray_constants.DASHBOARD_ADDRESS, ray_constants.KV_NAMESPACE_DASHBOARD
        url = internal_kv._internal_kv_get(key, namespace=namespace)
        if url:
            return url.decode()
        time.sleep(0.5)
    return None


def last_started_cluster() -> str | None:
    """The address `ray start --head` last recorded on this machine (under $RAY_TMPDIR, /tmp by default), if its
    GCS still answers. A cluster some other driver started with `ray.init` dies with that driver: not a home for a
    long-running application."""
    from ray._private.utils import read_ray_address  # what `ray status` reads; no public API exposes it

    address = read_ray_address()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return None  # a stale record of a cluster that has stopped
    return address


def deploy_application(dashboard_url: str, entry: dict[str, Any], port: int = 8000) -> dict[str, Any]:
    """Add or replace one application, keeping the others running; returns the whole config deployed.
    Serve's HTTP options are set only if Serve is not running yet (they cannot change under running apps)."""
    config = running_config(dashboard_url)
    config["applications"] = [a for a in config["applications"] if a["name"] != entry["name"]] + [entry]
    config.setdefault("http_options", {"host": "0.0.0.0", "port": port})
    config.setdefault("proxy_location", "EveryNode")
    deploy(dashboard_url, config)
    return config
