"""``rlfleet check PATH``: integrity of a buffer on disk (runs on the driver or a shell).

``PATH`` is one buffer directory, or a sharded buffer's directory holding
``shard-<k>`` buffers (each is checked). ``--upgrade`` first migrates each buffer of
format 1 in place to the current format (``rlfleet.buffer.upgrade``), then checks it.
Exit status: see ``EXIT_STATUS``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rlfleet.buffer.check import CheckReport, check_buffer
from rlfleet.buffer.errors import BufferFormatError
from rlfleet.buffer.upgrade import upgrade_buffer

__all__ = ["EXIT_DAMAGED", "EXIT_NOT_A_BUFFER", "EXIT_OK", "check", "check_arguments"]

EXIT_OK, EXIT_DAMAGED, EXIT_NOT_A_BUFFER = 0, 1, 2
EXIT_STATUS = """exit status:
  0  every buffer is intact, or in a state a killed writer leaves that
     ReplayBuffer.open repairs (reported as "OK (repairable: ...)")
  1  a buffer is damaged (each problem is printed), or --upgrade was refused
  2  PATH is not a buffer: it does not exist, or holds neither meta.json nor
     shard-<k> buffers (for a run directory, check RUN_DIR/buffer)"""


def check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a buffer directory, or a sharded buffer's directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--upgrade", action="store_true",
                        help="migrate a buffer of format 1 (reward and flags at the root) in place to "
                             "format 2 first; stop every process writing it before")
    parser.epilog = EXIT_STATUS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _buffer_dirs(path: Path) -> list[Path]:
    if (path / "meta.json").exists() or not path.is_dir():
        return [path]
    shards = sorted(
        (p for p in path.iterdir() if re.fullmatch(r"shard-\d+", p.name) and p.is_dir()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return shards or [path]


def check(args: argparse.Namespace) -> int:
    dirs = _buffer_dirs(Path(args.path))
    upgrades: list[str] = []
    refused = False
    if args.upgrade:
        for d in dirs:
            if not (d / "meta.json").exists():
                continue  # reported below as not a buffer (or as a damaged shard)
            try:
                upgrades.append(str(upgrade_buffer(d)))
            except (BufferFormatError, OSError) as e:
                upgrades.append(f"buffer {d}: upgrade refused: {e}")
                refused = True
    reports: list[CheckReport] = [check_buffer(d) for d in dirs]
    sharded = len(reports) > 1 or dirs[0] != Path(args.path)
    if not sharded and not reports[0].is_buffer:
        status = EXIT_NOT_A_BUFFER
    else:
        # inside a sharded directory a shard that is not a buffer is damage
        status = EXIT_DAMAGED if refused or not all(r.ok for r in reports) else EXIT_OK
    if args.json:
        print(json.dumps({"ok": status == EXIT_OK, "exit_status": status, "upgrades": upgrades,
                          "buffers": [r.to_dict() for r in reports]}, indent=1))
        return status
    for line in upgrades:
        print(line)
    for r in reports:
        print(r)
    if len(reports) > 1:
        damaged = sum(not r.ok for r in reports)
        print(f"{len(reports)} shards: {'all OK' if not damaged else f'{damaged} DAMAGED'}")
    return status
