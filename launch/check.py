"""``rlfleet check PATH``: integrity of a buffer on disk (runs on the driver or a shell).

``PATH`` is one buffer directory, or a sharded buffer's directory holding
``shard-<k>`` buffers (each is checked). Exit status 0 when everything is intact, 1 with
a readable report of every problem otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rlfleet.buffer.check import CheckReport, check_buffer

__all__ = ["check", "check_arguments"]


def check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a buffer directory, or a sharded buffer's directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _buffer_dirs(path: Path) -> list[Path]:
    if (path / "meta.json").exists() or not path.is_dir():
        return [path]
    shards = sorted(
        (p for p in path.iterdir() if re.fullmatch(r"shard-\d+", p.name) and p.is_dir()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return shards or [path]


def check(args: argparse.Namespace) -> int:
    reports: list[CheckReport] = [check_buffer(d) for d in _buffer_dirs(Path(args.path))]
    ok = all(r.ok for r in reports)
    if args.json:
        print(json.dumps({"ok": ok, "buffers": [r.to_dict() for r in reports]}, indent=1))
    else:
        for r in reports:
            print(r)
        if len(reports) > 1:
            damaged = sum(not r.ok for r in reports)
            print(f"{len(reports)} shards: {'all OK' if ok else f'{damaged} DAMAGED'}")
    return 0 if ok else 1
