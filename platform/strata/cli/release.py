"""The release commands: `strata promote|rollback|history MODEL` move and show the release tracks; `strata canary`
runs, shows and steers canary releases. Each parses, calls `strata.release` and prints."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from strata.config import ConfigError, load_config

console = Console(stderr=True)


def cmd_canary(args: argparse.Namespace) -> int:
    """`run` (the default): a canary release of the candidate variant of a deployed application; exits 0 once it is
    stable, 1 on a rollback or an abort. `status`, `abort`, `pause`, `resume`: the model's latest canary."""
    from strata import tracking
    from strata.config.canary import CanaryConfig
    from strata.release import canary

    if args.action != "run":
        if not args.model:
            raise ConfigError(f"--model: `strata canary {args.action}` needs the registered model's name")
        tracking.use_store()
        try:
            if args.action == "status":
                status = canary.latest_canary(args.model)
            else:
                status = canary.send_command(args.model, args.action)
                console.print(f"sent {args.action} to the canary of {args.model} v{status.version}")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if status is None:
            raise ConfigError(f"--model: {args.model!r} has had no canary")
        show(status)
        return 0
    if not args.config:
        raise ConfigError("--config: `strata canary run` needs a canary config (see configs/canary.yaml)")
    cfg = load_config(args.config, CanaryConfig, args.overrides)
    try:
        status = canary.run_canary(cfg, log=console.print)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    show(status)
    return 0 if status.state == canary.SUCCEEDED else 1


def show(status) -> None:
    from strata.release import canary

    console.print(canary.status_line(status), highlight=False)
    if status.steps:
        console.print(canary.status_table(status))


def release_command(call) -> int:
    """Run a release command: a bad model, version or track exits 2, a refused or conflicting one 1."""
    from strata import release, tracking

    tracking.use_store()
    try:
        return call(release)
    except release.ReleaseError as err:
        if isinstance(err, release.PromotionRefused):
            console.print(release.gates_table(err.promotion))
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        return 2 if isinstance(err, release.BadTarget) else 1


def cmd_promote(args: argparse.Namespace) -> int:
    """Move a release track to a version once its gates pass (with --dry-run: only show the gates)."""
    from strata.config import PromotionGates

    gates = load_config(args.gates, PromotionGates) if args.gates else None

    def promote(release) -> int:
        done = release.promote(
            args.model,
            args.version,
            args.to,
            reason=args.reason,
            actor=args.actor,
            force=args.force,
            dry_run=args.dry_run,
            gates=gates,
        )
        console.print(release.gates_table(done))
        target = f"{args.model}@{args.to}: {done.from_version or 'nowhere'} -> {done.to_version}"
        if args.dry_run:
            console.print(f"dry run, nothing moved: would {'promote' if done.passed else 'refuse'} {target}")
            return 0 if done.passed else 1
        console.print(f"[green]{done.event.kind}[/green] {target} (history #{done.event.seq})", highlight=False)
        return 0

    return release_command(promote)


def cmd_rollback(args: argparse.Namespace) -> int:
    def rollback(release) -> int:
        done = release.rollback(args.model, args.track, reason=args.reason, actor=args.actor)
        target = f"{args.model}@{args.track}: {done.from_version} -> {done.to_version}"
        console.print(f"[cyan]rolled back[/cyan] {target} (history #{done.event.seq})", highlight=False)
        return 0

    return release_command(rollback)


def cmd_history(args: argparse.Namespace) -> int:
    def print_history(release) -> int:
        console.print(release.history_table(args.model, release.release_history(args.model)))
        return 0

    return release_command(print_history)


def add_commands(sub) -> None:
    can = sub.add_parser("canary", help="canary release of a deployed candidate variant, rolled back on bad metrics")
    can.add_argument("action", nargs="?", default="run", choices=["run", "status", "abort", "pause", "resume"])
    can.add_argument("--config", help="canary config (run), e.g. configs/canary.yaml")
    can.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="e.g. bake_s=30")
    can.add_argument("--model", help="registered model (status, abort, pause, resume)")
    can.set_defaults(func=cmd_canary)

    tracks = ["fast", "stable"]  # strata.config.TRACKS, written out: the parser imports no configs
    promote = sub.add_parser("promote", help="move a release track (registry alias) to a version once its gates pass")
    promote.add_argument("model", help="registered model name")
    promote.add_argument("version", help="the version to promote")
    promote.add_argument("--to", required=True, choices=tracks, help="the track (alias) to move")
    promote.add_argument("--reason", default="", help="why, for the release history")
    promote.add_argument("--actor", help="who, for the release history (default: the OS user)")
    promote.add_argument("--force", action="store_true", help="promote to stable without a passed canary (recorded)")
    promote.add_argument("--dry-run", action="store_true", help="show the gate results; move and record nothing")
    promote.add_argument("--gates", help="YAML of PromotionGates (default: the built-in gates)")
    promote.set_defaults(func=cmd_promote)

    back = sub.add_parser("rollback", help="move a release track back to the version it held before")
    back.add_argument("model", help="registered model name")
    back.add_argument("--track", required=True, choices=tracks, help="the track (alias) to move back")
    back.add_argument("--reason", default="", help="why, for the release history")
    back.add_argument("--actor", help="who, for the release history (default: the OS user)")
    back.set_defaults(func=cmd_rollback)

    hist = sub.add_parser("history", help="the release history of a registered model (promotions, refusals, rollbacks)")
    hist.add_argument("model", help="registered model name")
    hist.set_defaults(func=cmd_history)
