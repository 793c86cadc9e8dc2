"""The local memmap ``ReplayBuffer``: one shard on one disk, crash-consistent, thread-safe.

Runs in whichever process owns the directory: the driver, a test, or a ``ReplayShard``
actor. One process at a time may have a directory open for writing.

Commit protocol (the reason no reader and no reopen ever sees a torn row): the
committed window ``[start, end)`` lives as two 64-bit words in ``header.bin``.
``extend`` first moves ``start`` past every slot it is about to overwrite and stores it,
then copies the rows, then stores the new ``end``. A crash at any instant leaves only
whole rows inside the window. With ``durability="fsync"`` the data pages are msynced
before ``end`` is stored and the header after. ``sample`` snapshots the window under the
lock, copies rows without it, then re-reads ``start`` and redraws the rows that were
evicted meanwhile (their copy may be torn).

The module is longer than most here (about 740 lines) because it is one class whose
methods share one lock and one commit protocol; conversions live in ``arrays.py``, the
files in ``storage.py``, the samplers in ``samplers.py``.
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

from rlfleet.buffer.arrays import (
    OutBatches,
    arrays_to_tensordict,
    as_numpy,
    normalise_key,
    positions,
    tensordict_to_arrays,
    tune_allocator,
)
from rlfleet.buffer.errors import SchemaMismatch, StaleIndexError
from rlfleet.buffer.samplers import Sampler, make_sampler, parse_sampler_spec, slot_ranges
from rlfleet.buffer.storage import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Header,
    MemmapColumns,
    Schema,
    check_arrays,
    free_disk_bytes,
    human_bytes,
    parse_capacity,
    read_meta,
    row_bytes,
    rows_for_bytes,
    schema_from_arrays,
    schema_from_json,
    schema_to_json,
    write_meta,
)

__all__ = ["ReplayBuffer"]

logger = logging.getLogger(__name__)

DURABILITIES = ("process", "fsync")
RESERVE_AHEAD_BYTES = 64 * 2**20  # disk blocks reserved ahead of the write cursor
MAX_REDRAWS = 100

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
        schema: ``{key path: (per-row shape, numpy dtype)}``, None before the first extend.
    """

    def __init__(self, path: Path, meta: dict[str, Any], header: Header, seed: int | None) -> None:
        # private: use ReplayBuffer.create / ReplayBuffer.open
        self.path = path
        self._meta = meta
        self._header = header
        self._durability = meta["durability"]
        self._sampler: Sampler = make_sampler(meta["sampler"])
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()        # the window, sampler state, rng
        self._write_lock = threading.Lock()  # one writer at a time
        # between an extend's eviction and its commit the window is smaller than it will
        # be; a draw that fails only because of that waits for the commit
        self._shrunk = False
        self._committed = threading.Condition(self._lock)
        self._columns: MemmapColumns | None = None
        self._views: dict[tuple[str, ...], np.ndarray] = {}
        self._layout: list[tuple[tuple[str, ...], np.ndarray, tuple[int, ...], np.dtype]] = []
        self._schema: Schema | None = None
        self._capacity = int(meta["capacity"] or 0)
        start, end = header.start, header.end
        repair = start > end or end - start > max(self._capacity, 0)
        if repair:
            # a crash between the two stores of an oversized extend (see extend)
            start = end if start > end else end - self._capacity
        self._start, self._end = start, end
        self._reserved = 0
        self._limit_key: tuple[float, int] | None = None  # _priority_limit's cache
        self._limit = np.inf
        self._samples = 0
        self._inserts = 0
        self._outs = OutBatches()  # caller batches that sample(out=) fills
        self._closed = False
        if meta.get("schema") is not None:
            self._attach(schema_from_json(meta["schema"]), create=False)
        if repair:  # stored only once the files proved to match meta.json
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

        Raises:
            FileExistsError: ``path`` exists and is not an empty directory.
            ValueError: bad capacity, sampler or durability; capacity above free disk.
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(
                f"create: {path} exists and is not an empty directory; use ReplayBuffer.open "
                f"to reopen a buffer, or choose a new path"
            )
        rows, nbytes = parse_capacity(capacity)
        spec = parse_sampler_spec(sampler)
        if durability not in DURABILITIES:
            raise ValueError(f"durability={durability!r}: choose one of {', '.join(DURABILITIES)}")
        if nbytes is not None and not overcommit:
            _check_free_disk(path, nbytes, capacity)
        path.mkdir(parents=True, exist_ok=True)
        header = Header(path / "header.bin", create=True)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "capacity": rows,
            "capacity_bytes": nbytes,
            "sampler": spec,
            "durability": durability,
            "overcommit": bool(overcommit),
            "schema": None,
        }
        write_meta(path, meta)  # last: its presence is what makes the directory a buffer
        logger.info("created replay buffer %s (capacity %s, sampler %s)", path, capacity, spec["type"])
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

        Raises:
            FileNotFoundError: ``path`` does not exist.
            BufferFormatError: not an rlfleet buffer, damaged, or of a newer format.
            ValueError: a bad ``sampler``, or one the stored schema cannot serve.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"open: no buffer directory at {path}; create one with ReplayBuffer.create")
        meta = read_meta(path)
        header = Header(path / "header.bin")
        if sampler is not None:
            spec = parse_sampler_spec(sampler)
            if spec != meta["sampler"]:
                if meta.get("schema") is not None:
                    make_sampler(spec).check_schema(schema_from_json(meta["schema"]))
                if spec["type"] == "prioritized" and meta["sampler"]["type"] != "prioritized":
                    (path / "priorities.bin").unlink(missing_ok=True)  # stale if any
                meta = dict(meta, sampler=spec)
                write_meta(path, meta)
        return cls(path, meta, header, seed)

    def _attach(self, schema: Schema, *, create: bool) -> None:
        """Map the data files (creating them for the first batch) and bind the sampler."""
        capacity = self._capacity
        if capacity == 0:
            extra = 8 if self._sampler.type == "prioritized" else 0
            capacity = rows_for_bytes(self._meta["capacity_bytes"], schema, extra)
            if capacity < 1:
                raise ValueError(
                    f"extend: capacity={self._meta['capacity_bytes']} bytes holds no row of "
                    f"{row_bytes(schema)} bytes; create the buffer with a larger capacity"
                )
        if self._sampler.type == "prioritized":
            tree_bytes = 16 * (1 << max(0, (capacity - 1).bit_length()))
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if tree_bytes > ram // 2:
                raise ValueError(
                    f"capacity={capacity} rows: the prioritized sampler's sum-tree would take "
                    f"{human_bytes(tree_bytes)} of RAM (half of this machine's is "
                    f"{human_bytes(ram // 2)}); lower the capacity or use another sampler"
                )
        data_dir = self.path / "data"
        if create:
            if not self._meta["overcommit"]:
                _check_free_disk(self.path, capacity * row_bytes(schema), capacity)
            columns = MemmapColumns.create(data_dir, schema, capacity)
        else:
            columns = MemmapColumns(data_dir, schema, capacity)
        self._sampler.bind(
            self.path, capacity, self._start, self._end, create=create,
            max_priority=self._header.max_priority,
        )
        if create:
            meta = dict(self._meta, schema=schema_to_json(schema), capacity=capacity)
            write_meta(self.path, meta)  # the schema is recorded only once the files exist
            self._meta = meta
        self._capacity = capacity
        self._columns = columns
        self._views = columns.views
        self._layout = [(key, v, v.shape[1:], v.dtype) for key, v in self._views.items()]
        self._sampler.bind_columns(self._views)
        self._schema = schema
        self._reserved = min(self._capacity, self._end)

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def schema(self) -> Schema | None:
        return None if self._schema is None else dict(self._schema)

    @property
    def total_inserted(self) -> int:
        return self._end

    @property
    def sampler_type(self) -> str:
        return self._sampler.type

    @property
    def durability(self) -> str:
        return self._durability

    @property
    def priority_mass(self) -> float:
        """Sum of ``p**alpha`` over live rows (prioritized), else ``len(self)``."""
        with self._lock:
            return self._sampler.mass(self._start, self._end)

    def __len__(self) -> int:
        return self._end - self._start

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(path={str(self.path)!r}, size={len(self)}, capacity={self._capacity}, "
            f"sampler={self._sampler.type!r})"
        )

    # ------------------------------------------------------------------ writing
    def extend(self, td: TensorDictBase) -> torch.Tensor:
        """Append the rows of ``td`` (batch_size ``[N]``); return their indices, int64 ``[N]``.

        N may exceed the room left before the ring wraps. With N above the capacity only
        the newest ``capacity`` rows are kept (the returned indices still cover all N).
        With N = 0 nothing is stored and the indices are empty (a first batch of 0 rows
        still fixes the schema).
        Thread-safe. Raises ``SchemaMismatch`` (buffer unchanged) on a batch that differs
        from the schema the first batch fixed.
        """
        return torch.from_numpy(self.extend_arrays(tensordict_to_arrays(td)))

    def extend_arrays(self, arrays: Mapping[tuple[str, ...], np.ndarray]) -> np.ndarray:
        """``extend`` for flat arrays keyed by key-path tuples; returns int64 ``[N]``."""
        self._check_open()
        if not isinstance(arrays, Mapping):
            raise TypeError(f"extend_arrays: expected a dict of arrays, got {type(arrays).__name__}")
        flat = {normalise_key(k): np.asarray(v) for k, v in arrays.items()}
        with self._write_lock:
            if self._schema is None:
                if not flat:
                    raise SchemaMismatch("extend: the first batch has no keys; it fixes the schema")
                schema = schema_from_arrays(flat)
                n = check_arrays(schema, flat, "extend")
                try:
                    self._sampler.check_schema(schema)
                except ValueError as e:
                    raise SchemaMismatch(str(e)) from None
                self._attach(schema, create=True)
            else:
                n = check_arrays(self._schema, flat, "extend")
            return self._write(flat, n)

    def _write(self, arrays: dict[tuple[str, ...], np.ndarray], n: int) -> np.ndarray:
        cap, start, end = self._capacity, self._start, self._end
        last = end + n
        first = last - min(n, cap)  # with n > capacity only the newest rows land
        new_start = max(start, last - cap)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        self._reserve(min(cap, last), n)
        with self._lock:
            evict_to = min(new_start, end)
            if evict_to > start:
                self._sampler.evict(start, evict_to)
                self._header.start = evict_to  # rows leave the window before being touched
                self._start = evict_to
                self._shrunk = True
                if self._durability == "fsync":
                    self._header.sync()
        try:
            offset = first - end
            for lo, hi in slot_ranges(first, last, cap):
                self._columns.write(lo, arrays, offset, offset + hi - lo)
                offset += hi - lo
            if self._durability == "fsync":
                for lo, hi in slot_ranges(first, last, cap):
                    self._columns.sync(lo, hi - lo)
        except BaseException:
            # the evicted rows stay gone (their slots may be half-written); wake the waiters
            with self._lock:
                self._shrunk = False
                self._committed.notify_all()
            raise
        with self._lock:
            if new_start > end:
                self._header.start = new_start
                self._start = new_start
            self._sampler.commit(first, last, self._header.max_priority)
            if self._durability == "fsync":
                self._sampler.sync()
            self._header.end = last  # the commit
            self._end = last
            self._inserts += n
            if self._shrunk:
                self._shrunk = False
                self._committed.notify_all()
        if self._durability == "fsync":
            self._header.sync()
        return np.arange(end, last, dtype=np.int64)

    def _reserve(self, needed_slots: int, n: int) -> None:
        """Allocate disk blocks up to ``needed_slots`` (plus some ahead) before any write."""
        if needed_slots <= self._reserved:
            return
        per_row = max(1, row_bytes(self._schema))
        ahead = max(4 * n, RESERVE_AHEAD_BYTES // per_row)
        target = min(self._capacity, max(needed_slots, self._reserved + ahead))
        try:
            self._columns.reserve(self._reserved, target)
        except OSError:
            if target == needed_slots:
                raise
            self._columns.reserve(self._reserved, needed_slots)  # no room ahead: only what's needed
            target = needed_slots
        self._reserved = target

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, *, out: TensorDict | None = None) -> TensorDict:
        """``n`` rows as a TensorDict ``[n]`` (sequence sampler: ``[n, L]``).

        Adds ``index`` (int64 global indices) and, for the prioritized sampler,
        ``weight`` (float32 importance weights normalised by the batch max). The result
        owns its memory: later writes never change it. Thread-safe.

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
        length = self._sampler.sequence_length
        if out is None:
            return arrays_to_tensordict(self._sample(n, None, None, normalised=True),
                                        [n] if length is None else [n, length])
        self._check_open()
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"sample: n={n!r} must be a positive int")
        lead = (n,) if length is None else (n, length)
        into = self._outs.views(out, lead, lambda: self._out_layout(lead))
        self._sample(n, None, None, normalised=True, into=into)
        return out

    def _out_layout(self, lead: tuple[int, ...]) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
        """What ``sample`` returns for batch dims ``lead``: ``{key: (shape, dtype)}``."""
        layout = {key: ((*lead, *row_shape), dtype) for key, _, row_shape, dtype in self._layout}
        layout[("index",)] = (lead, np.dtype(np.int64))
        if self._sampler.type == "prioritized":
            layout[("weight",)] = (lead, np.dtype(np.float32))
        return layout

    def sample_arrays(
        self, n: int, *, total_mass: float | None = None, total_size: int | None = None
    ) -> dict[tuple[str, ...], np.ndarray]:
        """``sample`` as flat arrays (what crosses Ray), plus ``("index",)`` and, for the
        prioritized sampler, ``("weight",)``: UNnormalised float64 weights
        ``(total_size * P(i)) ** -beta`` with ``P(i) = p_i**alpha / total_mass``
        (defaults: this buffer's own mass and size). Thread-safe.

        Raises:
            ValueError: ``n`` is not a positive int, the buffer is empty, or the sampler
                cannot serve ``n`` rows (without replacement above the rows left; no
                episode segment of the sequence length).
        """
        return self._sample(n, total_mass, total_size, normalised=False)

    def _sample(self, n: int, total_mass: float | None, total_size: int | None, *,
                normalised: bool, into: dict[tuple[str, ...], np.ndarray] | None = None,
                ) -> dict[tuple[str, ...], np.ndarray]:
        """The rows, ``index`` and ``weight`` as arrays: fresh ones, or written into ``into``."""
        self._check_open()
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"sample: n={n!r} must be a positive int")
        n = int(n)
        idx, mass, size, total, drawn_start = self._draw_accepted(n)
        out = self._gather(idx, into)
        first_col = idx if idx.ndim == 1 else idx[:, 0]
        for _ in range(MAX_REDRAWS):
            with self._lock:
                start_now = self._start
            # rows drawn from [start, end) are intact unless the window start passed them
            # (the common case, a window that did not move, needs no scan of the draw)
            if start_now == drawn_start or first_col.min() >= start_now:
                break
            stale = first_col < start_now
            # rows overwritten while we copied them: their copy may be torn, redraw
            k = int(stale.sum())
            new_idx, new_mass, _, _, _ = self._draw_accepted(k)
            fresh = self._gather(new_idx)
            for key in out:
                out[key][stale] = fresh[key]
            idx[stale] = new_idx
            first_col = idx if idx.ndim == 1 else idx[:, 0]
            if mass is not None:
                mass[stale] = new_mass
        else:
            raise RuntimeError(
                f"sample: rows were overwritten faster than they could be copied "
                f"{MAX_REDRAWS} times; the buffer (capacity {self._capacity}) is too small "
                f"for its insert rate"
            )
        if into is None:
            out[("index",)] = idx
        else:
            into[("index",)][...] = idx
        if mass is not None and normalised:
            # (size * P(i)) ** -beta over its batch max is (mass_i / min mass) ** -beta
            weight = None if into is None else into[("weight",)]
            out[("weight",)] = np.power(mass.min() / mass, self._sampler.beta, dtype=np.float32, out=weight)
        elif mass is not None:
            beta = self._sampler.beta
            tm = total if total_mass is None else float(total_mass)
            ts = size if total_size is None else int(total_size)
            out[("weight",)] = np.power(ts * (mass / tm), -beta)
        with self._lock:
            self._samples += n
        return out

    def _draw(self, n: int) -> tuple[np.ndarray, np.ndarray | None, int, float, int]:
        """Indices, their sampling mass (prioritized) or None, the window's size, the
        sampler's total mass and the window start they were drawn from."""
        with self._lock:
            while True:
                start, end = self._start, self._end
                try:
                    if end <= start:
                        raise ValueError("sample: the buffer is empty; extend it before sampling")
                    idx, mass = self._sampler.draw(n, start, end, self._rng)
                    return idx, mass, end - start, self._sampler.mass(start, end), start
                except ValueError:
                    if not self._shrunk:
                        raise
                    self._committed.wait()  # the rows an extend in flight evicted come back

    def _draw_accepted(self, n: int) -> tuple[np.ndarray, np.ndarray | None, int, float, int]:
        """Draw ``n`` rows the sampler accepts after reading them (sequence boundaries).

        Samplers that reject draw a quarter more candidates than asked, so most calls
        need one round instead of a redraw round for the few rejects.
        """
        if not self._sampler.rejects:
            return self._draw(n)
        kept: list[np.ndarray] = []
        got = 0
        size, total, first_start = 0, 0.0, None
        for _ in range(MAX_REDRAWS):
            want = n - got
            idx, _, size, total, start = self._draw(want + want // 4 + 4)
            first_start = start if first_start is None else first_start
            kept.append(self._sampler.keep(idx, want, self._read_column))
            got += len(kept[-1])
            if got >= n:
                # the oldest window start of the rounds: rows it held may since be evicted
                return np.concatenate(kept)[:n], None, size, total, first_start
        raise ValueError(
            f"sample: found no valid {self._sampler.type} rows in {MAX_REDRAWS} redraws "
            f"(e.g. no episode segment of {self._sampler.sequence_length} consecutive steps); "
            f"insert longer episodes or use a shorter sequence length"
        )

    def _read_column(self, key: tuple[str, ...], idx: np.ndarray) -> np.ndarray:
        return np.take(self._views[key], idx % self._capacity, axis=0)

    def _gather(self, idx: np.ndarray, into: dict[tuple[str, ...], np.ndarray] | None = None,
                ) -> dict[tuple[str, ...], np.ndarray]:
        slots = idx % self._capacity
        lead = slots.shape
        out = {} if into is None else into
        for key, src, row_shape, dtype in self._layout:
            dst = np.empty(lead + row_shape, dtype=dtype) if into is None else into[key]
            src.take(slots, 0, dst, "clip")  # 'clip': unbuffered into out (positional: cheaper)
            if into is None:
                out[key] = dst
        return out

    # ------------------------------------------------------------------ reading by position
    def __getitem__(self, pos: int | slice | torch.Tensor | np.ndarray | list[int]) -> TensorDict:
        """Committed rows by position: 0 is the oldest live row, -1 the newest.

        An int gives a TensorDict with batch_size ``[]``; a slice, list or int tensor
        gives ``[k]``. Rows are copies. Thread-safe: waits for an ``extend`` in flight.
        """
        self._check_open()
        for _ in range(MAX_REDRAWS):
            # the write lock: positions count from a settled window, not one that an
            # in-flight extend has shrunk while it overwrites the oldest rows
            with self._write_lock, self._lock:
                start, end = self._start, self._end
            size = end - start
            pos_array, scalar = positions(pos, size)
            idx = pos_array + start
            out = self._gather(idx) if self._views else {}
            with self._lock:
                if self._start <= start:
                    break
        else:
            raise RuntimeError("getitem: rows were overwritten while being read, too many times")
        if not self._views:
            return TensorDict({}, batch_size=[] if scalar else [0])
        td = arrays_to_tensordict(out, [len(idx)])
        return td[0] if scalar else td

    # ------------------------------------------------------------------ priorities
    def update_priority(self, index: torch.Tensor | np.ndarray | list[int],
                        priority: torch.Tensor | np.ndarray | list[float]) -> None:
        """Set the priorities of live rows by global index (prioritized sampler).

        Other samplers validate the arguments and ignore them, so a learner can call it
        whatever the sampler. Thread-safe.

        Raises:
            ValueError: priorities negative, NaN, inf, so large that ``p**alpha`` summed over
                the capacity overflows, or not one per index.
            StaleIndexError: an index of a row overwritten or never written.
        """
        self._check_open()
        idx = as_numpy(index, np.int64, "index")
        prio = as_numpy(priority, np.float64, "priority")
        if idx.shape != prio.shape or idx.ndim > 1:
            raise ValueError(
                f"update_priority: {prio.size} priorities (shape {list(prio.shape)}) for "
                f"{idx.size} indices (shape {list(idx.shape)}); pass one priority per index"
            )
        if idx.ndim == 0:
            idx, prio = idx.reshape(-1), prio.reshape(-1)
        if len(idx) == 0:
            return
        limit = self._priority_limit()
        with self._lock:
            start, end = self._start, self._end
            # all or nothing: None means a bad index or priority, and nothing was stored
            top = self._sampler.update(idx, prio, start, end, limit)
            if top is not None and top > self._header.max_priority:
                self._header.max_priority = top
        if top is None:
            self._refuse_update(idx, prio, start, end, limit)

    def _refuse_update(self, idx: np.ndarray, prio: np.ndarray, start: int, end: int, limit: float) -> None:
        """Raise the error for the first bad priority, else the first bad index."""
        bad = ~np.isfinite(prio) | (prio < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"update_priority: priority[{i}]={float(prio[i])!r} is not a finite number >= 0; "
                f"priorities must be finite and non-negative"
            )
        if prio.max() > limit:
            alpha = float(getattr(self._sampler, "alpha", 0.0))
            i = int(np.argmax(prio))
            raise ValueError(
                f"update_priority: priority[{i}]={float(prio[i])!r} is above "
                f"{limit:.4g}, the largest whose p**alpha (alpha={alpha:g}) "
                f"summed over capacity={self._capacity} rows stays finite; scale the "
                f"priorities down"
            )
        i = int(np.flatnonzero((idx < start) | (idx >= end))[0])
        raise StaleIndexError(
            f"update_priority: index[{i}]={int(idx[i])} is not a live row (live indices "
            f"are [{start}, {end})); it was overwritten or never written"
        )

    def _priority_limit(self) -> float:
        """The largest priority whose ``p**alpha``, summed over every slot, stays finite
        (sampling would draw NaN weights past it); inf for samplers without priorities."""
        alpha = float(getattr(self._sampler, "alpha", 0.0))
        key = (alpha, self._capacity)
        if self._limit_key != key:
            limit = np.inf
            if alpha > 0:
                log_limit = (np.log(np.finfo(np.float64).max) - np.log(4.0 * max(self._capacity, 1))) / alpha
                limit = float(np.exp(log_limit)) if log_limit < 709.0 else np.inf
            self._limit_key, self._limit = key, limit
        return self._limit

    # ------------------------------------------------------------------ misc
    def stats(self) -> dict[str, float | int]:
        """Counters for monitoring. Thread-safe."""
        with self._lock:
            start, end = self._start, self._end
            mass = self._sampler.mass(start, end)
            samples, inserts = self._samples, self._inserts
        return {
            "size": end - start,
            "capacity": self._capacity,
            "total_inserted": end,
            "inserts": inserts,
            "samples": samples,
            "bytes_on_disk": self._columns.bytes_on_disk() if self._columns else 0,
            "priority_mass": mass,
            "max_priority": self._header.max_priority if self._header else 0.0,
        }

    def flush(self) -> None:
        """msync data, priorities and header to disk (whatever the durability)."""
        self._check_open()
        with self._write_lock:
            if self._columns is not None:
                self._columns.sync_all()
            self._sampler.sync()
            self._header.sync()

    def close(self) -> None:
        """Unmap everything (msync first with ``durability="fsync"``). Idempotent."""
        if self._closed:
            return
        if self._durability == "fsync":
            self.flush()
        with self._write_lock, self._lock:
            self._closed = True
            self._sampler.close()
            if self._columns is not None:
                self._columns.close()
            self._views = {}
            self._layout = []
            self._header.close()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"buffer {self.path} is closed; reopen it with ReplayBuffer.open")

    def _set_counters_for_test(self, start: int, end: int) -> None:
        """Move an EMPTY buffer's window to ``[start, start)`` (tests of 64-bit counters)."""
        with self._write_lock, self._lock:
            if self._end != self._start or start != end:
                raise ValueError("_set_counters_for_test: only an empty window can be moved")
            self._header.start = self._header.end = start
            self._start = self._end = start
            self._reserved = self._capacity if self._columns else 0


def _check_free_disk(path: Path, nbytes: int, capacity: int | str) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = free_disk_bytes(probe)
    if nbytes > free:
        raise ValueError(
            f"capacity={capacity!r} needs {human_bytes(nbytes)} but only {human_bytes(free)} "
            f"is free at {probe}; lower the capacity, or pass overcommit=True to create sparse "
            f"files that fill as rows arrive"
        )
