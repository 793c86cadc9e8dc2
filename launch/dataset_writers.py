"""Writing episodes and rows into an offline dataset, through each library's own API.

- ``MinariWriter``: ``minari.dataset.minari_storage.MinariStorage.new`` (HDF5, JPEG
  encoding off: frames stay exact uint8) and ``update_episodes``, called per batch of
  episodes (about ``BATCH_BYTES``), so memory holds one batch.
- ``HfWriter``: ``datasets.arrow_writer.ArrowWriter`` (what ``Dataset.from_generator``
  writes with) streams Arrow record batches of ``dataset_layout.hf_features`` into one
  part file; ``finish_hf`` opens the parts with ``Dataset.from_file`` (memory-mapped)
  and ``save_to_disk`` writes the dataset ``datasets.load_from_disk`` reads, in shards
  of ``max_shard_size``. Per-example generators measured about 7,000 CartPole rows/s
  here, record batches millions.
- ``finish_minari`` merges Minari parts (one per Ray task of a parallel export) into
  one dataset, episode by episode.
- ``index_shards`` (pass 1) and ``write_chunks`` (pass 2: chunks through an
  ``EpisodeAssembler`` into a writer) are the two loops of an export, the same whether
  it runs here from disk or in Ray tasks (``dataset_export``, ``dataset_service``);
  ``PartSpec`` (picklable) says how to make the writer of each part, ``PartCounts``
  what one wrote. A writer that fails is aborted: ``abort`` closes it and removes the
  file it opened.

What goes into the files (fields, infos, column names) is ``rlfleet.buffer.
dataset_layout``'s, which ``ReplayBuffer.from_dataset`` reads back.

Runs in the exporting process (driver) or in a Ray task on a shard's node. A writer is
not thread-safe: one per thread.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from rlfleet.buffer.dataset_layout import DONE, EPISODE_ID, STEP, EpisodeMismatch, episode_to_minari, hf_features
from rlfleet.buffer.dataset_layout import require, rows_to_arrow
from rlfleet.buffer.episodes import INDEX_KEYS, EpisodeAssembler, EpisodeIndex
from rlfleet.buffer.scan import BufferFiles, Chunk, scan_shards

__all__ = ["BATCH_BYTES", "HfWriter", "MinariWriter", "PartCounts", "PartSpec", "finish_hf", "finish_minari",
           "index_shards", "new_minari_storage", "progress_bar", "write_chunks"]

logger = logging.getLogger(__name__)

BATCH_BYTES = 32 << 20  # episodes / rows held before they are written

Arrays = dict[tuple[str, ...], np.ndarray]


def _nbytes(rows: Arrays) -> int:
    return sum(v.nbytes for v in rows.values())


def new_minari_storage(data_path: Path, dataset_id: str, observation_space: Any, action_space: Any,
                       env_spec: Any = None, description: str | None = None) -> Any:
    """A new, empty Minari HDF5 storage at ``data_path`` (a dataset's ``data/``)."""
    require("h5py")
    minari = require("minari")
    from minari.dataset.minari_storage import MinariStorage

    kwargs: dict[str, Any] = {}
    if "jpeg_encoding" in inspect.signature(MinariStorage.new).parameters:
        kwargs["jpeg_encoding"] = False  # lossless: rows come back exactly
    data_path.parent.mkdir(parents=True, exist_ok=True)
    # absolute: Minari's size count joins a relative path to itself
    storage = MinariStorage.new(data_path.resolve(), observation_space=observation_space,
                                action_space=action_space, env_spec=env_spec, data_format="hdf5", **kwargs)
    meta = {"dataset_id": dataset_id, "minari_version": minari.__version__}
    if description:
        meta["description"] = description
    storage.update_metadata(meta)
    return storage


class MinariWriter:
    """Whole episodes into a Minari storage (``new_minari_storage``), in batches.

    Counters: ``episodes``, ``steps``, ``inconsistent`` (episodes refused because a
    row's next observation is not the following row's observation).
    """

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.episodes = 0
        self.steps = 0
        self.inconsistent = 0
        self._batch: list[Any] = []
        self._held = 0

    def add_episode(self, rows: Arrays) -> bool:
        """Queue one whole episode (``{key path: [T, ...]}``, steps 0..T-1); False when refused."""
        from minari.data_collector import EpisodeBuffer

        try:
            fields = episode_to_minari(rows)
        except EpisodeMismatch as e:
            if not self.inconsistent:  # the first says why; close() counts them all
                logger.warning("export: skipped an episode that is not one Minari episode: %s", e)
            self.inconsistent += 1
            return False
        self._batch.append(EpisodeBuffer(**fields))
        self._held += _nbytes(rows)
        self.episodes += 1
        self.steps += len(fields["rewards"])
        if self._held >= BATCH_BYTES:
            self.flush()
        return True

    def flush(self) -> None:
        if self._batch:
            self.storage.update_episodes(self._batch)
            self._batch, self._held = [], 0

    def abort(self) -> None:
        """Drop the queued episodes (a failed export; its caller removes the storage)."""
        self._batch, self._held = [], 0

    def close(self) -> None:
        self.flush()
        if not self.episodes:
            self.storage.update_episodes([])  # Minari's own call writes a valid, empty HDF5 file
        if self.inconsistent > 1:
            logger.warning("export: skipped %d episodes that are not one Minari episode each", self.inconsistent)


class HfWriter:
    """Rows into one Arrow part file of ``hf_features(schema)``, in record batches."""

    def __init__(self, path: Path, schema: Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]) -> None:
        require("pyarrow")
        require("datasets")
        from datasets.arrow_writer import ArrowWriter

        self.path = path
        self.rows = 0
        self.episodes = 0
        self.inconsistent = 0
        self._features = hf_features(schema)
        self._writer = ArrowWriter(features=self._features, path=str(path))
        self._batch: list[Arrays] = []
        self._held = 0

    def add_episode(self, rows: Arrays) -> bool:
        """Queue the rows of one whole episode, in step order."""
        self.episodes += 1
        self.add_rows(rows)
        return True

    def add_rows(self, rows: Arrays) -> None:
        """Queue rows (``{key path: [n, ...]}``)."""
        if not rows:
            return
        self._batch.append(rows)
        self._held += _nbytes(rows)
        self.rows += len(next(iter(rows.values())))
        if self._held >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        batch = self._batch[0] if len(self._batch) == 1 else {
            k: np.concatenate([b[k] for b in self._batch]) for k in self._batch[0]}
        self._writer.write_table(rows_to_arrow(batch))
        self._batch, self._held = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.finalize()
        self._writer.close()

    def abort(self) -> None:
        """Close the part file unfinished and remove it (a failed export)."""
        self._batch, self._held = [], 0
        try:
            self._writer.close()
        finally:
            self.path.unlink(missing_ok=True)


Writer = MinariWriter | HfWriter


@dataclass(frozen=True)
class PartSpec:
    """How to write the parts of one export (picklable: Ray tasks get it).

    Attributes:
        format: ``"minari"`` or ``"hf"``.
        schema: the buffer's ``{key path: (shape, dtype)}``.
        parts_dir: where part ``k`` goes (``part-<k>.arrow``, ``part-<k>/data``).
        chunk_rows: rows read at a time (None: about 16 MB).
        all_rows: every row, not only whole episodes (Hugging Face).
        spaces: Minari: ``(observation space, action space, env spec)``.
        description: Minari: the dataset's description.
    """

    format: str
    schema: dict
    parts_dir: str
    chunk_rows: int | None
    all_rows: bool
    spaces: tuple[Any, Any, Any] | None = None
    description: str | None = None

    def minari_storage(self, data_path: Path, dataset_id: str) -> Any:
        obs, act, env_spec = self.spaces
        return new_minari_storage(data_path, dataset_id, obs, act, env_spec, description=self.description)

    def part_writer(self, part: int) -> Writer:
        """The writer of part ``part`` (one per process or Ray task)."""
        parts = Path(self.parts_dir)
        if self.format == "hf":
            return HfWriter(parts / f"part-{part}.arrow", self.schema)
        return MinariWriter(self.minari_storage(parts / f"part-{part}" / "data", f"part-{part}-v0"))


@dataclass
class PartCounts:
    """What writing one part did; ``+`` adds two up.

    Attributes:
        rows_read: rows read from the buffer. rows: rows (steps) written.
        episodes: whole episodes written. missing: planned episodes whose rows never all
        arrived. inconsistent: planned episodes refused. evicted: rows a live writer
        overwrote before the scan read them. unreadable: frame-stack buffers: rows read
        whose stacks could not be rebuilt (``scan.Chunk``), left out.
    """

    rows_read: int = 0
    rows: int = 0
    episodes: int = 0
    missing: int = 0
    inconsistent: int = 0
    evicted: int = 0
    unreadable: int = 0

    def __add__(self, other: "PartCounts") -> "PartCounts":
        return PartCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def index_shards(files: Sequence[BufferFiles], windows: Sequence[tuple[int, int]],
                 on_rows: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Pass 1 over ``files`` (their ``windows``): the ``EpisodeIndex`` table of the
    episodes they hold. ``on_rows(n)`` after each chunk (rows of the window covered)."""
    index = EpisodeIndex()
    for chunk in scan_shards(files, keys=INDEX_KEYS, windows=windows, chunk_rows=1 << 16):
        index.add(chunk.arrays[EPISODE_ID], chunk.arrays[STEP], chunk.arrays[DONE])
        if on_rows is not None:
            on_rows(chunk.covered)
    return index.table()


def write_chunks(chunks: Iterable[Chunk], writer: Writer, assembler: EpisodeAssembler | None,
                 on_rows: Callable[[int], None] | None = None) -> PartCounts:
    """Pass 2: the chunks' rows into ``writer``, through ``assembler`` (whole episodes)
    or, when None, every row. Closes the writer; aborts it when anything fails.
    ``on_rows(n)`` after each chunk (rows of the window covered)."""
    counts = PartCounts()
    try:
        for chunk in chunks:
            counts.rows_read += len(chunk)
            counts.evicted += chunk.evicted
            counts.unreadable += chunk.unreadable
            if on_rows is not None:
                on_rows(chunk.covered)
            if assembler is None:
                writer.add_rows(chunk.arrays)
                continue
            for episode in assembler.feed(chunk.arrays):
                writer.add_episode(episode)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    counts.missing = assembler.finish() if assembler is not None else 0
    counts.rows = writer.steps if isinstance(writer, MinariWriter) else writer.rows
    counts.episodes = writer.episodes
    counts.inconsistent = writer.inconsistent + (assembler.inconsistent if assembler is not None else 0)
    return counts


def progress_bar(total: int, desc: str, unit: str, show: bool) -> Any:
    """A tqdm bar on stderr (``update(n)``, a context manager), drawn only when ``show``
    and stderr is a terminal (tqdm's ``disable=None``); without tqdm, none is drawn."""
    try:
        from tqdm import tqdm
    except ImportError:  # the extras that exports need all pull tqdm in
        import contextlib

        class _NoBar(contextlib.nullcontext):
            def update(self, n: int = 1) -> None:
                pass

        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, disable=None if show else True)


def finish_hf(parts: Iterable[Path], out: Path, max_shard_size: str | int) -> int:
    """Write the dataset at ``out`` from Arrow part files; returns its row count."""
    datasets = require("datasets")
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the command line draws its own
    try:
        opened = [datasets.Dataset.from_file(str(p)) for p in parts]
        dataset = opened[0] if len(opened) == 1 else datasets.concatenate_datasets(opened)
        if len(dataset):
            dataset.save_to_disk(str(out), max_shard_size=max_shard_size)
        else:  # by size, an empty dataset gets no shard at all, and load_from_disk fails on it
            dataset.save_to_disk(str(out), num_shards=1)
        return len(dataset)
    finally:
        if shown:
            datasets.enable_progress_bars()


def finish_minari(parts: Iterable[Path], storage: Any) -> None:
    """Append the episodes of Minari part datasets (their ``data/`` paths) to ``storage``,
    a batch at a time."""
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_storage import MinariStorage

    for part in parts:
        source = MinariStorage.read(str(Path(part).resolve()))
        batch, held = [], 0
        for episode in source.get_episodes(range(source.total_episodes)):
            fields = {k: episode[k] for k in ("observations", "actions", "rewards", "terminations",
                                                "truncations", "infos")}
            batch.append(EpisodeBuffer(**fields))
            held += sum(np.asarray(v).nbytes for k, v in fields.items() if k != "infos")
            if held >= BATCH_BYTES:
                storage.update_episodes(batch)
                batch, held = [], 0
        if batch:
            storage.update_episodes(batch)
