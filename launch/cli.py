"""The `stockpot` console script (also `python -m launch`).

Heavy modules (torch, fsspec, submitit) are imported inside the command that needs them, so
`stockpot --help` and config errors answer at once. Every StockpotError becomes one line on
stderr and its exit code; a traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from orchestrator.errors import StockpotError

EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides, e.g. trainer.max_steps=200"
    )


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    _add_overrides(parser)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (with its hash) and exit",
    )
    parser.add_argument(
        "--entrypoint",
        metavar="MODULE:FUNCTION",
        help="train with your own script instead of the built-in loop: FUNCTION(cfg) is called "
        "on every rank (same as the override entrypoint=MODULE:FUNCTION)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockpot",
        description="Fault-tolerant training on Slurm: atomic sharded checkpoints, "
        "exact resume after preemption, model soups.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="train here (spawns trainer.nproc local ranks), resuming")
    _add_config_args(run)
    run.set_defaults(handler=_cmd_run)

    submit = sub.add_parser("submit", help="submit the run to Slurm (or the local executor)")
    _add_config_args(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script only")
    submit.set_defaults(handler=_cmd_submit)

    status = sub.add_parser(
        "status", help="progress, restarts and committed checkpoints of a run (--watch)"
    )
    status.add_argument(
        "run_dir",
        metavar="RUN",
        help="run directory (local path or s3://bucket/prefix; S3 settings from AWS_*), or the "
        "run's YAML config (its run.dir, opened with its storage settings)",
    )
    _add_overrides(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=5.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 5) until Ctrl-C",
    )
    status.set_defaults(handler=_inspect("cmd_status"))

    verify = sub.add_parser("verify", help="check sizes and checksums (exit 3 if bad)")
    verify.add_argument(
        "path", help="a run directory (all checkpoints), one checkpoint, or the run's YAML config"
    )
    _add_overrides(verify)
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(handler=_inspect("cmd_verify"))

    export = sub.add_parser("export", help="write a checkpoint's weights as one safetensors file")
    export.add_argument("checkpoint", help="a committed checkpoint directory")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument(
        "--prefix",
        "--key-prefix",
        dest="prefix",
        default="auto",
        help="which model: a flat key prefix (train.model.) or a name (ema_999: trainer.ema's "
        "average); default: the trained model",
    )
    export.set_defaults(handler=_inspect("cmd_export"))

    from launch import soup_cmd  # argparse only: the soup engine loads when the command runs

    soup_cmd.add_parser(sub)
    from launch import plot, scaffold  # argparse only: matplotlib loads when `plot` runs

    plot.add_parser(sub)
    scaffold.add_parser(sub)
    return parser


def _inspect(name: str) -> Handler:
    """A read-only command from launch.inspect, imported only when it runs."""

    def handler(args: argparse.Namespace) -> int:
        from launch import inspect as commands

        command: Handler = getattr(commands, name)
        return command(args)

    return handler


def _load_config(args: argparse.Namespace):  # -> orchestrator.config.Config
    from orchestrator import config

    overrides = list(args.overrides)
    if getattr(args, "entrypoint", None):
        overrides.append(f"entrypoint={args.entrypoint}")
    cfg = config.load(args.config, overrides)
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return cfg
    from orchestrator import entrypoint

    entrypoint.check(cfg)  # before any rank or job starts: one line, exit 2
    return cfg


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if args.print_config:
        return 0
    return run_config(cfg)


def _cmd_submit(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if args.print_config:
        return 0
    from launch.submit import submit_config

    return submit_config(cfg, dry_run=args.dry_run)


def run_config(cfg) -> int:  # cfg: orchestrator.config.Config
    """Train `cfg` here: in this process when Slurm or torchrun started the ranks, else spawn
    trainer.nproc local ranks. Returns the worst rank's exit code (75: stopped, resumable)."""
    import json
    import os
    import tempfile

    from launch.supervise import supervise_local
    from orchestrator.env import in_managed_job

    if in_managed_job(os.environ):
        from orchestrator.preemption import catch_early

        catch_early()  # a USR2 during torch's import must not kill the rank
        from orchestrator.worker import exit_now, main_with

        exit_now(main_with(cfg))  # torch objects must not be torn down in-process
    with tempfile.TemporaryDirectory(prefix="stockpot-") as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(cfg.to_dict(), f)
        argv = [sys.executable, "-m", "orchestrator.worker", path]
        return supervise_local(
            argv,
            cfg.trainer.nproc,
            max_restarts=cfg.launcher.max_restarts,
            standby_after_s=cfg.launcher.standby_after_s,
            on_killed=lambda life, rank, why: _record_killed(cfg, life, rank, why),
        )


def _record_killed(cfg, life: str, rank: int, why: str) -> None:  # cfg: Config
    """A rank that a signal killed left no record of its own: the spawner writes it."""
    import dataclasses

    from orchestrator import ending
    from orchestrator.storage import Store

    end = ending.make_end(
        life, rank, ending.TRANSIENT, f"rank {rank} {why}", world=cfg.trainer.nproc
    )
    end = dataclasses.replace(end, signature=why)  # the cause itself, not a peer's echo of it
    ending.record(Store(cfg.run.dir, cfg.storage), {}, end)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """As parse_args, but key=value overrides may also follow the options
    (`stockpot run x.yaml --entrypoint m:f trainer.max_steps=5`)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except StockpotError as exc:
        if args.debug:
            raise
        print(f"stockpot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # storage: missing paths, permissions, exhausted retries
        if args.debug:
            raise
        print(f"stockpot: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stockpot: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
