"""Deploying the A/B application the declarative way (`serve deploy`), and changing its split live.

A config names each variant by the registry *version* its alias pointed to when the config was written: a replica
started later (autoscaling, a restart) must load the same weights as its siblings even if the alias has moved since.
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
from strata.config import AuthSettings, ConfigError, EngineSettings, ServeConfig, VariantConfig
from strata.serve.auth import KEYS_ENV, ensure_keys_file
from strata.serve.routing import Split

IMPORT_PATH = "serve_apps.ab:build_app"
ROUTER = "Router"


@dataclass(frozen=True)
class DeployRequest:
    """What `strata deploy` asks for: registry aliases of one model, a split, and the resources per replica."""

    model: str
    weights: dict[str, float]
    app: str = "strata"
    port: int = 8000
    route_prefix: str = "/"
    num_cpus: float = 1
    num_gpus: float = 0
    max_batch_size: int = 32
    requests_per_minute: float = 600
    burst: int = 60
    keys_file: str | None = None
    out: str | None = None
    address: str | None = None
    cluster_cpus: int | None = None


@dataclass(frozen=True)
class Deployed:
    base_url: str
    config_path: Path
    key_hint: str  # how a shell gets a key: `$(head -1 FILE)` or from $STRATA_API_KEYS


def serve_config_from_aliases(request: DeployRequest, tracking_uri: str, keys_file: str | None) -> ServeConfig:
    """The application's config: one variant per alias, pinned to the version it points to now."""
    try:
        variants = variants_from_aliases(
            request.model,
            list(request.weights),
            num_cpus=request.num_cpus,
            num_gpus=request.num_gpus,
            engine=EngineSettings(max_batch_size=request.max_batch_size),
        )
        return ServeConfig(
            model_name=request.model,
            variants=variants,
            weights=request.weights,
            tracking_uri=tracking_uri,
            auth=AuthSettings(
                api_keys_file=str(Path(keys_file).resolve()) if keys_file else None,
                requests_per_minute=request.requests_per_minute,
                burst=request.burst,
            ),
            audit={"path": paths.resolve("logs/audit.jsonl")},
        )
    except (ValueError, ValidationError) as err:
        raise ConfigError(str(err)) from None


def deploy_aliases(
    request: DeployRequest, log: Callable[[str], None] = print, on_status: Callable[[str], None] | None = None
) -> Deployed:
    """Resolve the aliases, deploy the application beside any others on the cluster, wait until it runs, and write
    the deployed `serve deploy` config (so the same deployment can be re-applied by hand)."""
    tracking_uri = tracking.use_store()
    keys_file = request.keys_file or ensure_keys_file(log)
    config = serve_config_from_aliases(request, tracking_uri, keys_file)
    for variant in config.variants:
        log(f"  {variant.name}: {variant.model} (weight {request.weights[variant.name]:g})")
    dashboard = connect(request.address, num_cpus=request.cluster_cpus)
    serve_config = deploy_application(dashboard, application(config, request.app, request.route_prefix), request.port)
    out = Path(request.out or paths.resolve(f"serve/{request.app}.yaml"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(serve_config, sort_keys=False))
    wait_until_running(dashboard, request.app, on_poll=on_status and (lambda s: on_status(f"{request.app}: {s}")))
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
    """One `applications:` entry of a `serve deploy` config; the split goes to the router's user_config."""
    args = config.model_dump(exclude_defaults=True)
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": ROUTER, "user_config": {"weights": config.initial_weights}}],
    }


def deploy(dashboard_url: str, config: dict[str, Any]) -> None:
    """What `serve deploy config.yaml` does. Applications missing from `config` are deleted, as with the CLI."""
    ServeSubmissionClient(dashboard_url).deploy_applications(config)


def wait_until_running(
    dashboard_url: str, app: str, timeout_s: float = 600, on_poll: Callable[[str], None] | None = None
) -> None:
    client = ServeSubmissionClient(dashboard_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        details = client.get_serve_details().get("applications", {}).get(app)
        status = details["status"] if details else "NOT_STARTED"
        if on_poll:
            on_poll(status)
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {app!r} failed to deploy: {details.get('message')}")
        time.sleep(1)
    raise TimeoutError(f"application {app!r} not running after {timeout_s:.0f}s")


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
    Split(weights, [v["name"] for v in entry["args"]["variants"]])  # refuse bad weights before Serve sees them
    deployments = [d for d in entry.get("deployments", []) if d["name"] != ROUTER]
    router = next((d for d in entry.get("deployments", []) if d["name"] == ROUTER), {"name": ROUTER})
    entry["deployments"] = [*deployments, {**router, "user_config": {"weights": weights}}]
    deploy(dashboard_url, config)
    return config


def connect(address: str | None = None, start_if_none: bool = True, num_cpus: int | None = None) -> str:
    """Join a Ray cluster and return its dashboard URL, which `serve deploy` talks to: this driver's own, `address`,
    $RAY_ADDRESS, or the one `ray start` last started on this machine.

    With none running, start one with `ray start --head`: unlike a driver's own `ray.init`, it outlives this
    process, so the application keeps serving after the deploy command exits."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if not (address or last_started_cluster()):
            if not start_if_none:
                raise ConnectionError("no Ray cluster is running here: name one with --address or $RAY_ADDRESS")
            ray_cli = str(Path(sys.executable).parent / "ray")  # this environment's, as `make` runs it unactivated
            command = [ray_cli, "start", "--head", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"]
            if num_cpus:
                command += ["--num-cpus", str(num_cpus)]
            started = subprocess.run(command, capture_output=True, text=True)
            if started.returncode != 0:
                raise RuntimeError(f"`{' '.join(command)}` failed:\n{started.stdout}{started.stderr}")
        # "auto" joins the recorded cluster and, as Ray does only for one found this way, takes up the token auth
        # that `ray start` turns on when ~/.ray/auth_token exists.
        ray.init(address=address or "auto", log_to_driver=False)
    url = ray._private.worker.get_dashboard_url()  # no public API names a joined cluster's dashboard
    if not url:
        raise RuntimeError("the Ray cluster has no dashboard, which `serve deploy` needs (start it with one)")
    return url if "://" in url else f"http://{url}"


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
