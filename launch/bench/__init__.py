"""``rlfleet bench {buffer,remote,collect,learner}``: benchmarks that print figures.

Every benchmark measures, in the same run and on the same shapes, the limit it is
judged against (memcpy or page-cache bandwidth, a bare Ray call, bare env steps) and
prints its own figure beside the ratio to that limit. Plain text for people, ``--json``
for machines. Each kind lives in its own module with ``add_arguments(parser)`` and
``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["bench", "bench_arguments"]

KINDS = {
    "buffer": "local memmap ReplayBuffer: writes and samples against page-cache and memcpy limits",
    "remote": "sharded replay service through the client against a bare Ray call",
    "collect": "collector fleet frames/s against bare gymnasium env steps",
    "learner": "learner steps/s and weight broadcast",
}


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, help_text in KINDS.items():
        p = sub.add_parser(kind, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        module = importlib.import_module(f"rlfleet.launch.bench.{kind}")
        module.add_arguments(p)
        p.set_defaults(bench_main=module.main)


def bench(args: argparse.Namespace) -> int:
    return int(args.bench_main(args) or 0)
