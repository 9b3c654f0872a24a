"""The `strata` command: `strata data|pretrain|generate|promote|ui ...`. Jobs in jobs/ call into the same functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from strata.cli import release
from strata.config import ConfigError, FinetuneConfig, PretrainConfig, load_config

console = Console(stderr=True)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML job config")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="e.g. optim.lr=3e-4"
    )


def cmd_data(args: argparse.Namespace) -> int:
    from strata.data.prepare import prepare_data

    cfg = load_config(args.config, PretrainConfig, args.overrides)
    prepare_data(cfg.data, console)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, PretrainConfig, args.overrides)  # fails before any Ray work starts
    from strata.train.pretrain import run_pretraining

    started = time.perf_counter()
    result = run_pretraining(cfg, console)
    m = result.metrics
    console.rule(f"pretraining {cfg.run_name}: done in {time.perf_counter() - started:.0f}s")
    if result.first_loss is not None:
        console.print(
            f"loss: first {result.first_loss:.3f} -> last {m.get('loss', float('nan')):.3f} (step {m.get('step')})"
        )
    console.print(f"checkpoint: {result.checkpoint_path}")
    if result.registered_version:
        console.print(f"registered: models:/{cfg.tracking.registered_model}/{result.registered_version}")
    console.print(f"MLflow run: {result.run_id}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, FinetuneConfig, args.overrides)
    from strata.data.sft import BadRecordsError
    from strata.train.finetune import run_finetuning

    started = time.perf_counter()
    try:
        result = run_finetuning(cfg, console)  # bad records stop it before any Ray work
    except BadRecordsError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    m = result.metrics
    console.rule(f"fine-tuning {result.run_name}: done in {time.perf_counter() - started:.0f}s")
    console.print(
        f"eval loss: {result.first_eval_loss:.3f} (base) -> {m['eval_loss']:.3f}, perplexity {m['eval_perplexity']:.1f}"
    )
    for sample in result.samples:
        console.print(
            f"[dim]{sample['prompt']!r}[/dim]\n  base:       {sample['base_output']!r}\n"
            f"  fine-tuned: {sample['finetuned_output']!r}",
            highlight=False,
        )
    if result.registered_version:
        console.print(f"registered: models:/{cfg.tracking.registered_model}/{result.registered_version}")
    console.print(f"MLflow run: {result.run_id} ({result.bad_records} bad records skipped)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from strata.config.tune import load_tune_config

    tune, base_tree = load_tune_config(args.config, args.overrides)  # every bad search space fails here
    from strata.tune.progress import leaderboard, trials_table
    from strata.tune.sweep import run_sweep

    started = time.perf_counter()
    result = run_sweep(tune, base_tree, console)
    ranked = leaderboard(result.trials, tune.metric, tune.mode)
    console.print(trials_table(f"leaderboard: {tune.name}", ranked, list(tune.search_space), tune.metric))
    console.rule(f"sweep {tune.name}: {len(result.trials)} trials in {time.perf_counter() - started:.0f}s")
    full = len(result.trials) * tune.max_steps
    console.print(f"compute: {result.trial_steps} trial-steps ({full} had every trial run to the end)")
    if result.best:
        best = result.best
        console.print(f"best: trial {best['trial']} {tune.metric}={best[tune.metric]:.4f} {best['params']}")
    if result.registered_version:
        console.print(f"registered: models:/{tune.registered_model}/{result.registered_version} (not promoted)")
    console.print(f"MLflow parent run: {result.parent_run_id} (experiment {tune.experiment})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata import registry, tracking

    model_dir = args.model
    if not os.path.isdir(model_dir):
        tracking.use_store()
        try:
            model_dir = registry.download_model(registry.resolve_uri(args.model))
        except registry.ModelNotFound as err:
            console.print(f"[red]error:[/red] --model: {err}", highlight=False)
            return 2
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for prompt in args.prompt:
        text = registry.generate_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature)
        print(f"{prompt}\033[1m{text}\033[0m\n")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from strata import tracking

    uri = tracking.use_store()
    url = f"http://127.0.0.1:{args.port}"
    console.print(f"MLflow UI for {uri} on {url}", soft_wrap=True, highlight=False)
    # MLflow 3.17's UI picks an experiment's view from its sidebar switch (GenAI until the user picks Model
    # training), not from the experiment's kind: these links open the training runs whatever the switch says.
    for experiment in tracking.training_experiments():
        link = f"{url}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
        console.print(f"  {experiment.name}: {link}", soft_wrap=True, highlight=False)
    # This Python's own mlflow: `mlflow` on PATH is missing (or another one) when the venv is not activated.
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    # One user, one worker: mlflow's default of 4 workers is slow to start on a 2-core machine.
    command += ["--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    os.execv(sys.executable, command)


def cmd_monitor(args: argparse.Namespace) -> int:
    """A local Prometheus (with Strata's alert rules) over the local Ray, until Ctrl-C."""
    from strata import monitor, paths

    discovery = monitor.ray_discovery_file(args.ray_temp_dir)
    if not discovery.exists():
        raise ConfigError(f"{discovery} does not exist: start Ray first (`ray start --head`), or pass --ray-temp-dir")
    process = monitor.start_prometheus(Path(paths.resolve("monitor")), discovery, args.port)
    console.print(f"Prometheus: http://127.0.0.1:{args.port} (scraping {discovery})")
    console.print(f"  alerts:  http://127.0.0.1:{args.port}/alerts   (rules: {monitor.DASHBOARDS / 'alerts.yml'})")
    console.print(f"  Grafana: add it as a Prometheus data source, then import {monitor.DASHBOARDS / 'grafana'}/*.json")
    console.print("Ctrl-C stops it.")
    try:
        process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=30)
        console.print("stopped Prometheus")
    return 0


def cmd_spot_watch(args: argparse.Namespace) -> int:
    import logging

    from strata import spot

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    node_id = args.node_id or spot.find_node_id(args.address, args.node_name)
    client = spot.MetadataClient(args.metadata_url)
    console.print(f"watching {args.metadata_url} for spot notices on Ray node {node_id}")
    notice = spot.watch(args.address, node_id, client, args.poll_interval)
    console.print(f"drained node {node_id} for preemption: {notice.action} in {notice.seconds_left}s")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Deploy registry aliases behind the OpenAI API with a split, and print how to call it."""
    from strata.serve import deploy
    from strata.serve.routing import parse_split

    try:
        weights = parse_split(args.split)
    except ValueError as err:
        raise ConfigError(f"--split: {err}") from None
    request = deploy.DeployRequest(
        model=args.model,
        weights=weights,
        app=args.app,
        port=args.port,
        route_prefix=args.route_prefix,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        resources=parse_resources(args.resources),
        max_batch_size=args.max_batch_size,
        loops=args.loops,
        torch_threads=args.torch_threads,
        dtype=args.dtype,
        quantization=args.quantization,
        share_base=args.share_base,
        requests_per_minute=args.requests_per_minute,
        burst=args.burst,
        keys_file=os.path.abspath(args.keys_file) if args.keys_file else None,
        out=args.out,
        address=args.address,
        cluster_cpus=args.cluster_cpus,
        wait_timeout_s=args.wait_timeout,
        experiment=args.experiment,
        check_resources=not args.no_resource_check,
    )
    try:
        with console.status(f"deploying {args.app!r}") as status:
            deployed = deploy.deploy_aliases(request, log=console.print, on_status=status.update)
    except (deploy.DeployError, TimeoutError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)  # Serve's messages hold [brackets]
        return 1
    console.print(f"wrote the deployed config to {deployed.config_path} (`serve deploy` re-applies it)")
    console.print(f"[green]serving[/green] {args.model} at {deployed.base_url}")
    body = f'{{"model": "{args.model}", "prompt": "def "}}'
    console.print(
        f"""  curl {deployed.base_url}/completions -H "Authorization: Bearer {deployed.key_hint}" """
        f"-H 'Content-Type: application/json' -d '{body}'",
        highlight=False,
        soft_wrap=True,
    )
    even = ",".join(f"{name}={100 // len(weights)}" for name in weights)
    console.print(f"  change the split live: strata split --app {args.app} {even}", highlight=False)
    return 0


def parse_resources(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        resources = json.loads(text)
        if not isinstance(resources, dict) or not all(isinstance(v, int | float) for v in resources.values()):
            raise ValueError("not an object of numbers")
    except ValueError as err:
        raise ConfigError(f"--resources: expected JSON like '{{\"serve_gpu\": 1}}', got {text!r} ({err})") from None
    return {name: float(amount) for name, amount in resources.items()}


def cmd_split(args: argparse.Namespace) -> int:
    """Change a running application's split live (the router reconfigures; nothing restarts)."""
    from strata.serve import deploy
    from strata.serve.routing import parse_split

    try:
        weights = parse_split(args.weights)
        dashboard = deploy.connect(args.address, start_if_none=False)
        deploy.set_weights(dashboard, args.app, weights)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not applied(dashboard, args.app, "the split"):
        return 1
    total = sum(weights.values())
    console.print(f"{args.app}: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in weights.items()))
    return 0


def cmd_add_variant(args: argparse.Namespace) -> int:
    """Serve one more LoRA variant from a running replica group: its replicas load the adapter, nothing restarts."""
    from strata.serve import deploy
    from strata.serve.replica_groups import add_group_variant

    try:
        dashboard = deploy.connect(args.address, start_if_none=False)
        replicas = add_group_variant(dashboard, args.app, args.group, args.name, args.weight, args.adapter, args.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not applied(dashboard, args.app, f"variant {args.name!r}"):
        return 1
    console.print(
        f"{args.app}: variant {args.name!r} served by replica group {args.group!r} "
        f"({replicas} replica{'s' if replicas != 1 else ''}), weight {args.weight:g}"
    )
    return 0


def applied(dashboard: str, app: str, what: str) -> bool:
    """Wait for Serve to apply a live change to `app`; print why not when it fails."""
    from strata.serve import deploy

    try:
        with console.status(f"applying {what} to {app!r}"):
            deploy.wait_until_running(dashboard, app)
    except (deploy.DeployError, TimeoutError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)  # Serve's messages hold [brackets]
        return False
    return True


def cmd_keys(args: argparse.Namespace) -> int:
    """`new`: a fresh API key on stdout, its hash on stderr. `hash`: the hash of each key read from stdin (one per
    line, as in a keys file), for `auth.api_key_hashes`: a serve config never holds a key itself."""
    from strata.serve.auth import hash_key, new_key, parse_keys

    if args.action == "new":
        key = new_key()
        print(key)
        console.print(f"sha256 (for auth.api_key_hashes): {hash_key(key)}", highlight=False)
        return 0
    keys = parse_keys(sys.stdin.read())
    if not keys:
        raise ConfigError("no keys on stdin: pipe them in, one per line (`strata keys hash < keys.txt`)")
    print("\n".join(hash_key(key) for key in keys))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build the corpus, tokenizer and packed sequences of a config")
    add_config_args(data)
    data.set_defaults(func=cmd_data)

    pretrain = sub.add_parser("pretrain", help="pretrain an MoE model on Ray Train")
    add_config_args(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    finetune = sub.add_parser("finetune", help="LoRA, QLoRA or full fine-tuning on Ray Train")
    add_config_args(finetune)
    finetune.set_defaults(func=cmd_finetune)

    tune = sub.add_parser("tune", help="hyperparameter sweep (Ray Tune) over a fine-tuning or pretraining config")
    add_config_args(tune)
    tune.set_defaults(func=cmd_tune)

    generate = sub.add_parser("generate", help="generate text from a registered model or a model directory")
    generate.add_argument("--model", required=True, help="models:/NAME@ALIAS, NAME/VERSION or a directory")
    generate.add_argument("--prompt", action="append", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=48)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.set_defaults(func=cmd_generate)

    watch = sub.add_parser("spot-watch", help="drain this Ray node when a spot interruption notice arrives")
    watch.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "127.0.0.1:6379"), help="GCS host:port")
    watch.add_argument("--node-id", help="Ray node id (hex); default: the node on this host")
    watch.add_argument("--node-name", help="find the node by its `ray start --node-name` instead")
    watch.add_argument("--metadata-url", default="http://169.254.169.254", help="instance metadata service")
    watch.add_argument("--poll-interval", type=float, default=5.0, help="seconds between polls")
    watch.set_defaults(func=cmd_spot_watch)

    dep = sub.add_parser("deploy", help="serve registry aliases behind an OpenAI API with a weighted A/B split")
    dep.add_argument("--model", required=True, help="registered model name")
    dep.add_argument("--split", required=True, help="ALIAS=WEIGHT,..., e.g. stable=90,fast=10")
    dep.add_argument("--app", default="strata", help="Serve application name")
    dep.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve proxy, if Serve is not running")
    dep.add_argument("--route-prefix", default="/", help="URL prefix of this application")
    dep.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per model replica (torch uses 1 thread per CPU)")
    dep.add_argument("--num-gpus", type=float, default=0, help="GPUs per model replica")
    dep.add_argument(
        "--resources", help="custom Ray resources per model replica, as JSON: '{\"serve_gpu\": 1}' (cluster/aws.yaml)"
    )
    dep.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together per replica")
    dep.add_argument(
        "--loops",
        type=int,
        default=1,
        help="engine loops per replica over one copy of the weights (on torch's CPU kernels, one per core decodes "
        "faster than one loop; on the bf16 brgemm kernels one loop does)",
    )
    dep.add_argument(
        "--torch-threads",
        type=int,
        help="torch threads per engine loop (default: --num-cpus / --loops, at least 1)",
    )
    dep.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="what replicas compute in (auto: bf16 on a GPU or a CPU with native bf16, else fp32)",
    )
    dep.add_argument(
        "--quantization", default="none", choices=["none", "int8", "nf4"], help="weight-only, linear layers + experts"
    )
    dep.add_argument(
        "--share-base",
        action="store_true",
        help="one replica for every alias: the base they were fine-tuned from, loaded once, each LoRA/QLoRA "
        "fine-tune's adapter beside it (a replica group)",
    )
    dep.add_argument("--requests-per-minute", type=float, default=600, help="rate limit per API key, in all")
    dep.add_argument("--burst", type=int, default=60, help="requests a key may send at once")
    dep.add_argument(
        "--keys-file",
        help="API keys, one per line, added to $STRATA_API_KEYS (default: $STRATA_API_KEYS, else "
        "$STRATA_HOME/serve/keys.txt, made with a new key); only their hashes reach the cluster",
    )
    dep.add_argument("--experiment", help="name of the A/B experiment: salts which users stick to which variant")
    dep.add_argument("--out", help="where to write the serve deploy config (default: $STRATA_HOME/serve/APP.yaml)")
    dep.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, a local cluster, else a new one)")
    dep.add_argument("--cluster-cpus", type=int, help="CPUs of the local cluster, if one has to be started")
    dep.add_argument("--wait-timeout", type=float, default=300, help="seconds to wait for the application to run")
    dep.add_argument(
        "--no-resource-check",
        action="store_true",
        help="deploy even if the cluster lacks the CPUs/GPUs now (it autoscales: nodes come once replicas ask)",
    )
    dep.set_defaults(func=cmd_deploy)

    split = sub.add_parser("split", help="change a deployed application's split live")
    split.add_argument("weights", help="VARIANT=WEIGHT,..., e.g. stable=50,fast=50")
    split.add_argument("--app", default="strata")
    split.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or the local cluster)")
    split.set_defaults(func=cmd_split)

    add = sub.add_parser("add-variant", help="serve one more LoRA variant from a running replica group, live")
    add.add_argument("name", help="the new variant's name")
    add.add_argument("--group", required=True, help="the replica group (variants' replica_group) to serve it")
    add.add_argument("--adapter", help="a LoRA adapter: a directory or an MLflow URI (runs:/ID/adapter)")
    add.add_argument("--model", help="or a registered LoRA fine-tune of the group's base (models:/NAME/VERSION)")
    add.add_argument("--weight", type=float, default=0.0, help="its weight in the split (default 0: no traffic yet)")
    add.add_argument("--app", default="strata")
    add.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or the local cluster)")
    add.set_defaults(func=cmd_add_variant)

    release.add_commands(sub)

    mon = sub.add_parser("monitor", help="a local Prometheus with Strata's alert rules over the local Ray")
    mon.add_argument("--port", type=int, default=9090)
    mon.add_argument("--ray-temp-dir", default="/tmp/ray", help="the Ray head's --temp-dir")
    mon.set_defaults(func=cmd_monitor)

    keys = sub.add_parser("keys", help="API keys: make a new one, or hash keys for auth.api_key_hashes")
    keys.add_argument("action", choices=["new", "hash"], help="new: print a new key; hash: hash the keys on stdin")
    keys.set_defaults(func=cmd_keys)

    ui = sub.add_parser("ui", help="open the MLflow UI on the tracking store")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    except ConnectionError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 1
