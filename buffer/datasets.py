"""Reading an offline dataset (Minari, or Hugging Face ``datasets``) back as buffer rows.

``DatasetReader.open(dataset)`` finds and opens the dataset; ``reader.chunks()`` yields
its rows a chunk at a time in rlfleet's layout (``dataset_layout`` maps the fields), so
``ReplayBuffer.from_dataset`` fills a buffer with bounded memory. Episodes keep their
``episode_id`` and ``step`` (a dataset rlfleet exported gets back every key it had), so
the sequence sampler finds the same episodes.

Where a dataset is found:

- Minari: a dataset id (``"cartpole-v0"``, resolved as ``minari.load_dataset`` resolves
  it: under ``MINARI_DATASETS_PATH``, else ``~/.minari/datasets``), a dataset directory
  (the one holding ``data/``), or its ``data/`` directory. Episodes are read one at a
  time (Minari loads an episode whole).
- Hugging Face: a directory ``Dataset.save_to_disk`` wrote (``datasets.load_from_disk``);
  read through Arrow record batches, never as Python objects.

A Hugging Face dataset's columns must be numbers or bools (lists of them) and may not
be named ``index`` or ``weight`` (the buffer's sample output): ``open`` names the
column and how to drop or rename it.

``import_dataset`` is the body of ``ReplayBuffer.from_dataset``.

Runs in the process that imports (driver, a shell via ``rlfleet import-dataset``). Not
thread-safe: one reader per thread. minari and datasets are imported only here, when
called (``dataset_layout.require``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlfleet.buffer.capacity import parse_capacity
from rlfleet.buffer.dataset_layout import FORMATS, arrow_column_to_numpy, column_key, minari_to_rows, require
from rlfleet.buffer.storage import rows_for_bytes, schema_from_arrays

if TYPE_CHECKING:
    from rlfleet.buffer.replay_buffer import ReplayBuffer

__all__ = ["DatasetReader", "detect_format", "from_dataset", "import_capacity", "import_dataset"]

RESERVED_COLUMNS = ("index", "weight")  # what a buffer's samples add

DEFAULT_CHUNK_ROWS = 4096

Arrays = dict[tuple[str, ...], np.ndarray]


def detect_format(dataset: str | os.PathLike) -> str | None:
    """``"minari"`` or ``"hf"`` from what the directory holds, or None when it tells neither."""
    path = Path(dataset)
    if (path / "data" / "metadata.json").is_file() or (path / "metadata.json").is_file():
        return "minari"
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        return "hf"
    return None


class DatasetReader:
    """An open dataset: its format, its row count, and its rows a chunk at a time."""

    def __init__(self, name: str, format: str, rows: int, source: Any) -> None:
        # private: use DatasetReader.open
        self.name = name
        self.format = format
        self.rows = rows
        self._source = source

    @classmethod
    def open(cls, dataset: str | os.PathLike, format: str | None = None) -> "DatasetReader":
        """Open ``dataset`` (see the module docstring for what it may be).

        Args:
            format: ``"minari"`` or ``"hf"``; None tells it from the directory.

        Raises:
            ValueError: an unknown ``format``, or one that cannot be told.
            FileNotFoundError: no dataset there.
            ModuleNotFoundError: the extra that reads the format is not installed.
        """
        name = os.fspath(dataset)
        if format is not None and format not in FORMATS:
            raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
        exists = Path(name).exists()
        fmt = format or (detect_format(name) if exists else "minari")
        if fmt is None:
            raise ValueError(
                f"dataset {name!r}: neither a Minari dataset (data/metadata.json) nor a Hugging Face "
                f"dataset (state.json) is there; pass format='minari' or 'hf' to say which it should be"
            )
        if fmt == "minari":
            return cls._open_minari(name, exists)
        if not exists:
            raise FileNotFoundError(f"dataset {name!r}: no such directory (a Hugging Face dataset saved with save_to_disk)")
        datasets = require("datasets")
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(
                f"dataset {name!r} holds the splits {sorted(loaded)}; pass the directory of one "
                f"split (save each split with Dataset.save_to_disk)"
            )
        _check_hf_columns(name, loaded)
        return cls(name, "hf", len(loaded), loaded)

    @classmethod
    def _open_minari(cls, name: str, exists: bool) -> "DatasetReader":
        require("h5py")
        minari = require("minari")
        path = Path(name)
        if exists:
            data = path / "data" if (path / "data" / "metadata.json").is_file() else path
            if not (data / "metadata.json").is_file():
                raise FileNotFoundError(f"dataset {name!r}: no Minari dataset there (no data/metadata.json)")
            loaded = minari.MinariDataset(str(data.resolve()))
        else:
            try:
                loaded = minari.load_dataset(name)
            except (FileNotFoundError, ValueError) as e:
                raise FileNotFoundError(
                    f"dataset {name!r}: not a directory, and no local Minari dataset of that id "
                    f"({e}); give the dataset's directory, or set MINARI_DATASETS_PATH to the "
                    f"directory that holds it"
                ) from e
        return cls(name, "minari", int(loaded.total_steps), loaded)

    def chunks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[Arrays]:
        """The rows, in order, about ``chunk_rows`` at a time (a Minari episode longer
        than that comes whole)."""
        if self.format == "hf":
            yield from self._hf_chunks(chunk_rows)
            return
        pending: list[Arrays] = []
        held = 0
        for episode in self._source.iterate_episodes():
            rows = minari_to_rows(episode, episode_id=int(episode.id))
            pending.append(rows)
            held += len(rows[("step",)])
            if held >= chunk_rows:
                yield _join(pending)
                pending, held = [], 0
        if pending:
            yield _join(pending)

    def _hf_chunks(self, chunk_rows: int) -> Iterator[Arrays]:
        for table in self._source.with_format("arrow").iter(batch_size=chunk_rows):
            n = table.num_rows
            yield {column_key(name): arrow_column_to_numpy(table.column(name), n, name)
                   for name in table.column_names}


def _check_hf_columns(name: str, dataset: Any) -> None:
    """Refuse a column the buffer cannot hold, naming it and the fix."""
    pa = require("pyarrow")
    for column in dataset.data.schema:
        fix = (f"drop it (dataset = dataset.remove_columns([{column.name!r}])) or rename it "
               f"(dataset = dataset.rename_column({column.name!r}, 'new_name')), then dataset.save_to_disk(...)")
        if column.name in RESERVED_COLUMNS:
            raise ValueError(f"dataset {name!r}: column {column.name!r} is reserved: a buffer's samples add "
                             f"{' and '.join(repr(c) for c in RESERVED_COLUMNS)}; {fix}")
        kind = column.type
        while True:
            if isinstance(kind, pa.ExtensionType):
                kind = kind.storage_type
            elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
                kind = kind.value_type
            else:
                break
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise ValueError(f"dataset {name!r}: column {column.name!r} holds {kind} values; buffers hold numbers "
                             f"and bools: drop it (dataset = dataset.remove_columns([{column.name!r}])) or "
                             f"encode it as numbers, then dataset.save_to_disk(...)")


def from_dataset(
    cls: type["ReplayBuffer"],
    dataset: str | os.PathLike,
    path: str | os.PathLike,
    *,
    capacity: int | str | None = None,
    format: str | None = None,
    truncate: bool = False,
    chunk_rows: int = 4096,
    sampler: str | Mapping[str, Any] = "uniform",
    durability: str = "process",
    overcommit: bool = False,
    seed: int | None = None,
) -> "ReplayBuffer":
    """``ReplayBuffer.from_dataset``: a new buffer at ``path`` holding the rows of an
    offline dataset, in its order.

    ``dataset``: a Minari dataset (directory, ``data/`` directory, or an id
    ``minari.load_dataset`` finds) or a Hugging Face ``save_to_disk`` directory. What
    ``rlfleet export-dataset`` wrote comes back key for key, ``episode_id`` and
    ``step`` included (this module's docstring says how others map). Rows go in
    ``chunk_rows`` at a time: memory stays bounded.

    Args:
        capacity: as ``create``'s; None: the dataset's row count.
        format: ``"minari"`` or ``"hf"``; None tells it from the directory.
        truncate: allow a capacity below the dataset's rows (the newest are kept).
        sampler, durability, overcommit, seed: as ``create``'s.

    Raises:
        ValueError: an unknown format, a bad ``chunk_rows``, a column a buffer cannot
            hold, or a capacity below the dataset's rows without ``truncate`` (nothing
            is created).
        FileNotFoundError: no dataset there. FileExistsError: ``path`` is not empty.
        ModuleNotFoundError: the format's extra (``rlfleet[minari]``, ``rlfleet[hf]``) is missing.
    """
    return import_dataset(cls.create, dataset, path, capacity=capacity, format=format, truncate=truncate,
                          chunk_rows=chunk_rows, sampler=sampler, durability=durability,
                          overcommit=overcommit, seed=seed)


def import_dataset(create: Callable[..., "ReplayBuffer"], dataset: str | os.PathLike, path: str | os.PathLike, *,
                   capacity: int | str | None, format: str | None, truncate: bool, chunk_rows: int,
                   **create_options: Any) -> "ReplayBuffer":
    """``ReplayBuffer.from_dataset``'s body: open ``dataset``, ``create(path, capacity=...,
    **create_options)`` a buffer and fill it, ``chunk_rows`` rows at a time. On failure
    it removes what it created (the directory, or its contents when ``path`` existed,
    empty, before).

    Raises:
        ValueError: a bad ``chunk_rows``, format or capacity; a column the buffer cannot hold.
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"from_dataset: chunk_rows={chunk_rows!r}: must be a positive int (rows written at "
                         f"a time); pass e.g. {DEFAULT_CHUNK_ROWS} (the default)")
    reader = DatasetReader.open(dataset, format)
    chunks = reader.chunks(chunk_rows)
    first = next(chunks, None)
    if first is None:
        raise ValueError(f"from_dataset: dataset {reader.name!r} holds no rows; nothing to import")
    capacity = import_capacity(capacity, reader.rows, first, truncate, reader.name)
    existed = Path(path).exists()
    rb = create(path, capacity=capacity, **create_options)
    try:
        rb.extend_arrays(first)
        for chunk in chunks:
            rb.extend_arrays(chunk)
        rb.flush()
    except BaseException:
        rb.close()
        if existed:  # create refused anything but an empty directory: all in it is ours
            for p in Path(path).iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return rb


def _join(episodes: list[Arrays]) -> Arrays:
    if len(episodes) == 1:
        return episodes[0]
    return {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}


def import_capacity(capacity: int | str | None, rows: int, first: Arrays, truncate: bool, name: str) -> int | str:
    """The capacity to create for a dataset of ``rows`` rows (``first``: its first chunk,
    which fixes the schema a byte capacity is counted in).

    Raises:
        ValueError: the capacity holds fewer rows than the dataset and ``truncate`` is
            False (nothing is created).
    """
    if capacity is None:
        return max(1, rows)
    count, nbytes = parse_capacity(capacity)
    if nbytes is not None:
        count = rows_for_bytes(nbytes, schema_from_arrays(first))
    if count < rows and not truncate:
        raise ValueError(
            f"from_dataset: capacity={capacity!r} holds {count} rows but dataset {name!r} has "
            f"{rows}; pass capacity >= {rows} (or None: the dataset's size), or truncate=True "
            f"(--truncate) to keep only the newest {count} rows"
        )
    return capacity
