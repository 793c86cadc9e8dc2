"""Compiled loops for the sum-tree (numba): one call per batch instead of ~10 numpy calls per level.

Every kernel works on the tree's one flat float64 array:
level ``k`` occupies ``flat[offsets[k] : offsets[k + 1]]`` (leaves first, the root row of
at most 16 nodes last), and node ``i`` of level ``k + 1`` is the sum of nodes
``16 * i .. 16 * i + 15`` of level ``k``. ``cache=True`` keeps the machine code next to
this file, so only the first process on a machine pays the compile (about a second).

Runs wherever the buffer lives. Not thread-safe: the buffer calls it under its lock.
"""

from __future__ import annotations

import numba
import numpy as np

from rlfleet.buffer.indices import COUNTER_BITS, SHARD_SHIFT

__all__ = ["draw_rows", "find", "refresh_range", "set_points", "update_rows"]

FANOUT = 16
SHIFT = 4
COUNTER_MASK = (1 << COUNTER_BITS) - 1  # a compile-time constant in the kernels


@numba.njit(cache=True, nogil=True)
def _block_sum(flat: np.ndarray, base: int) -> float:
    # four partial sums: a single chain of 16 dependent adds is what a set waits on
    a = flat[base] + flat[base + 1] + flat[base + 2] + flat[base + 3]
    b = flat[base + 4] + flat[base + 5] + flat[base + 6] + flat[base + 7]
    c = flat[base + 8] + flat[base + 9] + flat[base + 10] + flat[base + 11]
    d = flat[base + 12] + flat[base + 13] + flat[base + 14] + flat[base + 15]
    return (a + b) + (c + d)


@numba.njit(cache=True, nogil=True)
def _walk(flat: np.ndarray, offsets: np.ndarray, u: np.ndarray, node: np.ndarray) -> None:
    """Push each ``u[q]`` (consumed) from the root row down to a leaf index ``node[q]``.

    Level by level from the root row, all queries per level: the queries are
    independent, so their cache misses overlap (one query walked to the leaf before the
    next is twice as slow). Within a node the child is "how many running sums are
    <= u", counted without branches; zero children never get chosen. A value at or
    past a node's end (rounding) takes its last positive child, so a returned leaf is
    positive whenever the total is.
    """
    height = len(offsets) - 1
    n = len(u)
    node[:] = 0
    for k in range(height - 1, -1, -1):
        level = offsets[k]
        for q in range(n):
            base = level + node[q] * FANOUT
            uq = u[q]
            running = 0.0
            below = 0.0
            count = 0
            last = 0
            for c in range(FANOUT):
                v = flat[base + c]
                running += v
                passed = running <= uq
                count += passed
                below += v if passed else 0.0
                last = c if v > 0.0 else last
            if count >= FANOUT:  # rounding carried u past the end: the end of the last positive child
                node[q] = node[q] * FANOUT + last
                u[q] = flat[base + last]
            else:
                node[q] = node[q] * FANOUT + count
                u[q] = uq - below


@numba.njit(cache=True, nogil=True)
def find(flat: np.ndarray, offsets: np.ndarray, size: int, mass: np.ndarray,
         slots: np.ndarray, leaf: np.ndarray) -> None:
    """For each ``mass[q]``, write the slot whose prefix-sum interval holds it and its leaf value.

    The buffer's draw calls ``draw_rows`` (scaling and index mapping fused in); this is
    the plain search, for ``SumTree.draw``.
    """
    _walk(flat, offsets, mass.copy(), slots)
    for q in range(len(mass)):
        slot = min(slots[q], size - 1)
        slots[q] = slot
        leaf[q] = flat[offsets[0] + slot]


@numba.njit(cache=True, nogil=True)
def draw_rows(flat: np.ndarray, offsets: np.ndarray, size: int, uniform: np.ndarray, total: float,
              end: int, capacity: int, index: np.ndarray, leaf: np.ndarray) -> int:
    """``find`` for ``uniform * total``, writing the global row index that occupies each
    slot (the live index below ``end``); returns how many leaves came out empty (0
    unless rounding reached one)."""
    node = np.empty(len(uniform), dtype=np.int64)
    _walk(flat, offsets, uniform * total, node)
    newest = end - 1
    newest_slot = newest % capacity  # one division here, not one per row
    empty = 0
    for q in range(len(uniform)):
        slot = min(node[q], size - 1)
        value = flat[offsets[0] + slot]
        leaf[q] = value
        empty += value <= 0.0
        back = newest_slot - slot  # how far behind the newest row, modulo capacity
        index[q] = newest - (back if back >= 0 else back + capacity)
    return empty


@numba.njit(cache=True, nogil=True)
def set_points(flat: np.ndarray, offsets: np.ndarray, slots: np.ndarray, values: np.ndarray) -> None:
    """Set leaves ``slots[i] = values[i]`` and recompute every ancestor from its children.

    All leaves are written before any parent and each level before the next, so with
    duplicate slots the last value wins and every parent is the sum of its final children.
    """
    height = len(offsets) - 1
    for i in range(len(slots)):
        flat[offsets[0] + slots[i]] = values[i]
    for k in range(1, height):
        shift = SHIFT * k
        for i in range(len(slots)):
            node = slots[i] >> shift
            flat[offsets[k] + node] = _block_sum(flat, offsets[k - 1] + node * FANOUT)


@numba.njit(cache=True, nogil=True)
def update_rows(flat: np.ndarray, offsets: np.ndarray, priorities: np.ndarray, index: np.ndarray,
                priority: np.ndarray, capacity: int, alpha: float, high: int, start: int, end: int,
                limit: float) -> tuple[bool, float, float, int]:
    """The prioritized sampler's update in one pass over the batch: raw priority into
    ``priorities`` and ``priority ** alpha`` into the tree at slot ``counter % capacity``
    for every index whose row is live; rows overwritten since they were sampled
    (``counter < start``) are skipped and counted.

    ``index`` holds tagged indices (``indices``): each must be >= 0, carry ``high`` above
    its counter (``index >> SHARD_SHIFT``: this buffer's tag, shard 0) and a counter
    below ``end``. Returns (ok, largest stored priority, new total, skipped). Not ok,
    with nothing written, when an index breaks that or a priority is not a finite number
    in ``[0, limit]`` (the caller then finds which, for its message).
    """
    n = len(index)
    for i in range(n):
        p = priority[i]
        v = index[i]
        if not (p >= 0.0 and p < np.inf and p <= limit and v >= 0 and (v >> SHARD_SHIFT) == high
                and (v & COUNTER_MASK) < end):
            return False, 0.0, 0.0, 0
    slots = np.empty(n, dtype=np.int64)
    powered = np.empty(n, dtype=np.float64)
    top = 0.0
    stored = 0
    for i in range(n):
        counter = index[i] & COUNTER_MASK
        if counter < start:
            continue  # overwritten since it was sampled: its slot holds another row now
        slot = counter % capacity
        p = priority[i]
        slots[stored] = slot
        priorities[slot] = p
        powered[stored] = p if alpha == 1.0 else p ** alpha
        top = max(top, p)
        stored += 1
    if stored:
        set_points(flat, offsets, slots[:stored], powered[:stored])
    return True, top, _block_sum(flat, offsets[len(offsets) - 2]), n - stored


@numba.njit(cache=True, nogil=True)
def refresh_range(flat: np.ndarray, offsets: np.ndarray, lo: int, hi: int) -> None:
    """Recompute the ancestors of leaves ``lo .. hi - 1`` (after they were written)."""
    height = len(offsets) - 1
    for k in range(1, height):
        lo = lo >> SHIFT
        hi = ((hi - 1) >> SHIFT) + 1
        for node in range(lo, hi):
            flat[offsets[k] + node] = _block_sum(flat, offsets[k - 1] + node * FANOUT)
