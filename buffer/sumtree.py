"""A sum-tree: prefix-sum search and point updates over a fixed slot array.

The prioritized sampler keeps ``p ** alpha`` of every slot in the leaves; drawing ``n``
rows pushes ``n`` uniform numbers in ``[0, total)`` down the tree together, and an
update recomputes the ancestors of the touched leaves. Parents are always recomputed as
the sum of their children, never adjusted by a delta, so rounding error cannot
accumulate over millions of updates.

Why 16 children per node: at a million slots the cost of a batch is cache misses, not
arithmetic. A binary tree walks 20 levels, each a random read per row that misses the
cache below the top dozen levels; with 16 children (two cache lines of float64) the same
tree has five levels, and the top three stay in cache.

``find`` and ``set`` are one compiled loop each (``sumtree_kernels``, numba): a batch of
256 draws plus 256 updates at a million slots costs about 25 us, where a numpy walk, a
dozen calls per level, cost about 150.

Runs wherever the buffer lives. Not thread-safe: the buffer calls it under its lock.
"""

from __future__ import annotations

import numpy as np

from rlfleet.buffer import sumtree_kernels as kernels
from rlfleet.buffer.priorities import high_bits

__all__ = ["SumTree"]

FANOUT = 16
SHIFT = 4  # log2(FANOUT)


class SumTree:
    """Sums of non-negative float64 leaf values over ``size`` slots.

    Layout: one flat array; ``levels[0]`` holds the leaves (padded with zeros to a
    multiple of 16) and ``levels[k + 1][i]`` is the sum of ``levels[k][16 * i : 16 * i + 16]``,
    up to a root row of at most 16 nodes whose sum is the total.

    Args:
        size: number of slots (at least 1).

    Example::

        tree = SumTree(8)
        tree.set(np.array([0, 3]), np.array([1.0, 3.0]))
        tree.find(np.array([0.5, 2.0]))   # -> array([0, 3])
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"SumTree: size={size} must be at least 1")
        self.size = size
        lengths = []
        n = size
        while True:
            padded = -(-n // FANOUT) * FANOUT
            lengths.append(padded)
            if padded == FANOUT:
                break
            n = padded >> SHIFT
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._flat = np.zeros(int(self._offsets[-1]), dtype=np.float64)
        self.levels = [self._flat[lo:hi] for lo, hi in zip(self._offsets[:-1], self._offsets[1:])]
        self._total: float | None = 0.0  # cached sum of the root row; None when stale

    @property
    def total(self) -> float:
        if self._total is None:
            self._total = float(self.levels[-1].sum())
        return self._total

    def leaves(self, slots: np.ndarray) -> np.ndarray:
        """Values of ``slots`` (int64 ``[n]``)."""
        return self.levels[0].take(slots)

    def set(self, slots: np.ndarray, values: np.ndarray | float) -> None:
        """Set leaf values at arbitrary ``slots``. With duplicate slots the last value
        wins; parents stay exact because each is recomputed from its final children."""
        if len(slots) == 0:
            return
        self._total = None
        node = np.asarray(slots, dtype=np.int64)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), node.shape)
        kernels.set_points(self._flat, self._offsets, node, np.ascontiguousarray(values))

    def set_range(self, first: int, values: np.ndarray | float, count: int | None = None) -> None:
        """Set leaves ``first .. first + count - 1`` (contiguous, no wrap)."""
        if count is None:
            count = len(values)  # type: ignore[arg-type]
        if count <= 0:
            return
        self._total = None
        lo, hi = first, first + count
        self.levels[0][lo:hi] = values
        self._refresh(lo, hi)

    def rebuild(self, leaf_values: np.ndarray) -> None:
        """Replace every leaf (``[size]``) and recompute all parents."""
        self._total = None
        self.levels[0][:] = 0.0
        self.levels[0][: self.size] = leaf_values
        self._refresh(0, self.size)

    def _refresh(self, lo: int, hi: int) -> None:
        kernels.refresh_range(self._flat, self._offsets, lo, hi)

    def draw_rows(self, uniform: np.ndarray, end: int, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The sampler's draw: ``draw(uniform * total)`` with each slot mapped to the live
        global row index that occupies it (``end`` is the window's end). Returns the
        indices, the leaf values and how many leaves are empty (only rounding makes one)."""
        index = np.empty(len(uniform), dtype=np.int64)
        leaf = np.empty(len(uniform), dtype=np.float64)
        empty = kernels.draw_rows(self._flat, self._offsets, self.size, uniform, self.total,
                                  end, capacity, index, leaf)
        return index, leaf, empty

    def update_rows(self, priorities: np.ndarray, index: np.ndarray, priority: np.ndarray,
                    alpha: float, tag: int, start: int, end: int, limit: float) -> tuple[float, int] | None:
        """The sampler's update: for each tagged ``index`` (``indices``) whose row is live
        (counter in ``[start, end)``), ``priorities[slot] = priority`` and the leaf
        ``priority ** alpha`` (slot ``counter % len(priorities)``); rows overwritten since
        they were sampled (counter below ``start``) are skipped. Returns the largest
        stored priority (0.0 when none) and how many were skipped, or None with nothing
        changed when the update must be refused whole (``priorities.split_update``)."""
        ok, top, total, skipped = kernels.update_rows(
            self._flat, self._offsets, priorities, index, priority, len(priorities), alpha,
            high_bits(tag), start, end, limit)
        if not ok:
            return None
        self._total = total
        return top, skipped

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Slots whose prefix-sum interval holds each value of ``mass`` (float64 ``[n]``)."""
        return self.draw(mass)[0]

    def draw(self, mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``find`` plus the leaf value of each slot found (two ``[n]`` arrays).

        Values at or past the total land on the last positive leaf; callers should check
        the returned leaves are non-zero.
        """
        u = np.array(mass, dtype=np.float64)
        slots = np.empty(len(u), dtype=np.int64)
        leaf = np.empty(len(u), dtype=np.float64)
        kernels.find(self._flat, self._offsets, self.size, u, slots, leaf)
        return slots, leaf
