"""The local memmap ``ReplayBuffer``: one shard on one disk, crash-consistent, thread-safe.

Runs in whichever process owns the directory: the driver, a test, or a ``ReplayShard``
actor. One process at a time may have a directory open for writing.

``extend`` commits rows by the protocol in ``window`` (rows leave the committed window
before they are overwritten and join it only once written), so no reader and no reopen
ever sees a torn row. ``sample`` snapshots the window under the lock, copies rows
without it, then re-reads the window start and redraws the rows evicted meanwhile
(``row_reader``). Every index carries this buffer's tag (``indices``); a format 1
directory opens read-only (``upgrade``). Also see ``priorities``, ``directory`` (create,
open), ``datasets`` (from_dataset), ``storage`` (the files), ``arrays``, ``samplers``.

The module passes 400 lines because it is the one public class, whose methods share
one lock and the commit protocol; their docstrings are the buffer's API reference.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from rlfleet.buffer.arrays import OutBatches, arrays_to_tensordict, normalise_key, positions, tensordict_to_arrays
from rlfleet.buffer.arrays import tune_allocator
from rlfleet.buffer.capacity import human_bytes
from rlfleet.buffer.datasets import from_dataset
from rlfleet.buffer.directory import create_directory, map_files, open_directory
from rlfleet.buffer.errors import SchemaMismatch
from rlfleet.buffer.frames import FrameStack
from rlfleet.buffer.indices import with_tag
from rlfleet.buffer.priorities import apply_update, parse_update, priority_limit
from rlfleet.buffer.row_reader import RowReader
from rlfleet.buffer.samplers import Sampler, make_sampler
from rlfleet.buffer.storage import FORMAT_VERSION, Header, MemmapColumns, Schema, check_arrays
from rlfleet.buffer.storage import schema_from_arrays, schema_from_json
from rlfleet.buffer.upgrade import format1_error
from rlfleet.buffer.window import Window, settled_window

__all__ = ["ReplayBuffer"]

logger = logging.getLogger(__name__)


class ReplayBuffer:
    """A ring of rows in memmap files, sampled by one of four samplers.

    Runs in the process that owns the directory (driver, test, or shard actor).
    Thread-safe: ``extend`` (one writer at a time) and ``sample`` may run concurrently;
    sampling copies rows without holding the lock and never returns a torn row.

    Example::

        rb = ReplayBuffer.create(path, capacity=1_000_000, sampler="uniform")
        rb.extend(td)                 # td: TensorDict [N]; returns int64 indices [N]
        batch = rb.sample(256)        # TensorDict [256] with batch["index"]
        rb.close()
        rb = ReplayBuffer.open(path)  # same contents

    Attributes:
        capacity: rows the ring holds. For a capacity given in bytes it is 0 until the
            first ``extend`` fixes the schema (then ``capacity_bytes // bytes per row``).
        capacity_bytes: the byte capacity it was created with, or None for a row count.
        schema: ``{key path: (per-row shape, numpy dtype)}``, None before the first extend.
    """

    def __init__(self, path: Path, meta: dict[str, Any], header: Header, seed: int | None) -> None:
        # private: use ReplayBuffer.create / ReplayBuffer.open
        self.path = path
        self._meta = meta
        self._header = header
        # format 1: read-only, every map copy-on-write (nothing reaches the files)
        self._read_only = meta["format_version"] < FORMAT_VERSION
        self._tag = int(meta.get("index_tag", 0))  # format 1 has none: its indices carry 0
        self._tag_bits = int(with_tag(np.int64(0), self._tag))
        self._durability = meta["durability"]
        self._sampler: Sampler = make_sampler(meta["sampler"])
        self._write_lock = threading.Lock()  # one writer at a time
        self._columns: MemmapColumns | None = None
        self._reader: RowReader | None = None  # once the data files are mapped
        self._schema: Schema | None = None
        self._capacity = int(meta["capacity"] or 0)
        start, end = settled_window(header.start, header.end, self._capacity)
        repair = start != header.start
        self._window = Window(header, self._sampler, start, end, seed)
        self._outs = OutBatches()  # caller batches that sample(out=) fills
        self._closed = False
        if meta.get("schema") is not None:
            self._attach(schema_from_json(meta["schema"]), create=False)
        if repair:  # stored only once the files proved to match meta.json (format 1: in RAM)
            header.start = start
        tune_allocator()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        capacity: int | str,
        sampler: str | Mapping[str, Any] = "uniform",
        durability: str = "process",
        overcommit: bool = False,
        seed: int | None = None,
        frame_stack: str | Mapping[str, Any] | None = None,
    ) -> "ReplayBuffer":
        """Create an empty buffer directory at ``path`` (which must be absent or empty).

        Args:
            capacity: rows (``1_000_000``) or bytes of row data (``"500GB"``, ``"2TiB"``).
                A byte capacity becomes a row count when the first ``extend`` fixes the
                schema. Data files are created sparse at full capacity.
            sampler: ``"uniform"``, ``"without_replacement"``, ``"prioritized"``,
                ``"sequence"``, or a mapping such as ``{"type": "prioritized", "alpha":
                0.6, "beta": 0.4}`` / ``{"type": "sequence", "length": 8}``.
            durability: ``"process"`` (a killed process loses nothing committed) or
                ``"fsync"`` (also survives a machine crash; msync per extend).
            overcommit: allow a capacity above the free disk space (files stay sparse and
                blocks are reserved as rows arrive).
            seed: seeds the sampler's random generator.
            frame_stack: ``"observation"`` or ``{"key": "observation", "padding": "reset"}``
                (or ``"zero"``, as ``FrameStackObservation``'s ``padding_type``) when that
                key and its ``next`` twin are frame stacks ``[k, *frame]``: each frame is
                stored once and the stacks rebuilt wherever rows are read (``frames``: the
                rows it needs; one reset row per episode, which ``len`` counts).

        Raises:
            FileExistsError: ``path`` exists and is not an empty directory.
            ValueError: bad capacity, sampler, durability or frame_stack; capacity above
                free disk.
        """
        path = Path(path)
        meta, header = create_directory(path, capacity, sampler, durability, overcommit, frame_stack)
        logger.info("created replay buffer %s (capacity %s, sampler %s)", path, capacity, meta["sampler"]["type"])
        return cls(path, meta, header, seed)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        seed: int | None = None,
        sampler: str | Mapping[str, Any] | None = None,
    ) -> "ReplayBuffer":
        """Reopen a buffer directory with the contents, sampler and priorities it had.

        Args:
            seed: seeds the sampler's random generator.
            sampler: optionally switch to another sampler (same forms as ``create``); the
                choice is stored in ``meta.json``. Switching to ``"prioritized"`` starts
                every live row at the max priority.

        A directory of format 1 (reward and flags at the root) opens read-only: it
        samples and reads exactly what is stored, while ``extend`` and
        ``update_priority`` raise ``BufferFormatError`` until ``rlfleet check --upgrade``
        migrates it.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            BufferFormatError: not an rlfleet buffer, damaged, of a newer format, or of
                format 1 and asked to switch its sampler.
            ValueError: a bad ``sampler``, or one the stored schema cannot serve.
        """
        path = Path(path)
        meta, header = open_directory(path, sampler)
        return cls(path, meta, header, seed)

    # a new buffer holding an offline dataset's rows (Minari, Hugging Face ``datasets``):
    # a classmethod documented where it lives, ``rlfleet.buffer.datasets.from_dataset``
    from_dataset = classmethod(from_dataset)

    def _attach(self, stored: Schema, *, create: bool) -> None:
        """Map the data files of the ``stored`` schema (creating them for the first batch)
        and bind the sampler."""
        window = self._window
        self._meta, columns = map_files(self.path, self._meta, stored, self._sampler, window.start, window.end,
                                        self._header.max_priority, create=create, read_only=self._read_only)
        self._capacity = columns.capacity
        self._columns = columns
        frames = self._meta.get("frame_stack")
        self._reader = RowReader(window, columns.read_views, columns.capacity, self._tag,
                                 beta=getattr(self._sampler, "beta", None),
                                 n_step=self._sampler.spec.get("n_step"), frame_stack=frames)
        self._schema = stored if frames is None else FrameStack.logical_schema(frames, stored)
        columns.reserved = min(self._capacity, window.end)

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def capacity_bytes(self) -> int | None:
        return self._meta.get("capacity_bytes")

    @property
    def schema(self) -> Schema | None:
        return None if self._schema is None else dict(self._schema)

    @property
    def total_inserted(self) -> int:
        return self._window.end

    @property
    def index_tag(self) -> int:
        """The 12-bit tag every index of this buffer carries (``indices``); drawn at create."""
        return self._tag

    @property
    def format_version(self) -> int:
        """The directory's format: 2, or 1 for a read-only buffer of the old layout."""
        return int(self._meta["format_version"])

    @property
    def frame_stack(self) -> dict[str, Any] | None:
        """``{"key", "padding", "size"}`` of a buffer that stores each frame once, else None."""
        frames = self._meta.get("frame_stack")
        return None if frames is None else dict(frames)

    @property
    def sampler_type(self) -> str:
        return self._sampler.type

    @property
    def sampler(self) -> dict[str, Any]:
        """The sampler's settings, as ``sampling.check_sampler`` gives them."""
        return dict(self._sampler.spec)

    @property
    def durability(self) -> str:
        return self._durability

    @property
    def priority_limit(self) -> float:
        """The largest priority ``update_priority`` accepts (inf without priorities)."""
        return priority_limit(float(getattr(self._sampler, "alpha", 0.0)), self._capacity)

    @property
    def priority_mass(self) -> float:
        """Sum of ``p**alpha`` over live rows (prioritized), else ``len(self)``."""
        return self._window.mass()

    def __len__(self) -> int:
        start, end = self._window.bounds()
        return end - start

    def __repr__(self) -> str:
        capacity = str(self._capacity)
        if not self._capacity and self.capacity_bytes:
            capacity = f"0 (rows of {human_bytes(self.capacity_bytes)}, counted at the first extend)"
        return (
            f"ReplayBuffer(path={str(self.path)!r}, size={len(self)}, capacity={capacity}, "
            f"sampler={self._sampler.type!r})"
        )

    # ------------------------------------------------------------------ writing
    def extend(self, td: TensorDictBase) -> torch.Tensor:
        """Append the rows of ``td`` (batch_size ``[N]``); return their indices, int64 ``[N]``
        (each ``indices.with_tag(counter, index_tag)``: row counters ``total_inserted ..
        total_inserted + N - 1``).

        N may exceed the room left before the ring wraps. With N above the capacity only
        the newest ``capacity`` rows are kept (the returned indices still cover all N).
        With N = 0 nothing is stored and the indices are empty (a first batch of 0 rows
        still fixes the schema). Thread-safe.

        Raises:
            SchemaMismatch: the batch differs from the schema the first batch fixed
                (buffer unchanged).
            ValueError: the batch would take the row counter past ``indices.MAX_COUNTER``
                (buffer unchanged).
            BufferFormatError: a format 1 buffer (read-only until upgraded).
        """
        return torch.from_numpy(self.extend_arrays(tensordict_to_arrays(td)))

    def extend_arrays(self, arrays: Mapping[tuple[str, ...], np.ndarray]) -> np.ndarray:
        """``extend`` for flat arrays keyed by key-path tuples; returns int64 ``[N]``."""
        self._check_open()
        if self._read_only:
            raise format1_error("extend", self.path)
        if not isinstance(arrays, Mapping):
            raise TypeError(f"extend_arrays: expected a dict of arrays, got {type(arrays).__name__}")
        flat = {normalise_key(k): np.asarray(v) for k, v in arrays.items()}
        with self._write_lock:
            first_batch = self._schema is None
            if first_batch and not flat:
                raise SchemaMismatch("extend: the first batch has no keys; it fixes the schema")
            schema = schema_from_arrays(flat) if first_batch else self._schema
            n = check_arrays(schema, flat, "extend")
            frames_spec = self._meta.get("frame_stack")
            if frames_spec is None:
                self._window.check_room(n)
            if first_batch:
                stored = schema
                try:
                    self._sampler.check_schema(schema)
                    if frames_spec is not None:
                        stored, size = FrameStack.stored_schema(frames_spec, schema)
                        self._meta = dict(self._meta, frame_stack=dict(frames_spec, size=size))
                except ValueError as e:
                    raise SchemaMismatch(str(e)) from None
                self._attach(stored, create=True)
            if n == 0:
                return np.empty(0, dtype=np.int64)
            frames = self._reader.frames
            if frames is not None:  # each frame once: the transitions' counters, reset rows between
                return frames.append(self._window, self._columns, flat, n, self._durability == "fsync") \
                    + self._tag_bits
            first, last = self._window.append(self._columns, flat, n, self._durability == "fsync")
        # with_tag(arange(first, last)) in one op: the tag's bits lie above every counter's
        return np.arange(first + self._tag_bits, last + self._tag_bits, dtype=np.int64)

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, *, out: TensorDict | None = None) -> TensorDict:
        """``n`` rows as a TensorDict ``[n]`` (sequence sampler: ``[n, L]``).

        Adds ``index`` (int64: this buffer's indices, ``indices.with_tag(row counter,
        index_tag)``; pass them to ``update_priority`` as they are) and, for the
        prioritized sampler, ``weight`` (float32 importance weights normalised by the
        batch max: ``row_reader.importance_weights``). The result owns its memory: later
        writes never change it. Thread-safe.

        Args:
            n: rows to draw (a positive int).
            out: a batch an earlier ``sample(n)`` returned. Its tensors are overwritten in
                place and it is returned, which saves allocating and wrapping fresh
                tensors on every call (a learner that samples every step keeps one
                batch). Keys added to it are left alone; replacing one of its tensors
                makes the next call check the batch again.

        Raises:
            ValueError: as ``sample_arrays``; or ``out`` does not have this buffer's keys,
                dtypes and shapes for ``n`` rows.
        """
        n = self._check_sample_size(n)
        length = self._sampler.sequence_length
        lead = (n,) if length is None else (n, length)
        reader = self._reader
        if out is None:
            return arrays_to_tensordict(reader.sample(n), lead)
        reader.sample(n, into=self._outs.views(out, lead, lambda: reader.out_layout(lead)))
        return out

    def sample_arrays(self, n: int) -> dict[tuple[str, ...], np.ndarray]:
        """``sample`` as flat arrays keyed by key-path tuples, the same ``index`` and
        ``weight``. Thread-safe.

        Raises:
            ValueError: ``n`` is not a positive int, the buffer is empty, or the sampler
                cannot serve ``n`` rows (without replacement above the rows left; no
                episode segment of the sequence length).
        """
        return self._reader.sample(self._check_sample_size(n))

    def draw_arrays(self, n: int) -> tuple[dict[tuple[str, ...], np.ndarray], np.ndarray | None]:
        """``sample_arrays`` without ``weight``, plus each row's sampling mass ``p**alpha``
        (float64 ``[n]``; None unless prioritized): what a shard of a service returns,
        so the client weighs rows drawn from several shards as one batch. Thread-safe."""
        return self._reader.draw(self._check_sample_size(n))

    def _check_sample_size(self, n: int) -> int:
        if self._closed:
            self._check_open()  # raises
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"sample: n={n!r} must be a positive int")
        if self._reader is None:  # no schema yet: nothing was ever inserted
            raise ValueError("sample: the buffer is empty; extend it before sampling")
        return int(n)

    # ------------------------------------------------------------------ reading by position
    def __getitem__(self, pos: int | slice | torch.Tensor | np.ndarray | list[int]) -> TensorDict:
        """Committed rows by position: 0 is the oldest live row, -1 the newest.

        An int gives a TensorDict with batch_size ``[]``; a slice, list or int tensor
        gives ``[k]``. Rows are copies. Thread-safe: waits for an ``extend`` in flight.
        """
        self._check_open()
        if self._reader is None:  # nothing was ever inserted
            return TensorDict({}, batch_size=[] if positions(pos, 0)[1] else [0])
        out, rows, scalar = self._reader.at_positions(pos, self._write_lock)
        td = arrays_to_tensordict(out, [rows])
        return td[0] if scalar else td

    # ------------------------------------------------------------------ priorities
    def update_priority(self, index: torch.Tensor | np.ndarray | list[int],
                        priority: torch.Tensor | np.ndarray | list[float]) -> int:
        """Set the priorities of rows by index (``[n]`` each, as ``sample`` returned them).

        Rows still live get their new priority; rows overwritten since they were sampled
        are skipped, and the call returns how many were (0 when none). Samplers without
        priorities check the arguments the same way, store nothing and return the same
        count, so a learner can call it whatever the sampler. Counted in ``stats()``
        as ``priority_updates`` and ``priority_updates_skipped``. The priorities sit in
        the mapped ``priorities.bin``: a killed process loses none, and they are msynced
        with the next ``extend`` (``durability="fsync"``) or ``flush``. Thread-safe.

        Raises (with nothing stored):
            ValueError: priorities negative, NaN, inf, so large that ``p**alpha`` summed over
                the capacity overflows, or not one per index; indices not integers.
            StaleIndexError: a negative index, one of another buffer or of an earlier buffer
                created at this path (another tag, or shard bits set), or one of a row never
                written.
            BufferFormatError: a format 1 buffer (read-only until upgraded).
        """
        self._check_open()
        if self._read_only:
            raise format1_error("update_priority", self.path)
        alpha = float(getattr(self._sampler, "alpha", 0.0))
        return apply_update(self._window, *parse_update(index, priority), tag=self._tag,
                            alpha=alpha, capacity=self._capacity, path=self.path)

    # ------------------------------------------------------------------ misc
    def stats(self) -> dict[str, float | int]:
        """Counters for monitoring. Thread-safe.

        Keys: ``size``, ``capacity``, ``capacity_bytes`` (as the properties), ``total_inserted``,
        ``inserts`` and ``samples`` (rows, since open), ``bytes_on_disk``, ``priority_mass``, ``max_priority``,
        ``priority_updates`` (rows whose update was accepted, since open: stored by the
        prioritized sampler, checked and ignored by the others) and
        ``priority_updates_skipped`` (rows overwritten before their update, since open).
        """
        out = self._window.counts()
        return {"size": out.pop("size"), "capacity": self._capacity, "capacity_bytes": self.capacity_bytes,
                "total_inserted": out.pop("total_inserted"),
                **out, "bytes_on_disk": self._columns.bytes_on_disk() if self._columns else 0}

    def flush(self) -> None:
        """msync data, priorities and header to disk (whatever the durability): on return
        the committed rows survive a machine crash. A no-op on a format 1 buffer (opened
        read-only: nothing to write)."""
        self._check_open()
        if self._read_only:
            return
        with self._write_lock:
            if self._columns is not None:
                self._columns.sync_all()
            self._sampler.sync()
            self._header.sync()

    def close(self) -> None:
        """Unmap every file. Idempotent.

        With ``durability="fsync"`` it msyncs first (``flush``). With ``"process"`` it
        does not: the committed rows sit in the page cache, which the kernel writes back
        on its own schedule, so a process killed after (or before) ``close`` loses
        nothing committed, while a machine crash may lose rows not yet written back.
        Call ``flush`` for a durable point.
        """
        if self._closed:
            return
        if self._durability == "fsync" and not self._read_only:
            self.flush()
        with self._write_lock, self._window.lock:
            self._closed = True
            self._sampler.close()
            if self._columns is not None:
                self._columns.close()
            self._reader = None
            self._header.close()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"buffer {self.path} is closed; reopen it with ReplayBuffer.open")
