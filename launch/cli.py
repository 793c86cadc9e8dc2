"""The ``rlfleet`` command line (runs on the driver).

Each subcommand lives in its own module as two functions: ``<name>_arguments(parser)``
adds its flags and ``<name>(args) -> int`` runs it and returns the exit code. Only the
module of the subcommand being run is imported, so ``rlfleet --help`` and a typo stay
fast (torch and Ray take seconds to import).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("rlfleet.launch.run", "run_command", "run collectors, replay service and learners"),
    "serve": ("rlfleet.launch.service_cli", "serve", "start a replay service (detached) from a config"),
    "status": ("rlfleet.launch.service_cli", "status", "show running buffers, shards and rates"),
    "sample": ("rlfleet.launch.service_cli", "sample", "print a few rows sampled from a running buffer"),
    "stop": ("rlfleet.launch.service_cli", "stop", "stop a running replay service (data stays on disk)"),
    "check": ("rlfleet.launch.check", "check", "check the integrity of a buffer on disk"),
    "export": ("rlfleet.launch.export", "export", "export a run's policy with torch.export"),
    "bench": ("rlfleet.launch.bench", "bench", "benchmarks: buffer, remote, collect, learner"),
}


def _load(name: str):
    module_name, func_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, f"{func_name}_arguments"), getattr(module, func_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="rlfleet",
        description="Distributed replay buffers and data collection for RL on Ray.",
    )
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


if __name__ == "__main__":
    sys.exit(main())
