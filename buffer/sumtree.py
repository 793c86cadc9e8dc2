"""A vectorized sum-tree: prefix-sum search and point updates over a fixed slot array.

The prioritized sampler keeps ``p ** alpha`` of every slot in the leaves; drawing ``n``
rows pushes ``n`` uniform numbers in ``[0, total)`` down the tree together, one numpy
step per level (20 levels for a million slots), with no Python loop per row. Parents
are always recomputed as the sum of their two children, never adjusted by a delta, so
rounding error cannot accumulate over millions of updates.

Why binary: a 16-ary layout (5 levels for a million slots) was measured here too; its
per-level prefix sums over ``[n, 16]`` blocks cost more than the 15 extra binary levels
save, for the batch sizes learners use (256).

Why the top is handled whole: each level walked per row costs a few numpy calls
whatever its size, and the top levels are tiny. So the top ``TOP_LEVELS`` levels (4096
nodes) are searched with one prefix sum and one ``searchsorted``, and ``set`` rebuilds
them with one slice operation per level instead of walking them per row.

Runs wherever the buffer lives. Not thread-safe: the buffer calls it under its lock.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SumTree"]

TOP_LEVELS = 12


class SumTree:
    """Sums of non-negative float64 leaf values over ``size`` slots.

    Layout: a heap array ``tree[1 : 2 * width]`` with the leaves at
    ``tree[width : width + size]`` (``width`` is the next power of two); the root
    ``tree[1]`` is the total.

    Example::

        tree = SumTree(8)
        tree.set(np.array([0, 3]), np.array([1.0, 3.0]))
        tree.find(np.array([0.5, 2.0]))   # -> array([0, 3])
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"SumTree: size={size} must be at least 1")
        self.size = size
        self.width = 1 << max(0, (size - 1).bit_length())
        self.depth = self.width.bit_length() - 1
        self.top = min(self.depth, TOP_LEVELS)  # the level searched and rebuilt whole
        self.tree = np.zeros(2 * self.width, dtype=np.float64)
        self._pairs = self.tree.reshape(-1, 2)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def leaves(self, slots: np.ndarray) -> np.ndarray:
        """Values of ``slots`` (int64 ``[n]``)."""
        return self.tree[self.width + slots]

    def set(self, slots: np.ndarray, values: np.ndarray | float) -> None:
        """Set leaf values at arbitrary ``slots``. With duplicate slots one value wins;
        parents stay exact because each is recomputed from its (final) children, so
        duplicate parents at a level simply store the same sum twice."""
        if len(slots) == 0:
            return
        idx = np.asarray(slots, dtype=np.int64) + self.width
        tree = self.tree
        tree[idx] = values
        pairs = self._pairs
        for _ in range(self.depth - self.top):
            idx >>= 1
            children = pairs[idx]  # row k of the [width, 2] view holds node k's children
            tree[idx] = children[:, 0] + children[:, 1]
        self._rebuild_above(1 << self.top)

    def _rebuild_above(self, lo: int) -> None:
        """Recompute every level above the one starting at node ``lo``, whole."""
        tree = self.tree
        while lo > 1:
            parent = lo >> 1
            tree[parent:lo] = tree[lo : 2 * lo : 2] + tree[lo + 1 : 2 * lo : 2]
            lo = parent

    def set_range(self, first: int, values: np.ndarray | float, count: int | None = None) -> None:
        """Set leaves ``first .. first + count - 1`` (contiguous, no wrap); one slice per level."""
        if count is None:
            count = len(values)  # type: ignore[arg-type]
        if count <= 0:
            return
        lo, hi = first + self.width, first + count + self.width
        tree = self.tree
        tree[lo:hi] = values
        for _ in range(self.depth):
            lo, hi = lo >> 1, ((hi - 1) >> 1) + 1
            tree[lo:hi] = tree[2 * lo : 2 * hi : 2] + tree[2 * lo + 1 : 2 * hi : 2]

    def rebuild(self, leaf_values: np.ndarray) -> None:
        """Replace every leaf (``[size]``) and recompute all parents, level by level."""
        tree = self.tree
        tree[:] = 0.0
        tree[self.width : self.width + self.size] = leaf_values
        self._rebuild_above(self.width)

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Slots whose prefix-sum interval holds each value of ``mass`` (float64 ``[n]``).

        Values at or past the total land on the last non-empty path; callers should
        check the returned leaves are non-zero (rounding can reach an empty leaf).
        """
        u = np.array(mass, dtype=np.float64)
        tree = self.tree
        first = 1 << self.top
        nodes = tree[first : 2 * first]
        prefix = np.cumsum(nodes)
        j = np.searchsorted(prefix, u, side="right")
        np.minimum(j, first - 1, out=j)
        u -= prefix[j] - nodes[j]
        idx = j + first
        for _ in range(self.depth - self.top):
            idx <<= 1
            left_sum = tree[idx]
            go_right = u >= left_sum
            np.subtract(u, left_sum, out=u, where=go_right)
            idx += go_right
        return np.minimum(idx - self.width, self.size - 1)
