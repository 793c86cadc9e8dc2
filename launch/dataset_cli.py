"""``rlfleet export-dataset`` and ``rlfleet import-dataset``: the command line of
``dataset_export.export_dataset`` and ``ReplayBuffer.from_dataset``.

Each prints what it did: episodes and rows exported, the episodes skipped (cut by the
ring, unfinished, inconsistent), rows/s, and how to load the result. Exit status 0 on
success, 1 when the export or import failed (the message says why; nothing is left
half-written), 2 for bad usage.

Runs on the driver (a shell). Not thread-safe: one command per process.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["export_dataset_command", "export_dataset_command_arguments", "import_dataset_command",
           "import_dataset_command_arguments"]

logger = logging.getLogger(__name__)

EXPORT_EPILOG = """whole episodes only:
  Episodes whose first rows the ring overwrote (cut) and episodes still running
  (unfinished, no done row yet) are skipped and counted. With --format hf,
  --all-rows exports every committed row instead.

spaces (minari): the run's env from RUN_DIR/config.yaml; for a bare buffer, --env ID,
  else Box spaces inferred from the stored shapes and dtypes (integer actions become
  a Box, not a Discrete).

examples:
  rlfleet export-dataset runs/smoke-20250101-120000 --format minari datasets/cartpole-v0
  MINARI_DATASETS_PATH=datasets python -c "import minari; print(minari.load_dataset('cartpole-v0'))"
  rlfleet export-dataset runs/smoke-20250101-120000/buffer --format hf cartpole-hf
  python -c "import datasets; print(datasets.load_from_disk('cartpole-hf'))"
  rlfleet import-dataset datasets/cartpole-v0 cartpole-buffer"""


def export_dataset_command_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``rlfleet export-dataset``."""
    parser.add_argument("source", metavar="BUFFER_PATH_OR_RUN_DIR",
                        help="a run directory, a buffer directory, or a sharded buffer's directory")
    parser.add_argument("--format", required=True, choices=("minari", "hf"),
                        help="minari: a Minari dataset (HDF5, whole episodes); hf: a Hugging Face "
                             "`datasets` directory (Arrow shards, one row per transition)")
    parser.add_argument("out", metavar="OUT",
                        help="the dataset directory to write (absent or empty); for minari named after "
                             "its dataset id, <name>-v<N>, e.g. datasets/cartpole-v0")
    parser.add_argument("--env", metavar="ID", help="minari: the env id (gymnasium id or module:callable) "
                        "whose spaces the dataset records, for a buffer without a run directory")
    parser.add_argument("--all-rows", action="store_true",
                        help="hf: export every committed row, not only whole episodes")
    parser.add_argument("--dataset-id", metavar="ID",
                        help="minari: [namespace/]<name>-v<N> (default: OUT's name); OUT must end with it")
    parser.add_argument("--chunk-rows", type=int, metavar="N", help="rows read at a time (default: ~16 MB)")
    parser.add_argument("--max-shard-size", default="500MB", metavar="SIZE",
                        help="hf: the largest Arrow shard (default 500MB)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--from-disk", action="store_true",
                       help="read the shard directories here even when a replay service runs for them")
    where.add_argument("--service", action="store_true",
                       help="require the running replay service: Ray tasks export each shard on its node")
    parser.add_argument("--address", metavar="ADDR",
                        help="the Ray cluster to look for the service on (default: RAY_ADDRESS; none: from disk)")
    parser.add_argument("--task-per", default="node", choices=("node", "shard"),
                        help="with the service: one Ray task per node (default) or per shard")
    parser.add_argument("--plain", action="store_true",
                        help="no progress bar (one is drawn only when stderr is a terminal)")
    parser.epilog = EXPORT_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def export_dataset_command(args: argparse.Namespace) -> int:
    """``rlfleet export-dataset SOURCE --format minari|hf OUT``."""
    from rlfleet.buffer import BufferFormatError
    from rlfleet.launch.dataset_export import export_dataset

    if args.chunk_rows is not None and args.chunk_rows < 1:
        print(f"rlfleet export-dataset: --chunk-rows {args.chunk_rows}: must be >= 1", file=sys.stderr)
        return 2
    try:
        result = export_dataset(
            args.source, args.format, args.out, env=args.env, all_rows=args.all_rows,
            dataset_id=args.dataset_id, chunk_rows=args.chunk_rows, max_shard_size=args.max_shard_size,
            use_service=True if args.service else False if args.from_disk else None, address=args.address,
            task_per=args.task_per, progress=not args.plain,
        )
    except (ValueError, OSError, ImportError, BufferFormatError, RuntimeError) as e:
        logger.debug("export-dataset failed", exc_info=True)
        print(f"rlfleet export-dataset: {str(e).removeprefix('export-dataset: ')}", file=sys.stderr)
        return 1
    what = "rows" if result.episodes == 0 and result.cut is None else f"episodes ({result.rows_exported} rows)"
    count = result.rows_exported if what == "rows" else result.episodes
    print(f"exported {count} {what} to {result.out} ({result.format})")
    if result.cut is not None:
        print(f"skipped episodes: {result.cut} cut by the ring (first rows overwritten), "
              f"{result.unfinished} unfinished (no done row yet), {result.inconsistent} inconsistent, "
              f"{result.missing} overwritten during the export")
    if result.unreadable:
        print(f"left out {result.unreadable} rows whose frame stacks reach frames no longer stored")
    print(f"read {result.rows_read} rows in {result.seconds:.1f} s: {result.rows_per_s:,.0f} rows/s; {result.where}")
    if result.spaces:
        print(f"spaces: {result.spaces}")
    print("load it with:")
    for line in result.load:
        print(f"  {line}")
    return 0


def import_dataset_command_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``rlfleet import-dataset``."""
    parser.add_argument("dataset", metavar="DATASET",
                        help="a Minari dataset (directory, its data/ directory, or an id under "
                             "MINARI_DATASETS_PATH) or a Hugging Face save_to_disk directory")
    parser.add_argument("out", metavar="OUT_BUFFER", help="the buffer directory to create (absent or empty)")
    parser.add_argument("--format", choices=("minari", "hf"), help="the dataset's format (default: told from DATASET)")
    parser.add_argument("--capacity", metavar="ROWS_OR_SIZE",
                        help="the buffer's capacity, rows or a size such as 2GB (default: the dataset's rows)")
    parser.add_argument("--truncate", action="store_true",
                        help="allow a capacity below the dataset's rows (the newest rows are kept)")
    parser.add_argument("--chunk-rows", type=int, default=4096, metavar="N", help="rows written at a time")


def import_dataset_command(args: argparse.Namespace) -> int:
    """``rlfleet import-dataset DATASET OUT_BUFFER [--format F] [--capacity C]``."""
    import time

    from rlfleet.buffer import BufferFormatError, ReplayBuffer, SchemaMismatch

    if args.chunk_rows < 1:
        print(f"rlfleet import-dataset: --chunk-rows {args.chunk_rows}: must be >= 1", file=sys.stderr)
        return 2
    capacity = args.capacity
    if capacity is not None and capacity.replace("_", "").isdigit():
        capacity = int(capacity.replace("_", ""))
    t0 = time.perf_counter()
    try:
        rb = ReplayBuffer.from_dataset(args.dataset, args.out, capacity=capacity, format=args.format,
                                       truncate=args.truncate, chunk_rows=args.chunk_rows)
    except (ValueError, OSError, ImportError, BufferFormatError, SchemaMismatch) as e:
        logger.debug("import-dataset failed", exc_info=True)
        print(f"rlfleet import-dataset: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    rows = len(rb)
    print(f"imported {rb.total_inserted} rows into {args.out} (holds {rows}, capacity {rb.capacity}) in "
          f"{seconds:.1f} s: {rb.total_inserted / max(seconds, 1e-9):,.0f} rows/s")
    print(f"open it with: ReplayBuffer.open({args.out!r})")
    rb.close()
    return 0
