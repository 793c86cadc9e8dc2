"""Priority updates: what ``update_priority`` accepts, what it skips, and how it refuses.

A learner samples a batch, computes its loss, and sends new priorities for the batch's
indices. Meanwhile collectors keep inserting, so by the time the update arrives some of
those rows may have been overwritten. Such a row is not an error: its update is skipped
and counted, and the rows still live get theirs. What is refused whole, with nothing
stored, is input that is wrong whatever the timing::

    priorities   NaN, inf, negative, above ``priority_limit``, not one per index
    indices      negative, another buffer's tag or non-zero shard bits (``indices``),
                 or a counter the buffer never wrote (``counter >= end``)

The buffer's samplers make the same decision in one pass over the batch: the numba
kernel ``sumtree_kernels.update_rows`` (prioritized), ``split_update`` here otherwise.
When either says "refused", ``refuse_update`` finds the first culprit for the message;
that scan runs only on the error path.

Runs wherever the buffer lives; pure functions, thread-safe.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from rlfleet.buffer.arrays import as_numpy
from rlfleet.buffer.errors import StaleIndexError
from rlfleet.buffer.indices import SHARD_BITS, SHARD_SHIFT, counter_of, shard_of, tag_of

__all__ = ["apply_update", "check_finite", "check_non_negative", "high_bits", "parse_update", "priority_limit", "refuse_update", "split_update"]


def high_bits(tag: int) -> int:
    """What ``index >> SHARD_SHIFT`` is for every index of a local buffer with ``tag``
    (its tag, then shard 0)."""
    return tag << SHARD_BITS


def parse_update(index: Any, priority: Any) -> tuple[np.ndarray, np.ndarray]:
    """``index`` and ``priority`` as int64 and float64 arrays ``[n]``.

    Raises:
        ValueError: non-integer indices, or not one priority per index (``[n]`` each,
            ``[n]`` and ``[n, 1]`` as a TD error of format 2 rows comes, or two scalars).
    """
    idx = as_numpy(index, np.int64, "index")
    prio = as_numpy(priority, np.float64, "priority")
    if idx.ndim == 1 and prio.shape == (len(idx), 1):
        prio = prio.reshape(-1)  # a TD error shaped like ("next", "reward"): [n, 1]
    if idx.shape != prio.shape or idx.ndim > 1:
        raise ValueError(
            f"update_priority: {prio.size} priorities (shape {list(prio.shape)}) for "
            f"{idx.size} indices (shape {list(idx.shape)}); pass one priority per index"
        )
    if idx.ndim == 0:
        idx, prio = idx.reshape(-1), prio.reshape(-1)
    return idx, prio


@functools.lru_cache(maxsize=64)
def priority_limit(alpha: float, capacity: int) -> float:
    """The largest priority whose ``p**alpha``, summed over every slot, stays finite
    (sampling would draw NaN weights past it); inf when ``alpha`` is 0 (no priorities)."""
    if alpha <= 0:
        return np.inf
    log_limit = (np.log(np.finfo(np.float64).max) - np.log(4.0 * max(capacity, 1))) / alpha
    return float(np.exp(log_limit)) if log_limit < 709.0 else np.inf


def split_update(index: np.ndarray, priority: np.ndarray, tag: int, start: int, end: int,
                 limit: float) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The counters of the live rows among ``index``, their priorities, and how many
    indices were skipped (``counter < start``); None when the update must be refused
    (see the module docstring). ``[n]`` each, n >= 1; a handful of vectorised passes,
    and NaN fails every comparison."""
    top = priority.max()
    if not (priority.min() >= 0 and top < np.inf and top <= limit and index.min() >= 0):
        return None
    if not np.array_equal(index >> SHARD_SHIFT, np.broadcast_to(high_bits(tag), index.shape)):
        return None
    counter = counter_of(index)
    if counter.max() >= end:
        return None
    live = counter >= start
    skipped = len(index) - int(np.count_nonzero(live))
    if skipped:
        return counter[live], priority[live], skipped
    return counter, priority, 0


def check_finite(priority: np.ndarray) -> None:
    """Raise ``ValueError`` naming the first priority that is NaN, inf or negative."""
    bad = ~np.isfinite(priority) | (priority < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"update_priority: priority[{i}]={float(priority[i])!r} is not a finite number >= 0; "
            f"priorities must be finite and non-negative"
        )


def check_non_negative(index: np.ndarray) -> None:
    """Raise ``StaleIndexError`` naming the first negative index."""
    if (index < 0).any():
        i = int(np.flatnonzero(index < 0)[0])
        raise StaleIndexError(
            f"update_priority: index[{i}]={int(index[i])} is negative; pass the int64 indices "
            f"that this buffer's extend or sample returned, unchanged"
        )


def refuse_update(index: np.ndarray, priority: np.ndarray, *, tag: int, end: int, limit: float,
                  alpha: float, capacity: int, path: Path) -> NoReturn:
    """Raise the error for the first bad priority, else for the first bad index.

    Raises:
        ValueError: a priority that is not a finite number >= 0, or above ``limit``.
        StaleIndexError: a negative index, one of another buffer (or of an earlier
            buffer created at ``path``), or one of a row never written.
    """
    check_finite(priority)
    if priority.max() > limit:
        i = int(np.argmax(priority))
        raise ValueError(
            f"update_priority: priority[{i}]={float(priority[i])!r} is above "
            f"{limit:.4g}, the largest whose p**alpha (alpha={alpha:g}) "
            f"summed over capacity={capacity} rows stays finite; scale the priorities down"
        )
    negative = index < 0
    foreign = (index >> SHARD_SHIFT) != high_bits(tag)
    unwritten = counter_of(index) >= end
    i = int(np.flatnonzero(negative | foreign | unwritten)[0])
    value = int(index[i])
    if negative[i]:
        check_non_negative(index)
    if foreign[i]:
        other_tag, shard = int(tag_of(index[i])), int(shard_of(index[i]))
        hint = ""
        if other_tag == tag and shard:
            hint = (" (it carries shard bits: an index of a sharded buffer goes to "
                    "BufferClient.update_priority, which routes it to its shard)")
        raise StaleIndexError(
            f"update_priority: index[{i}]={value} belongs to another buffer or to an earlier "
            f"buffer created at {path}: it carries tag {other_tag} and shard {shard}, this "
            f"buffer's indices carry tag {tag} and shard 0{hint}; pass only indices that this "
            f"buffer returned, and drop those kept from before it was created"
        )
    counter = int(counter_of(index[i]))
    written = f"rows 0..{end - 1}" if end else "no row"
    raise StaleIndexError(
        f"update_priority: index[{i}]={value} names row {counter}, which was never written "
        f"(this buffer has written {written}); pass only indices that its extend or sample "
        f"returned"
    )


def apply_update(window: Any, index: np.ndarray, priority: np.ndarray, *, tag: int, alpha: float,
                 capacity: int, path: Path) -> int:
    """A buffer's ``update_priority`` on checked arrays (``parse_update``): one pass over
    the batch through ``window.update`` (``window.Window``), which stores nothing when an
    index or priority is bad; then the error for the first bad one. Returns the rows
    skipped because they were overwritten."""
    if len(index) == 0:
        return 0
    limit = priority_limit(alpha, capacity)
    done, end = window.update(index, priority, tag, limit)
    if done is None:
        refuse_update(index, priority, tag=tag, end=end, limit=limit, alpha=alpha,
                      capacity=capacity, path=path)
    return done[1]
