"""The ``rlfleet`` command line (runs on the driver), and ``rlfleet run``'s own glue.

Each subcommand lives in a module as two functions: ``<name>_arguments(parser)`` adds its
flags and ``<name>(args) -> int`` runs it and returns the exit code. Only the module of
the subcommand being run is imported, so ``rlfleet --help``, ``--version`` and a typo stay
fast (torch and Ray take seconds to import). ``rlfleet run``'s two functions are here:
they load the config, drive the progress display and print the summary; the job itself
is :func:`rlfleet.launch.job.run`.

Not thread-safe: one ``main`` per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from importlib import metadata

__all__ = ["COMMANDS", "main", "run_command", "run_command_arguments"]

logger = logging.getLogger(__name__)

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("rlfleet.launch.cli", "run_command", "run collectors, replay service and learners"),
    "serve": ("rlfleet.launch.service_cli", "serve", "start a replay service (detached) from a config"),
    "status": ("rlfleet.launch.service_cli", "status", "show running buffers, shards and rates"),
    "sample": ("rlfleet.launch.service_cli", "sample", "print a few rows sampled from a running buffer"),
    "stop": ("rlfleet.launch.service_cli", "stop", "stop a running replay service (data stays on disk)"),
    "check": ("rlfleet.launch.check", "check", "check the integrity of a buffer on disk"),
    "export": ("rlfleet.launch.export", "export", "export a run's policy with torch.export"),
    "export-dataset": ("rlfleet.launch.dataset_cli", "export_dataset_command",
                       "export a buffer's whole episodes as a Minari or Hugging Face dataset"),
    "import-dataset": ("rlfleet.launch.dataset_cli", "import_dataset_command",
                       "create a buffer from a Minari or Hugging Face dataset"),
    "bench": ("rlfleet.launch.bench", "bench", "benchmarks: buffer, remote, collect, learner"),
}


def _load(name: str):
    module_name, func_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, f"{func_name}_arguments"), getattr(module, func_name)


def _version() -> str:
    try:
        return f"rlfleet {metadata.version('rlfleet')}"
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "rlfleet (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="rlfleet",
        description="Distributed replay buffers and data collection for RL on Ray.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            add_arguments, func = _load(name)
            add_arguments(p)
            p.set_defaults(func=func)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- rlfleet run


def run_command_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``rlfleet run``."""
    parser.add_argument("config", metavar="CONFIG", nargs="?", help="a YAML run config, e.g. configs/cartpole_dqn.yaml")
    parser.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="override config leaves, e.g. learner.lr=1e-3")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its buffer and checkpoint")
    parser.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    parser.add_argument("--connect-timeout", type=float, default=None, metavar="SECONDS",
                        help="with ray.address set: longest wait to join the cluster "
                             "(ray.connect_timeout_s, default 30)")


def run_command(args: argparse.Namespace) -> int:
    """``rlfleet run CONFIG [key=value ...]`` / ``rlfleet run --resume RUN_DIR [key=value ...]``."""
    from rlfleet.launch.config import ConfigError, load_config
    from rlfleet.launch.progress import Progress
    from rlfleet.launch import run
    from rlfleet.launch.job import RunTerminated
    from rlfleet.launch.rundir import RunDir

    overrides = list(args.overrides)
    if args.connect_timeout is not None:
        overrides.append(f"ray.connect_timeout_s={args.connect_timeout}")
    try:
        if args.resume:
            if args.config is not None:
                if "=" not in args.config:
                    print("rlfleet run: give either CONFIG or --resume RUN_DIR, not both", file=sys.stderr)
                    return 2
                overrides.insert(0, args.config)
            config = RunDir.open(args.resume).read_config(overrides)
        else:
            if args.config is None:
                print("rlfleet run: a CONFIG file is needed (or --resume RUN_DIR)", file=sys.stderr)
                return 2
            config = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rlfleet run: {e}", file=sys.stderr)
        return 2

    display = Progress(live=False if args.plain else None)
    try:
        with display.keep_logs_apart():
            result = run(config, resume=args.resume, progress=display.update)
    except RunTerminated as stopped:  # SIGTERM (`ray job stop`): show how the run ended, then exit
        display.summary(RunDir(stopped.result.run_dir).read_summary() or dataclasses.asdict(stopped.result))
        raise
    except (ValueError, OSError, TimeoutError, RuntimeError) as e:
        display.close_line()
        logger.debug("run failed", exc_info=True)
        print(f"rlfleet run: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary = RunDir(result.run_dir).read_summary() or dataclasses.asdict(result)
    display.summary(summary)
    return 130 if result.stop_reason == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
