"""On-disk layout of one replay shard: ``meta.json``, the header counters, the memmaps.

A shard directory holds::

    meta.json       what never changes per write: format version, schema, capacity,
                    sampler, durability, index tag (JSON, replaced atomically by rename)
    header.bin      eight 64-bit words: magic, format version, the committed window
                    ``[start, end)`` of row counters (``end`` is total inserted), and
                    the max priority (a float64)
    data/           a tensordict memmap directory, one ``<key>.memmap`` file per leaf,
                    created sparse at full capacity (``TensorDict.load_memmap`` opens it)
    priorities.bin  float64 ``[capacity]`` raw priorities (prioritized sampler only)

Row ``i`` lives in slot ``i % capacity``. A store of one aligned 8-byte word into the
mapped header is atomic with respect to a process crash, which is what makes a commit
cost nanoseconds; the order of those stores (see ``ReplayBuffer``) is what keeps torn
rows invisible. Format 2 is this layout with TorchRL's keys; a format 1 directory
(reward and flags at the root) opens read-only, its maps copy-on-write (``upgrade``).

Everything here runs wherever the buffer lives (driver or shard actor). Nothing here
locks: ``ReplayBuffer`` serialises writers and guards the window. The module passes 400
lines because it is the whole on-disk format in one place: the files, and the schema
and metadata they record.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from rlfleet.buffer.capacity import MAX_ROWS, human_bytes
from rlfleet.buffer.errors import BufferFormatError, SchemaMismatch
from rlfleet.buffer.meta_check import UNSAFE_KEY_CHARS, check_meta, safe_key_part

__all__ = [
    "FORMAT_VERSION",
    "Header",
    "MemmapColumns",
    "Schema",
    "check_arrays",
    "format_key",
    "read_meta",
    "row_bytes",
    "rows_for_bytes",
    "schema_from_arrays",
    "schema_from_json",
    "schema_to_json",
    "write_memmap_layout",
    "write_meta",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "rlfleet.buffer"
FORMAT_VERSION = 2  # 1: reward and flags at the root, read-only here (see ``upgrade``)
HEADER_MAGIC = 0x524C464C45455431  # "RLFLEET1"
RESERVE_AHEAD_BYTES = 64 * 2**20  # disk blocks reserved ahead of the write cursor
HEADER_WORDS = 8
H_MAGIC, H_VERSION, H_START, H_END, H_MAX_PRIORITY = 0, 1, 2, 3, 4

# key path -> (per-row shape, numpy dtype)
Schema = dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]

def format_key(key: tuple[str, ...]) -> str:
    """``("next", "observation")`` -> ``'next.observation'`` for messages."""
    return ".".join(key)


def _numpy_dtype(dtype: torch.dtype | np.dtype, key: tuple[str, ...]) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        try:
            return torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError as e:
            raise SchemaMismatch(
                f"extend: key '{format_key(key)}' has dtype {dtype}, which has no numpy "
                f"equivalent; store it as float32 or a plain integer type"
            ) from e
    return np.dtype(dtype)


def schema_from_arrays(arrays: dict[tuple[str, ...], np.ndarray]) -> Schema:
    """The schema a first batch fixes: per-row shape and dtype of every leaf."""
    schema: Schema = {}
    for key, arr in arrays.items():
        if key in (("index",), ("weight",)):
            raise SchemaMismatch(
                f"extend: key '{format_key(key)}' is reserved for sample output; "
                f"rename it in the batch"
            )
        bad = next((part for part in key if not safe_key_part(part)), None)
        if bad is not None:
            raise SchemaMismatch(
                f"extend: key {format_key(key)!r} has the part {bad!r}, which cannot name a "
                f"data file; key parts must be 1-200 bytes, not '.' or '..', and hold no space, "
                f"control character or any of {UNSAFE_KEY_CHARS}: rename it in the batch"
            )
        schema[key] = (tuple(int(s) for s in arr.shape[1:]), np.dtype(arr.dtype))
    return schema


def check_arrays(schema: Schema, arrays: dict[tuple[str, ...], np.ndarray], where: str) -> int:
    """Raise ``SchemaMismatch`` unless ``arrays`` matches ``schema``; return the row count."""
    missing = [k for k in schema if k not in arrays]
    if missing:
        raise SchemaMismatch(
            f"{where}: batch lacks key '{format_key(missing[0])}' of the buffer schema "
            f"(schema keys: {sorted(format_key(k) for k in schema)})"
        )
    extra = [k for k in arrays if k not in schema]
    if extra:
        raise SchemaMismatch(
            f"{where}: batch has key '{format_key(extra[0])}' that the buffer schema lacks "
            f"(schema keys: {sorted(format_key(k) for k in schema)}); the schema is fixed "
            f"by the first batch"
        )
    n = None
    for key, (shape, dtype) in schema.items():
        arr = arrays[key]
        if arr.dtype != dtype:
            raise SchemaMismatch(
                f"{where}: key '{format_key(key)}' has dtype {arr.dtype}, buffer schema "
                f"says {dtype}"
            )
        if arr.ndim < 1 or tuple(arr.shape[1:]) != shape:
            raise SchemaMismatch(
                f"{where}: key '{format_key(key)}' has per-row shape "
                f"{list(arr.shape[1:]) if arr.ndim else 'scalar'}, buffer schema says "
                f"{list(shape)}"
            )
        if n is None:
            n = int(arr.shape[0])
        elif arr.shape[0] != n:
            raise ValueError(
                f"{where}: key '{format_key(key)}' has {arr.shape[0]} rows, other keys have "
                f"{n}; every array needs the same leading dim"
            )
    return 0 if n is None else n


def schema_to_json(schema: Schema) -> list[dict[str, Any]]:
    return [
        {"key": list(k), "shape": list(shape), "dtype": dtype.str if dtype.kind != "b" else "bool"}
        for k, (shape, dtype) in schema.items()
    ]


def schema_from_json(entries: list[dict[str, Any]]) -> Schema:
    return {
        tuple(e["key"]): (tuple(int(s) for s in e["shape"]), np.dtype(e["dtype"]))
        for e in entries
    }


def row_bytes(schema: Schema) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in schema.values())


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Replace ``meta.json`` atomically (write a temp file, fsync, rename, fsync dir)."""
    tmp = directory / "meta.json.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "meta.json")
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(directory: Path) -> dict[str, Any]:
    """Load and validate ``meta.json``; ``BufferFormatError`` when it is not ours."""
    path = directory / "meta.json"
    if path.is_symlink():
        raise BufferFormatError(
            f"open: {path} is a symbolic link; a buffer directory holds its own meta.json "
            f"(copy the buffer directory instead of linking its files)"
        )
    if not path.is_file():
        raise BufferFormatError(
            f"open: {directory} is not an rlfleet buffer (no meta.json); create one with "
            f"ReplayBuffer.create"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BufferFormatError(f"open: {path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise BufferFormatError(
            f"open: {path} is not an rlfleet buffer's meta.json (format is "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT_NAME!r})"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BufferFormatError(
            f"open: {directory} has format version {version!r}; this rlfleet reads versions "
            f"up to {FORMAT_VERSION}: upgrade rlfleet"
        )
    missing = [k for k in ("capacity", "capacity_bytes", "sampler", "durability", "schema") if k not in meta]
    if missing:
        raise BufferFormatError(f"open: {path} lacks {missing[0]!r}; the buffer directory is damaged")
    return check_meta(path, meta)


class Header:
    """The memmapped 64-byte header: magic, version, committed window, max priority.

    ``read_only`` maps it copy-on-write: stores change this process's view, never the
    file (a buffer of an older format, opened read-only). Thread-safety: plain loads and
    stores; the caller serialises writers.
    """

    def __init__(self, path: Path, *, create: bool = False, read_only: bool = False) -> None:
        self.path = path
        if create:
            with open(path, "wb") as f:
                words = np.zeros(HEADER_WORDS, dtype=np.int64)
                words[H_MAGIC] = HEADER_MAGIC
                words[H_VERSION] = FORMAT_VERSION
                words[H_MAX_PRIORITY : H_MAX_PRIORITY + 1].view(np.float64)[0] = 1.0
                f.write(words.tobytes())
                f.flush()
                os.fsync(f.fileno())
        if path.is_symlink():
            raise BufferFormatError(
                f"open: header {path} is a symbolic link; a buffer directory holds its own header"
            )
        if not path.is_file() or path.stat().st_size != HEADER_WORDS * 8:
            raise BufferFormatError(
                f"open: header {path} is missing or not {HEADER_WORDS * 8} bytes; the buffer "
                f"directory is damaged"
            )
        self._map = np.memmap(path, dtype=np.int64, mode="c" if read_only else "r+", shape=(HEADER_WORDS,))
        if int(self._map[H_MAGIC]) != HEADER_MAGIC:
            raise BufferFormatError(f"open: header {path} has a wrong magic number; damaged buffer")
        if not 1 <= self.version <= FORMAT_VERSION:
            raise BufferFormatError(
                f"open: header {path} says format version {self.version}; this rlfleet reads "
                f"versions 1..{FORMAT_VERSION}: the buffer is damaged, or newer than this rlfleet"
            )
        self._max_priority = self._map[H_MAX_PRIORITY : H_MAX_PRIORITY + 1].view(np.float64)

    @property
    def version(self) -> int:
        return int(self._map[H_VERSION])

    @version.setter
    def version(self, value: int) -> None:
        self._map[H_VERSION] = value

    @property
    def start(self) -> int:
        return int(self._map[H_START])

    @start.setter
    def start(self, value: int) -> None:
        self._map[H_START] = value  # one aligned 8-byte store

    @property
    def end(self) -> int:
        return int(self._map[H_END])

    @end.setter
    def end(self, value: int) -> None:
        self._map[H_END] = value

    @property
    def max_priority(self) -> float:
        return float(self._max_priority[0])

    @max_priority.setter
    def max_priority(self, value: float) -> None:
        self._max_priority[0] = value

    def sync(self) -> None:
        self._map.flush()

    def close(self) -> None:
        self._max_priority = None
        self._map = None


def _aligned_range(offset: int, length: int) -> tuple[int, int]:
    lo = offset - offset % mmap.PAGESIZE
    return lo, offset + length - lo


def write_memmap_layout(directory: Path, schema: Schema, capacity: int) -> None:
    """Create a tensordict memmap directory for ``schema`` at ``capacity`` rows: sparse
    ``<key>.memmap`` files plus the metadata files tensordict writes beside them (what
    ``TensorDict.load_memmap`` reads). No row data is written."""
    nested: dict[str, Any] = {}
    for key, (shape, dtype) in schema.items():
        node = nested
        for part in key[:-1]:
            node = node.setdefault(part, {})
        one = torch.from_numpy(np.zeros((1, *shape), dtype=dtype))
        node[key[-1]] = one.expand(capacity, *shape)
    TensorDict(nested, batch_size=[capacity]).memmap_like(str(directory))


class MemmapColumns:
    """The data memmaps of one shard: numpy views ``[capacity, *shape]`` per key.

    ``views`` are the writer's; ``read_views`` map the same files a second time, read-only,
    for samplers and reads by position: with ``MADV_RANDOM`` where the files exceed half
    the RAM (``_larger_than_cache``), since each random fault would otherwise read ahead
    128 KB from disk (measured: 0.05x of cold ``pread`` of the same frames); else with the
    default, whose faults map the 64 KB of cached pages around them (stacked Pong samples:
    0.55x of a numpy gather, 0.50x with MADV_RANDOM's fault per 4 KB page). The writer's
    maps keep read-ahead for their sequential overwrites. Both maps share the page cache.

    ``read_only`` maps the files copy-on-write (nothing this process does reaches them).
    Runs wherever the buffer lives. Not thread-safe by itself; ``write`` and ``gather``
    on disjoint slots may run concurrently (plain memory copies).
    """

    @staticmethod
    def data_files(data_dir: Path, schema: Schema, capacity: int) -> dict[tuple[str, ...], Path]:
        """Each key's data file, checked to exist at its full size (nothing is mapped).

        Raises:
            BufferFormatError: a file is missing or of another size.
        """
        files = {}
        for key, (shape, dtype) in schema.items():
            path = data_dir.joinpath(*key[:-1], f"{key[-1]}.memmap")
            expected = capacity * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise BufferFormatError(
                    f"open: data file {path} is missing or not {expected} bytes; the buffer "
                    f"directory is damaged"
                )
            files[key] = path
        return files

    def __init__(self, data_dir: Path, schema: Schema, capacity: int, *, read_only: bool = False) -> None:
        self.data_dir = data_dir
        self.schema = schema
        self.capacity = capacity
        self.arrays: dict[tuple[str, ...], np.memmap] = {}
        self.reserved = 0  # disk blocks of slots below this are allocated (``reserve_ahead``)
        self.files = self.data_files(data_dir, schema, capacity)
        for key, (shape, dtype) in schema.items():
            self.arrays[key] = np.memmap(self.files[key], dtype=dtype, mode="c" if read_only else "r+",
                                         shape=(capacity, *shape))
            _advise(self.arrays[key], "MADV_HUGEPAGE")
        # plain ndarray views of the maps: slicing an np.memmap runs its Python-level
        # __getitem__/__array_finalize__, which costs more than a small batch's copy
        self.views = {k: a.view(np.ndarray) for k, a in self.arrays.items()}
        read_advice = ("MADV_HUGEPAGE", "MADV_RANDOM") if _larger_than_cache(schema, capacity) else ("MADV_HUGEPAGE",)
        self.read_views = self.views if read_only else {
            key: _advise(np.memmap(self.files[key], dtype=dtype, mode="r", shape=(capacity, *shape)),
                         *read_advice).view(np.ndarray)
            for key, (shape, dtype) in schema.items()
        }
        self.row_bytes = {k: a.strides[0] for k, a in self.arrays.items()}

    @classmethod
    def create(cls, data_dir: Path, schema: Schema, capacity: int) -> "MemmapColumns":
        """Create the tensordict memmap directory, sparse at full capacity."""
        if data_dir.exists():
            # left by a crash between creating the files and recording the schema
            shutil.rmtree(data_dir)
        try:
            write_memmap_layout(data_dir, schema, capacity)
        except (RuntimeError, OSError) as e:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise OSError(
                errno.EFBIG,
                f"extend: cannot create sparse data files of {capacity} rows "
                f"({human_bytes(capacity * row_bytes(schema))}) in {data_dir}: {e}; the "
                f"filesystem limits file sizes: lower the capacity",
            ) from e
        return cls(data_dir, schema, capacity)

    def reserve_ahead(self, needed: int, batch: int) -> None:
        """Reserve disk blocks from slot ``self.reserved`` (all below are reserved) up to
        slot ``needed``, plus room ahead (``RESERVE_AHEAD_BYTES`` of rows, at least 4
        batches of ``batch`` rows) when the disk has it.

        Raises:
            OSError: the disk cannot supply the blocks up to ``needed``.
        """
        reserved = self.reserved
        if needed <= reserved:
            return
        ahead = max(4 * batch, RESERVE_AHEAD_BYTES // max(1, row_bytes(self.schema)))
        target = min(self.capacity, max(needed, reserved + ahead))
        try:
            self.reserve(reserved, target)
        except OSError:
            if target == needed:
                raise
            self.reserve(reserved, needed)  # no room ahead: only what is needed
            target = needed
        self.reserved = target

    def reserve(self, first_slot: int, end_slot: int) -> None:
        """Allocate disk blocks for slots ``[first_slot, end_slot)`` of every file.

        Raises:
            OSError: the disk cannot supply them; names the file and the bytes needed.
        """
        for key, path in self.files.items():
            rb = self.row_bytes[key]
            offset, length = first_slot * rb, (end_slot - first_slot) * rb
            if length <= 0:
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, offset, length)
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"extend: cannot reserve {length} bytes on disk for {path} (rows "
                    f"{first_slot}..{end_slot - 1}): {os.strerror(e.errno or errno.EIO)}; free "
                    f"disk space or create the buffer with a smaller capacity",
                    str(path),
                ) from e
            finally:
                os.close(fd)

    def write(self, slot: int, arrays: dict[tuple[str, ...], np.ndarray], lo: int, hi: int) -> None:
        """Copy rows ``arrays[k][lo:hi]`` into slots ``slot..slot+hi-lo`` (no wrap)."""
        for key, dst in self.views.items():
            dst[slot : slot + hi - lo] = arrays[key][lo:hi]

    def sync(self, slot: int, count: int) -> None:
        """msync the byte ranges of slots ``[slot, slot+count)`` of every file."""
        for key, arr in self.arrays.items():
            rb = self.row_bytes[key]
            mm = arr._mmap  # numpy keeps the mmap object; msync just the written pages
            if mm is None:
                continue
            lo, length = _aligned_range(slot * rb + arr.offset, count * rb)
            if length > 0:
                mm.flush(lo, length)

    def sync_all(self) -> None:
        for arr in self.arrays.values():
            arr.flush()

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_blocks * 512 for p in self.files.values())

    def close(self) -> None:
        self.arrays = {}
        self.views = {}
        self.read_views = {}


def _larger_than_cache(schema: Schema, capacity: int) -> bool:
    """Whether a shard's data files exceed half this machine's RAM: then its random reads
    mostly miss the page cache and go to disk (``MemmapColumns``)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (not POSIX): assume large
        return True
    return capacity * row_bytes(schema) > ram // 2


def _advise(array: np.memmap, *advices: str) -> np.memmap:
    """Give the kernel hints (``mmap.MADV_*`` names) about this map; returns it.

    ``MADV_HUGEPAGE``: back the map with 2 MB pages where it can (Linux with transparent
    huge pages, a filesystem with large folios: ext4 and xfs on recent kernels). Random
    samples from a map far larger than the TLB's reach otherwise pay a page-table walk per
    row on top of the cache miss; measured here, a 10M-row sequence sample ran about 10%
    faster. ``MADV_RANDOM``: no read-ahead around a fault (``MemmapColumns``). Only hints:
    where a kernel lacks one it is skipped."""
    mapping = getattr(array, "_mmap", None)  # numpy keeps the mmap object
    for name in advices:
        advice = getattr(mmap, name, None)
        if advice is None or mapping is None:
            continue
        try:
            mapping.madvise(advice)
        except OSError:  # e.g. a kernel without transparent huge pages
            pass
    return array


def rows_for_bytes(capacity_bytes: int, schema: Schema, extra_per_row: int = 0) -> int:
    per_row = row_bytes(schema) + extra_per_row
    return max(0, min(MAX_ROWS - 1, capacity_bytes // max(1, per_row)))
