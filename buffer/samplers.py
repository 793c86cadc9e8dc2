"""Samplers: which rows of the committed window a ``sample`` call returns.

Every sampler works on row counters (row ``i`` lives in slot ``i % capacity``; the
buffer turns counters into tagged indices on the way out and back, ``indices``) and
sees the window ``[start, end)`` the buffer hands it. The buffer calls every method
under its lock except ``keep``, which runs after the lock is released and may read
row data (the sequence sampler checks episode boundaries there). The loop that calls
them, in ``window.Window`` and ``row_reader.RowReader.draw``::

    with lock:   idx, extra = sampler.draw(n, start, end, rng)
    idx = sampler.keep(idx, n, columns)       # no lock: reads rows
    copy rows of idx                          # no lock
    with lock:   redraw rows evicted meanwhile (idx < start) or rejected

``evict`` and ``commit`` keep per-row state (priorities, epochs) in step with writes;
``update`` stores priorities (``priorities`` says what it accepts and skips).

Their options are checked in ``sampling`` (``check_sampler``). Runs wherever the buffer
lives; not thread-safe by themselves (the buffer's lock).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rlfleet.buffer.nstep import NStep
from rlfleet.buffer.priorities import split_update
from rlfleet.buffer.sequence_kernels import pick_slices
from rlfleet.buffer.sumtree import SumTree

__all__ = [
    "PrioritizedSampler",
    "Sampler",
    "SequenceSampler",
    "UniformSampler",
    "WithoutReplacementSampler",
    "make_sampler",
]

logger = logging.getLogger(__name__)

EPISODE_KEY = ("episode_id",)
STEP_KEY = ("step",)

class Sampler:
    """Base: uniform over the window with replacement. Subclasses override what differs."""

    type = "uniform"
    sequence_length: int | None = None
    rejects = False  # True when ``keep`` may turn rows down (rejection sampling)

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.capacity = 0

    def bind(self, directory: Path, capacity: int, start: int, end: int, *, create: bool,
             max_priority: float, read_only: bool = False) -> None:
        """Attach to a shard whose storage now exists (schema known). ``read_only``: never
        write a file of ``directory`` (a buffer of an older format; see ``upgrade``)."""
        self.capacity = capacity

    def bind_columns(self, views: Mapping[tuple[str, ...], np.ndarray]) -> None:
        """The shard's data columns (``[capacity, *shape]`` each) are mapped."""

    def check_schema(self, schema: Mapping[tuple[str, ...], Any]) -> None:
        """Raise ``ValueError`` if the schema lacks what this sampler reads."""
        if self.spec.get("n_step") is not None:
            NStep.check_schema(schema, self.spec["n_step"]["n"])

    def evict(self, old_start: int, new_start: int) -> None:
        """Indices ``[old_start, new_start)`` are leaving the window (about to be overwritten)."""

    def commit(self, first: int, last: int, max_priority: float) -> None:
        """Indices ``[first, last)`` are written and about to become visible."""

    def draw(self, n: int, start: int, end: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """``n`` indices in ``[start, end)`` (``[n]``, or ``[n, L]`` for sequences) and the
        sampling probability mass of each row (prioritized) or None."""
        return uniform_indices(rng, n, start, end), None

    def keep(self, idx: np.ndarray, want: int, read: Any) -> np.ndarray:
        """The drawn rows that are acceptable after reading them, in draw order (at
        least the first ``want`` of them; ``read(key, idx)`` gathers a column)."""
        return idx

    def update(self, idx: np.ndarray, priority: np.ndarray, tag: int, start: int, end: int,
               limit: float) -> tuple[float, int] | None:
        """Store new priorities (``[n]`` each, n >= 1) of tagged indices (``indices``):
        rows in the window ``[start, end)`` get theirs, rows overwritten since they were
        sampled (counter below ``start``) are skipped. Returns the largest priority
        stored (0.0 when none) and how many indices were skipped; None, with nothing
        stored, when the update must be refused whole (``priorities``). Samplers without
        priorities only check, and count what they would skip."""
        split = split_update(idx, priority, tag, start, end, limit)
        return None if split is None else (0.0, split[2])

    def mass(self, start: int, end: int) -> float:
        return float(end - start)

    def sync(self) -> None:
        """msync per-row state files (fsync durability)."""

    def close(self) -> None:
        pass


class UniformSampler(Sampler):
    type = "uniform"


class WithoutReplacementSampler(Sampler):
    """Each row at most once per epoch: an epoch is a shuffled snapshot of the window.

    When the current epoch has fewer rows left (still live) than a call asks for, a new
    epoch starts from the window at that moment; the few rows left over are skipped.
    Rows inserted during an epoch join the next one. Holds one int64 per live row.
    """

    type = "without_replacement"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self._perm = np.empty(0, dtype=np.int64)
        self._pos = 0
        self.epochs = 0

    def draw(self, n: int, start: int, end: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        if n > end - start:
            raise ValueError(
                f"sample: n={n} is above the {end - start} rows left to draw without "
                f"replacement; ask for at most {end - start} rows or wait for more inserts"
            )
        taken = self._take(n, start)
        if taken is None:
            self._perm = rng.permutation(end - start).astype(np.int64) + start
            self._pos = 0
            self.epochs += 1
            taken = self._take(n, start)
        return taken, None

    def _take(self, n: int, start: int) -> np.ndarray | None:
        chunks, got, pos = [], 0, self._pos
        while got < n and pos < len(self._perm):
            chunk = self._perm[pos : pos + (n - got)]
            pos += len(chunk)
            live = chunk[chunk >= start]  # rows evicted since the epoch began are skipped
            chunks.append(live)
            got += len(live)
        if got < n:
            return None
        self._pos = pos
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


class PrioritizedSampler(Sampler):
    """Proportional prioritized sampling: ``P(i) = p_i**alpha / sum_live p**alpha``.

    Raw priorities live in ``priorities.bin`` (float64 per slot, memmapped); the sum-tree
    of ``p**alpha`` is rebuilt from it at open. New rows enter at the max priority seen.
    """

    type = "prioritized"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.alpha = float(spec["alpha"])
        self.beta = float(spec["beta"])
        self.tree: SumTree | None = None
        self._map: np.memmap | None = None
        self.priorities: np.ndarray | None = None

    def bind(self, directory: Path, capacity: int, start: int, end: int, *, create: bool,
             max_priority: float, read_only: bool = False) -> None:
        super().bind(directory, capacity, start, end, create=create, max_priority=max_priority)
        path = directory / "priorities.bin"
        fresh = create or not path.exists()
        if fresh and read_only:  # no file to map, none to create: priorities live in RAM
            self._map = None
            self.priorities = np.zeros(capacity, dtype=np.float64)
        else:
            if fresh:
                with open(path, "wb") as f:
                    f.truncate(capacity * 8)
            # copy-on-write when read-only: what this process changes never reaches the file
            self._map = np.memmap(path, dtype=np.float64, mode="c" if read_only else "r+", shape=(capacity,))
            self.priorities = self._map.view(np.ndarray)  # plain view: no np.memmap overhead per call
        if fresh:  # rows already stored (a buffer switched to prioritized) start at the max
            for lo, hi in slot_ranges(start, end, capacity):
                self.priorities[lo:hi] = max_priority
        self.tree = SumTree(capacity)
        leaves = np.zeros(capacity, dtype=np.float64)
        for lo, hi in slot_ranges(start, end, capacity):
            leaves[lo:hi] = self._powered(np.asarray(self.priorities[lo:hi]))
        self.tree.rebuild(leaves)

    def _powered(self, p: np.ndarray) -> np.ndarray:
        return p if self.alpha == 1.0 else np.power(p, self.alpha)

    def evict(self, old_start: int, new_start: int) -> None:
        for lo, hi in slot_ranges(old_start, new_start, self.capacity):
            self.tree.set_range(lo, 0.0, hi - lo)

    def commit(self, first: int, last: int, max_priority: float) -> None:
        value = self._powered(np.float64(max_priority))
        for lo, hi in slot_ranges(first, last, self.capacity):
            self.priorities[lo:hi] = max_priority
            self.tree.set_range(lo, value, hi - lo)

    def draw(self, n: int, start: int, end: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        tree = self.tree
        total = tree.total
        if not total > 0:
            raise ValueError(
                f"sample: every live row has priority 0 (total priority mass {total}); "
                f"give some rows a positive priority with update_priority"
            )
        idx, leaf, empty = tree.draw_rows(rng.random(n), end, self.capacity)
        for _ in range(8):  # rounding may land on an empty leaf: redraw those few
            if not empty:
                return idx, leaf
            redo = leaf <= 0
            idx[redo], leaf[redo], _ = tree.draw_rows(rng.random(empty), end, self.capacity)
            empty = int(np.count_nonzero(leaf <= 0))
        keep = leaf > 0
        pick = rng.integers(0, int(keep.sum()), size=n)
        return idx[keep][pick], leaf[keep][pick]

    def update(self, idx: np.ndarray, priority: np.ndarray, tag: int, start: int, end: int,
               limit: float) -> tuple[float, int] | None:
        if self.tree is None:  # no row written yet (the schema is not fixed): refuse
            return None
        return self.tree.update_rows(self.priorities, idx, priority, self.alpha, tag, start, end, limit)

    def mass(self, start: int, end: int) -> float:
        return self.tree.total if self.tree is not None else 0.0

    def sync(self) -> None:
        if self._map is not None:
            self._map.flush()

    def close(self) -> None:
        self._map = None
        self.priorities = None
        self.tree = None


class SequenceSampler(Sampler):
    """Slices of ``length`` consecutive rows of one episode.

    A slice ``[i, i + L)`` is accepted when every row has the same ``episode_id`` and
    ``step`` rises by exactly 1 along it. Starts are drawn uniformly from the window
    (so the cost does not depend on the buffer's size) and rejected ones redrawn; a slice
    never reaches past ``end`` (the write cursor) or before ``start`` (overwritten rows).
    The check runs compiled and prefetches every row the sample will copy
    (``sequence_kernels``).
    """

    type = "sequence"
    rejects = True

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.sequence_length = int(spec["length"])
        self._picker: tuple | None = None  # pick_slices' arguments, once the columns exist

    def bind_columns(self, views: Mapping[tuple[str, ...], np.ndarray]) -> None:
        keys = list(views)
        # every column as flat bytes, for the prefetch; the two the check reads as int64
        flat = tuple(v.reshape(len(v), -1).view(np.uint8).reshape(-1) for v in views.values())
        row_bytes = np.array([v.strides[0] for v in views.values()], dtype=np.int64)
        self._picker = (views[EPISODE_KEY], views[STEP_KEY], flat, row_bytes,
                        keys.index(EPISODE_KEY), keys.index(STEP_KEY))

    def check_schema(self, schema: Mapping[tuple[str, ...], Any]) -> None:
        super().check_schema(schema)
        for key in (EPISODE_KEY, STEP_KEY):
            if key not in schema:
                raise ValueError(
                    f"sampler 'sequence' needs key '{key[0]}' (int64 per row) in the "
                    f"batches; the buffer schema has {sorted('.'.join(k) for k in schema)}"
                )

    def draw(self, n: int, start: int, end: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        length = self.sequence_length
        if end - start < length:
            raise ValueError(
                f"sample: the buffer holds {end - start} rows, fewer than the sequence "
                f"length {length}; insert more rows first"
            )
        starts = uniform_indices(rng, n, start, end - length + 1)
        return starts[:, None] + np.arange(length, dtype=np.int64), None

    def keep(self, idx: np.ndarray, want: int, read: Any) -> np.ndarray:
        episode, step, flat, row_bytes, episode_col, step_col = self._picker
        starts = np.ascontiguousarray(idx[:, 0])
        out = np.empty(min(want, len(starts)), dtype=np.int64)
        got = pick_slices(episode, step, flat, row_bytes, episode_col, step_col, starts,
                          self.sequence_length, self.capacity, out)
        return out[:got, None] + np.arange(self.sequence_length, dtype=np.int64)

    def close(self) -> None:
        self._picker = None


def uniform_indices(rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
    """``n`` int64 indices uniform in ``[lo, hi)``.

    Scaled float draws instead of ``rng.integers``: that call costs about 8 us for a
    batch of 256 here, this one about 3. The float has 53 random bits, so the bias is
    below 2**-53 * (hi - lo), far under anything a sampling test can see. No product
    rounds up to ``hi - lo``: ``random()`` is at most ``1 - 2**-53``, and for any span
    below 2**53 the exact product ``span - span * 2**-53`` is at least half a unit in
    the last place below ``span``, so round-to-nearest keeps it below.
    """
    idx = (rng.random(n) * (hi - lo)).astype(np.int64)
    idx += lo
    return idx


def make_sampler(spec: dict[str, Any]) -> Sampler:
    return {
        "uniform": UniformSampler,
        "without_replacement": WithoutReplacementSampler,
        "prioritized": PrioritizedSampler,
        "sequence": SequenceSampler,
    }[spec["type"]](spec)


def slot_ranges(first: int, last: int, capacity: int) -> list[tuple[int, int]]:
    """The slot ranges ``[lo, hi)`` that indices ``[first, last)`` occupy (at most two)."""
    count = min(last - first, capacity)  # more than a lap covers every slot once
    if count <= 0:
        return []
    lo = (last - count) % capacity
    hi = lo + count
    if hi <= capacity:
        return [(lo, hi)]
    return [(lo, capacity), (0, hi - capacity)]
