"""Reading a buffer directory's committed rows in order, oldest first, writing nothing.

``BufferFiles.open(path)`` then ``files.chunks(...)`` yields the rows of the committed
window as it was when the scan began, a chunk at a time. ``scan_shards`` interleaves the
chunks of several directories (the shards of one buffer) in step with each other.

Why not ``ReplayBuffer.open`` and ``rb[a:b]``: an open may store a repaired window and
binds the sampler (a prioritized sum-tree is built in RAM, the size of the capacity),
and a buffer's data maps count every page read into the process's resident memory.
A scan reads ``meta.json``, maps only the 64-byte header (read-only), and copies rows
with plain file reads into one chunk's arrays: the memory it holds is one chunk, and it
may run beside a live writer (a shard of a running service) without disturbing it.

Beside a live writer: the rows ``[start, end)`` of the window at the start are read;
rows the writer commits afterwards are not. The writer may overwrite the oldest rows
while the scan runs; after copying a chunk the scan re-reads the window start (the
commit protocol moves it past rows before they are overwritten: ``window``), drops the
rows it passed (their copy may be torn) and counts them as ``evicted``.

A frame-stack buffer (``frames``) yields its rows as its readers return them:
``schema`` is the logical one, and ``chunks`` rebuilds the ``observation`` stacks while
the stored rows stream by (``frame_scan``), leaving out the reset rows and, counted as
``unreadable``, the rows whose stacks cannot be rebuilt. ``read`` reads stored columns.

Runs in any process that sees the directory (driver, a Ray task on the shard's node).
A ``BufferFiles`` is not thread-safe (it owns open file handles); use one per thread.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from rlfleet.buffer.errors import BufferFormatError
from rlfleet.buffer.frame_scan import FrameScan
from rlfleet.buffer.frames import FrameStack
from rlfleet.buffer.samplers import slot_ranges
from rlfleet.buffer.storage import (
    FORMAT_VERSION,
    H_END,
    H_START,
    HEADER_WORDS,
    Header,
    MemmapColumns,
    Schema,
    read_meta,
    row_bytes,
    schema_from_json,
)
from rlfleet.buffer.upgrade import format1_error
from rlfleet.buffer.window import settled_window

__all__ = ["BufferFiles", "Chunk", "chunk_rows_for", "least_advanced_first", "scan_shards"]

CHUNK_BYTES = 16 << 20  # rows per chunk: about this many bytes, within the bounds below
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 64, 16384

T = TypeVar("T")


def chunk_rows_for(schema: Schema | None) -> int:
    """Rows per chunk for rows of ``schema``: about ``CHUNK_BYTES`` of them."""
    if not schema:
        return MAX_CHUNK_ROWS
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(1, row_bytes(schema))))


@dataclass
class Chunk:
    """The rows of stored counters ``[first, first + covered - evicted)``, some dropped
    (``evicted``; in a frame-stack buffer also ``resets`` and ``unreadable``).

    Attributes:
        arrays: ``{key path: [n, ...]}`` of the rows kept, oldest first.
        first: the row counter of the first row read for this chunk.
        evicted: rows of this chunk (and of those skipped before it) that the writer
            overwrote while the scan ran, dropped.
        done: rows of the scan's window covered so far, this chunk included.
        total: rows in the scan's window.
        source: which directory of ``scan_shards`` it came from (0 for a single scan).
        resets: frame-stack buffers: the reset rows read, left out (they are no rows of
            the buffer's, only the frame each episode starts from).
        unreadable: frame-stack buffers: the rows read whose stacks cannot be rebuilt
            (their chain reaches a row not read, or an ``UNKNOWN`` link), left out.
    """

    arrays: dict[tuple[str, ...], np.ndarray]
    first: int
    evicted: int
    done: int
    total: int
    source: int = 0
    resets: int = 0
    unreadable: int = 0

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    @property
    def covered(self) -> int:
        """Stored rows of the window this chunk accounts for: returned, evicted or left out."""
        return len(self) + self.evicted + self.resets + self.unreadable


class BufferFiles:
    """The committed rows of one buffer directory, for reading only (see the module docstring).

    Build it with :meth:`open`; close it (or use it as a context manager) when done.

    Attributes:
        schema: the rows' ``{key path: (shape, dtype)}`` (None before the first extend).
        stored_schema: the columns stored; differs from ``schema`` in a frame-stack buffer.
        frame_stack: ``meta.json``'s ``"frame_stack"`` or None.
    """

    def __init__(self, path: Path, schema: Schema | None, capacity: int, files: dict[tuple[str, ...], Path],
                 frame_stack: dict | None = None) -> None:
        # private: use BufferFiles.open
        self.path = path
        self.stored_schema = schema
        self.frame_stack = frame_stack if schema is not None else None
        self.schema = schema if self.frame_stack is None else FrameStack.logical_schema(frame_stack, schema)
        self.capacity = capacity
        self._files = files
        self._handles: dict[tuple[str, ...], io.BufferedReader] = {}
        self._header = np.memmap(path / "header.bin", dtype=np.int64, mode="r", shape=(HEADER_WORDS,))

    @classmethod
    def open(cls, path: str | Path) -> "BufferFiles":
        """Check that ``path`` holds a format 2 buffer and find its data files.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            BufferFormatError: not an rlfleet buffer, damaged, or of format 1 (upgrade it
                with ``rlfleet check --upgrade``).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such buffer directory; pass the directory "
                                    f"ReplayBuffer.create wrote (it holds meta.json)")
        meta = read_meta(path)
        if meta["format_version"] < FORMAT_VERSION:
            raise format1_error("read", path)
        Header(path / "header.bin", read_only=True).close()  # checks magic and version
        if meta["schema"] is None:
            return cls(path, None, int(meta["capacity"] or 0), {})
        schema = schema_from_json(meta["schema"])
        # sizes checked against the schema and capacity; nothing mapped: a copy-on-write
        # map of the whole buffer would count as this process's memory
        files = MemmapColumns.data_files(path / "data", schema, int(meta["capacity"]))
        return cls(path, schema, int(meta["capacity"]), files, meta.get("frame_stack"))

    def window(self) -> tuple[int, int]:
        """The committed window ``[start, end)`` of row counters, as stored now."""
        start, end = int(self._header[H_START]), int(self._header[H_END])
        return settled_window(start, end, self.capacity)

    def read(self, first: int, last: int, keys: Sequence[tuple[str, ...]] | None = None) -> dict[tuple[str, ...], np.ndarray]:
        """Stored rows of counters ``[first, last)`` (at most a capacity), fresh arrays of
        ``keys`` of ``stored_schema`` (default all). Rows the writer overwrites meanwhile
        may come back torn: ``chunks`` checks the window."""
        n = last - first
        out = {}
        for key in keys if keys is not None else self.stored_schema:
            shape, dtype = self.stored_schema[key]
            array = np.empty((n, *shape), dtype=dtype)
            row = array.itemsize * int(np.prod(shape, dtype=np.int64))
            view = memoryview(array.reshape(-1).view(np.uint8)) if n else memoryview(b"")
            handle = self._handle(key)
            done = 0
            for lo, hi in slot_ranges(first, last, self.capacity):  # at most two: the ring wraps once
                handle.seek(lo * row)
                _read_exactly(handle, view[done * row:(done + hi - lo) * row], self._files[key])
                done += hi - lo
            out[key] = array
        return out

    def chunks(self, *, chunk_rows: int | None = None, keys: Sequence[tuple[str, ...]] | None = None,
               start: int | None = None, end: int | None = None) -> Iterator[Chunk]:
        """The window's rows, oldest first, ``chunk_rows`` stored rows at a time (default:
        about 16 MB); a frame-stack buffer's rebuilt (module docstring).

        Args:
            keys: the keys of ``schema`` to read (default all).
            start, end: read counters ``[max(start, window start), end)`` instead of the
                window as it is now (another pass over a window an earlier one read).
        """
        if self.schema is None:
            return
        now_start, now_end = self.window()
        asked = now_start if start is None else start
        start = max(asked, now_start)
        end = now_end if end is None else min(end, now_end)
        total = max(0, end - start)
        rows = chunk_rows or chunk_rows_for(self.stored_schema)
        frames = None if self.frame_stack is None else FrameScan(self.frame_stack, self.stored_schema, keys)
        read_keys = keys if frames is None else frames.stored_keys
        cursor, skipped = start, max(0, min(start, end) - asked)  # gone since an earlier pass
        while cursor < end:
            last = min(cursor + rows, end)
            arrays = self.read(cursor, last, read_keys)
            first_live = self.window()[0]
            drop = min(max(first_live - cursor, 0), last - cursor)  # the writer passed them
            if drop:
                arrays = {k: v[drop:] for k, v in arrays.items()}
            resets = unreadable = 0
            if frames is not None:
                arrays, resets, unreadable = frames.feed(arrays, cursor + drop)
            yield Chunk(arrays, cursor + drop, skipped + drop, last - start, total, 0, resets, unreadable)
            skipped = max(0, min(first_live, end) - last)  # passed before we got there
            cursor = last + skipped

    def _handle(self, key: tuple[str, ...]) -> io.BufferedReader:
        handle = self._handles.get(key)
        if handle is None:
            handle = self._handles[key] = open(self._files[key], "rb", buffering=0)
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
        self._header = None

    def __enter__(self) -> "BufferFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exactly(handle: io.RawIOBase, into: memoryview, path: Path) -> None:
    got = 0
    while got < len(into):
        n = handle.readinto(into[got:])
        if not n:
            raise BufferFormatError(f"read: data file {path} ended early; the buffer directory is damaged")
        got += n


def scan_shards(files: Sequence[BufferFiles], *, chunk_rows: int | None = None,
                keys: Sequence[tuple[str, ...]] | None = None,
                windows: Sequence[tuple[int, int]] | None = None) -> Iterator[Chunk]:
    """The chunks of several directories, interleaved so that each advances through its
    window at the same pace (the least advanced, by fraction, goes next).

    The shards of one buffer fill at the same rate (``write_plan``), so rows written at
    about the same time come out at about the same time, and an episode whose rows lie in
    several shards is held open only briefly. ``Chunk.source`` says which directory.

    Args:
        windows: per directory, the ``(start, end)`` to read (see ``BufferFiles.chunks``).
    """
    streams = []
    for k, f in enumerate(files):
        start, end = windows[k] if windows is not None else (None, None)
        streams.append(f.chunks(chunk_rows=chunk_rows, keys=keys, start=start, end=end))
    for k, chunk in least_advanced_first(streams, lambda c: c.done / max(1, c.total)):
        chunk.source = k
        yield chunk


def least_advanced_first(streams: Sequence[Iterable[T]], fraction: Callable[[T], float]) -> Iterator[tuple[int, T]]:
    """``(k, item)`` from several streams, next always from the stream least far
    through (``fraction(item)``: its last item's fraction done; ties: lowest ``k``)."""
    iterators = [iter(s) for s in streams]
    progress = [0.0] * len(iterators)
    live = set(range(len(iterators)))
    while live:
        k = min(live, key=lambda i: (progress[i], i))
        item = next(iterators[k], _END)
        if item is _END:
            live.discard(k)
            continue
        progress[k] = fraction(item)
        yield k, item


_END = object()
