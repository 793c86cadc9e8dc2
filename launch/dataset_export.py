"""``export_dataset``: a buffer's whole episodes out as a Minari or Hugging Face dataset.

``rlfleet export-dataset`` calls it (``dataset_cli``); ``ReplayBuffer.from_dataset`` is
the way back. What goes where in the files is ``rlfleet.buffer.dataset_layout``'s.

Source: a run directory (its ``config.yaml`` names the env and the buffer), a buffer
directory, or a sharded buffer's directory (``shard-<k>`` buffers).

Episodes (``rlfleet.buffer.episodes``): only whole ones go out, steps 0 .. T-1 with the
last one done. Episodes the ring cut (their first rows overwritten) and episodes still
running are skipped and counted. Hugging Face datasets hold transitions, so
``all_rows=True`` there exports every committed row instead (then nothing is counted).

Streaming, bounded memory: rows are read a chunk at a time with plain file reads
(``rlfleet.buffer.scan``: never the whole buffer, never a buffer map). A first pass reads
``episode_id``, ``step`` and ``done`` alone and plans the whole episodes; the second
holds only the episodes still open while their rows stream in (an episode's rows may lie
in several shards: collectors write each batch to whichever local shard has stored the
fewest rows). A live writer may go on meanwhile; rows it commits after the export began
are not read, and episodes it overwrites before they are read are counted as ``missing``.

Where it runs:

- from disk, in this process: every shard, interleaved (``scan_shards``);
- with a running replay service for the buffer (found by name and path, only when this
  process already has Ray or ``RAY_ADDRESS`` is set: looking never starts a cluster),
  Ray tasks read the shards on their own nodes (``dataset_service``).

Frame-stack buffers (``frame_stack``): the rows go out as the buffer's readers return
them, ``observation`` and ``next.observation`` stacks rebuilt (``rlfleet.buffer.
frame_scan``), without the stored ``frame_stack`` columns and reset rows. Rows whose
stacks cannot be rebuilt (their frames no longer stored, or stored in another shard or
before a reopen) are left out and counted as ``unreadable``; an episode that loses one
is cut.

Spaces (Minari): the run's env (``config.yaml``), or ``env`` (an id, for a buffer
without a run directory), else Box spaces of each key's stored shape and dtype over the
dtype's range (uint8: 0..255; an integer action becomes a Box, not a Discrete).

Output: ``out`` must be absent or empty. Minari: ``out`` is the dataset's directory,
named by its id (``<name>-v<N>``), loaded with ``MINARI_DATASETS_PATH=<parent>`` and
``minari.load_dataset(id)``. Hugging Face: ``out`` is a ``save_to_disk`` directory,
Arrow shards of ``max_shard_size``. On failure, what was written is removed.

Runs on the driver (or a shell). Not thread-safe: one export per ``out`` at a time.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlfleet.buffer import BufferFormatError
from rlfleet.buffer.dataset_layout import DONE, EPISODE_ID, FORMATS, STEP, hf_features, require
from rlfleet.buffer.dataset_layout import minari_schema_problem
from rlfleet.buffer.episodes import EpisodeAssembler, EpisodePlan
from rlfleet.buffer.scan import BufferFiles, scan_shards
from rlfleet.launch.dataset_service import ServiceRun, find_service, run_service
from rlfleet.launch.dataset_spaces import spaces_for
from rlfleet.launch.dataset_writers import MinariWriter, PartCounts, PartSpec, finish_hf, finish_minari
from rlfleet.launch.dataset_writers import index_shards, progress_bar, write_chunks

__all__ = ["BufferSource", "ExportResult", "export_dataset", "find_source"]

logger = logging.getLogger(__name__)

_DATASET_ID = re.compile(r"^[-_\w]+?-v\d+$")
_SHARD = re.compile(r"shard-(\d+)")


@dataclass
class ExportResult:
    """What ``export_dataset`` did. ``cut``, ``unfinished`` and ``inconsistent`` are None
    with ``all_rows`` (nothing is assembled then). ``evicted``: rows a live writer
    overwrote before the export read them (their episodes are counted as ``missing``,
    or, when gone before the first pass, not seen at all). ``unreadable``: rows of a
    frame-stack buffer whose stacks could not be rebuilt, left out (their episodes are
    counted as ``cut``)."""

    out: str
    format: str
    rows_read: int
    rows_exported: int
    episodes: int
    cut: int | None
    unfinished: int | None
    inconsistent: int | None
    missing: int
    seconds: float
    where: str
    evicted: int = 0
    unreadable: int = 0
    spaces: str = ""
    load: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": self.rows_per_s}


@dataclass
class BufferSource:
    """A buffer to export: its shard directories and, from a run directory, its env and
    the name its replay service runs under."""

    buffer_dir: Path
    shards: list[Path]
    env: Any = None  # the run's EnvConfig
    seed: int = 0
    service: str | None = None
    namespace: str | None = None


def find_source(source: str | os.PathLike) -> BufferSource:
    """The buffer behind ``source`` (a run directory, a buffer, a sharded buffer).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        BufferFormatError: it holds no buffer.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"export-dataset: {str(path)!r} does not exist; pass a run directory or a buffer directory")
    env, seed, service, namespace = None, 0, None, None
    if (path / "config.yaml").is_file():
        from rlfleet.launch.rundir import RunDir

        config = RunDir.open(path).read_config()
        env, seed, namespace, service = config.env, config.seed, config.ray.namespace, path.name
        path = Path(config.buffer.path) if config.buffer.path else path / "buffer"
        if not path.exists():  # on other nodes' disks: only the run's service can read it
            return BufferSource(path, [], env, seed, service, namespace)
    if (path / "meta.json").is_file():
        return BufferSource(path, [path], env, seed, service, namespace)
    shards = sorted((p for p in path.iterdir() if _SHARD.fullmatch(p.name) and (p / "meta.json").is_file()),
                    key=lambda p: int(p.name.split("-")[1])) if path.is_dir() else []
    if not shards:
        raise BufferFormatError(
            f"export-dataset: {str(path)!r} is not a buffer: it holds neither meta.json nor shard-<k> "
            f"buffer directories; pass a run directory, a buffer directory or a sharded buffer's directory"
        )
    return BufferSource(path, shards, env, seed, service, namespace)


def _check_out(out: Path, format: str, dataset_id: str | None) -> str | None:
    """Refuse an ``out`` that holds anything; the Minari dataset id ``out`` stands for."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"export-dataset: OUT {str(out)!r} exists and is not empty; choose a new path (nothing was written)"
        )
    if format != "minari":
        return None
    dataset_id = dataset_id or out.name
    *namespace, name = dataset_id.split("/")
    if not _DATASET_ID.fullmatch(name) or not all(re.fullmatch(r"[-_\w]+", p) for p in namespace):
        raise ValueError(
            f"export-dataset: Minari dataset id {dataset_id!r} is not of the form [namespace/]<name>-v<N>; "
            f"name OUT after the id (e.g. {str(out.with_name(out.name + '-v0'))!r}) or pass --dataset-id"
        )
    if not out.resolve().as_posix().endswith("/" + dataset_id):
        raise ValueError(
            f"export-dataset: OUT {str(out)!r} must end with the dataset id {dataset_id!r} "
            f"(Minari finds a dataset at <MINARI_DATASETS_PATH>/<id>)"
        )
    return dataset_id


def export_dataset(
    source: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    *,
    env: str | None = None,
    all_rows: bool = False,
    dataset_id: str | None = None,
    chunk_rows: int | None = None,
    max_shard_size: str | int = "500MB",
    use_service: bool | None = None,
    address: str | None = None,
    task_per: str = "node",
    progress: bool = False,
) -> ExportResult:
    """Export the buffer behind ``source`` to ``out`` (see the module docstring).

    Args:
        source: a run directory, a buffer directory or a sharded buffer's directory.
        format: ``"minari"`` or ``"hf"``.
        out: the dataset directory to write (absent or empty).
        env: a gymnasium id or ``"module:callable"`` for the Minari spaces of a buffer
            without a run directory.
        all_rows: Hugging Face only: every committed row, not only whole episodes.
        dataset_id: Minari only: ``[namespace/]<name>-v<N>``; ``out`` must end with it
            (default: ``out``'s name).
        chunk_rows: rows read at a time (default: about 16 MB of them).
        max_shard_size: Hugging Face only: the largest Arrow shard (``save_to_disk``'s).
        use_service: True: export through the running replay service (Ray tasks on the
            shards' nodes); False: from disk here; None: the service when one is found.
        address: the Ray cluster to look for the service on (default ``RAY_ADDRESS``).
        task_per: with the service: one Ray task per ``"node"`` or per ``"shard"``.
        progress: draw progress bars (tqdm) on stderr when it is a terminal.

    Raises:
        ValueError: a bad format, option, ``chunk_rows`` or dataset id; spaces that do
            not fit the rows.
        FileExistsError: ``out`` is not empty. FileNotFoundError / BufferFormatError:
            ``source`` holds no buffer. ModuleNotFoundError: the format's extra is missing.
    """
    if format not in FORMATS:
        raise ValueError(f"export-dataset: format={format!r}: choose one of {', '.join(FORMATS)}")
    if all_rows and format != "hf":
        raise ValueError("export-dataset: all_rows (--all-rows) is for format 'hf'; Minari datasets hold whole episodes")
    if task_per not in ("node", "shard"):
        raise ValueError(f"export-dataset: task_per={task_per!r}: choose 'node' or 'shard'")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"export-dataset: chunk_rows={chunk_rows!r}: must be a positive int (rows read at a "
                         f"time); pass e.g. 4096, or None for about 16 MB of rows")
    out = Path(out)
    dataset_id = _check_out(out, format, dataset_id)
    src = find_source(source)
    service, why_not = (None, "") if use_service is False else find_service(src, address, required=bool(use_service))
    if service is None and not src.shards:
        raise BufferFormatError(
            f"export-dataset: no buffer at {str(src.buffer_dir)!r} on this machine, and no running replay service "
            f"for it ({why_not or 'not looked for: --from-disk'}); run the export on the machine that holds the "
            f"buffer, or pass --address (RAY_ADDRESS) of the cluster whose replay service runs it"
        )
    files = [] if service is not None else [BufferFiles.open(p) for p in src.shards]
    try:
        schema = service.schema if service is not None else _one_schema(files)
        if schema is None:
            raise ValueError(f"export-dataset: buffer {str(src.buffer_dir)!r} holds no rows; nothing to export "
                             f"(export it once the run has written rows)")
        job = _Export(src, format, out, schema, dataset_id, env, all_rows, chunk_rows, max_shard_size)
        created = not out.exists()
        t0 = time.perf_counter()
        try:
            if service is not None:
                done = run_service(service, job.spec, task_per, progress)
            else:
                done = _run_here(job, files, progress)
            job.finish(done.parts)
            return job.result(done, time.perf_counter() - t0)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True) if created else _empty(out)
            raise
        finally:
            shutil.rmtree(job.parts_dir, ignore_errors=True)
    finally:
        for f in files:
            f.close()


def _one_schema(files: list[BufferFiles]) -> dict | None:
    schema = None
    for f in files:
        if f.schema is not None and schema is not None and f.schema != schema:
            raise BufferFormatError(f"export-dataset: shards {files[0].path} and {f.path} store different keys or "
                                    f"dtypes; export each shard directory on its own")
        schema = schema or f.schema
    return schema


def _empty(path: Path) -> None:
    for p in path.iterdir() if path.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


class _Export:
    """One export's settings, checked (``export_dataset`` builds it): the parts' spec,
    building ``out`` from the parts, and the result."""

    def __init__(self, src: BufferSource, format: str, out: Path, schema: dict, dataset_id: str | None,
                 env: str | None, all_rows: bool, chunk_rows: int | None, max_shard_size: str | int) -> None:
        self.src, self.format, self.out, self.dataset_id = src, format, out, dataset_id
        self.max_shard_size = max_shard_size
        self.parts_dir = out.parent / f".{out.name}.rlfleet-parts"
        self.space_note = ""
        spaces = None
        if format == "minari":
            require("h5py")
            require("minari")
            problem = minari_schema_problem(schema)
            if problem:
                raise ValueError(f"export-dataset: cannot write Minari episodes: {problem}")
            obs, act, env_spec, self.space_note = spaces_for(src, env, schema)
            spaces = (obs, act, env_spec)
        else:
            require("pyarrow")
            hf_features(schema)  # refuses a key part holding a "."
            if not all_rows and (EPISODE_ID not in schema or STEP not in schema or DONE not in schema):
                raise ValueError("export-dataset: the buffer has no episode_id, step or next.done to find whole "
                                 "episodes by; pass --all-rows (all_rows=True) to export every row")
        self.spec = PartSpec(format=format, schema=schema, parts_dir=str(self.parts_dir), chunk_rows=chunk_rows,
                             all_rows=all_rows, spaces=spaces, description=f"rlfleet export of {src.buffer_dir}")

    def finish(self, parts: Sequence[int]) -> None:
        """Build ``out`` from the parts ``parts`` (``PartSpec.part_writer``); none: the
        Minari dataset was written into ``out`` directly."""
        if self.format == "hf":
            finish_hf([self.parts_dir / f"part-{k}.arrow" for k in parts], self.out, self.max_shard_size)
        elif parts:
            storage = self.spec.minari_storage(self.out / "data", self.dataset_id)
            finish_minari([self.parts_dir / f"part-{k}" / "data" for k in parts], storage)

    def result(self, done: ServiceRun, seconds: float) -> ExportResult:
        plan, c = done.plan, done.counts
        counts = plan.counts if plan is not None else {}
        if self.format == "minari":
            root = self.out.resolve().as_posix()[: -len(self.dataset_id) - 1]
            load = [f"MINARI_DATASETS_PATH={root} python -c \"import minari; "
                    f"print(minari.load_dataset('{self.dataset_id}'))\"",
                    f"minari.MinariDataset('{(self.out / 'data').as_posix()}')  # the same, by path"]
        else:
            load = [f"datasets.load_from_disk('{self.out.as_posix()}')"]
        return ExportResult(
            out=str(self.out), format=self.format, rows_read=c.rows_read, rows_exported=c.rows,
            episodes=c.episodes, cut=counts.get("cut"), unfinished=counts.get("unfinished"),
            inconsistent=None if plan is None else counts.get("inconsistent", 0) + c.inconsistent,
            missing=c.missing, seconds=seconds, where=done.where, evicted=c.evicted, unreadable=c.unreadable,
            spaces=self.space_note, load=load,
        )


def _run_here(job: _Export, files: list[BufferFiles], progress: bool) -> ServiceRun:
    """Both passes from disk, in this process, every shard interleaved."""
    spec = job.spec
    windows = [f.window() for f in files]
    total = sum(max(0, e - s) for s, e in windows)
    plan = None
    if not spec.all_rows:
        with progress_bar(total, "indexing episodes", "rows", progress) as bar:
            plan = EpisodePlan.build([index_shards(files, windows, bar.update)])
    if spec.format == "minari":
        job.out.mkdir(parents=True, exist_ok=True)
        writer, parts = MinariWriter(spec.minari_storage(job.out / "data", job.dataset_id)), []
    else:
        job.parts_dir.mkdir(parents=True, exist_ok=True)
        writer, parts = spec.part_writer(0), [0]
    assembler = None if plan is None else EpisodeAssembler(plan.ids, plan.lengths)
    with progress_bar(total, f"exporting to {spec.format}", "rows", progress) as bar:
        chunks = scan_shards(files, windows=windows, chunk_rows=spec.chunk_rows)
        counts: PartCounts = write_chunks(chunks, writer, assembler, bar.update)
    return ServiceRun(plan, counts, parts, f"from disk ({len(files)} shard(s), this process)")
