"""``rlfleet bench {buffer,remote,collect,learner}``: benchmarks that print figures.

Every benchmark measures, in the same run and on the same shapes, the limit it is
judged against (memcpy or page-cache bandwidth, a bare Ray call, bare env steps) and
prints its own figure beside the ratio to that limit. Plain text for people, ``--json``
for machines. Each kind lives in its own module with ``add_arguments(parser)`` and
``main(args) -> int``; :func:`start_ray` is how the ones that need Ray get it.
Runs on the driver; not thread-safe (one benchmark per process).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

__all__ = ["bench", "bench_arguments", "start_ray"]

KINDS = {
    "buffer": "local memmap ReplayBuffer: writes and samples against page-cache and memcpy limits",
    "remote": "sharded replay service through the client against a bare Ray call",
    "collect": "collector fleet frames/s against bare gymnasium env steps",
    "learner": "learner steps/s and weight broadcast",
}


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(KINDS), metavar="KIND", help=", ".join(sorted(KINDS)))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark (--help)")


def bench(args: argparse.Namespace) -> int:
    # Only the chosen benchmark is imported: each pulls in heavy parts of its own.
    module = importlib.import_module(f"rlfleet.launch.bench.{args.kind}")
    parser = argparse.ArgumentParser(prog=f"rlfleet bench {args.kind}", description=KINDS[args.kind])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(args.options)) or 0)


def start_ray(address: str | None, *, num_cpus: int) -> Any:
    """Join the cluster at ``address`` (``--address``), or start an embedded Ray with
    ``num_cpus`` logical CPUs, through ``rlfleet.buffer.init_ray`` (its bounded join), in
    the default namespace. Returns the ``ClusterInfo``: ``started`` says the caller owns
    the connection and calls ``ray.shutdown()`` when done.
    """
    from rlfleet.buffer import DEFAULT_NAMESPACE, init_ray

    if address:
        return init_ray(address, namespace=DEFAULT_NAMESPACE)
    # "local": a cluster of its own even when another one runs on this machine
    return init_ray("local", namespace=DEFAULT_NAMESPACE, num_cpus=num_cpus, include_dashboard=False)
