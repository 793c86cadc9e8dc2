"""Priority updates through the service: check everything first, then route by shard.

Runs in the process of a ``BufferClient``; pure functions over its ``ShardTable``, as
thread-safe as the table.

``BufferClient.update_priority(index, priority)`` means exactly this:

1. Before any call is sent, the client checks everything a shard could refuse, against
   what it knows of each shard, and raises the first failure in this order:

   - one priority per index, ``[n]`` each or two scalars (``ValueError``);
   - every priority a finite number >= 0 (``ValueError``);
   - every index non-negative, its shard bits naming a shard of this buffer
     (``StaleIndexError``);
   - its tag equal to that shard's ``index_tag``, as the shard's latest answer gave it
     (``StaleIndexError``: the index belongs to an earlier buffer deleted and created
     again under this name, or to another buffer);
   - its counter below the rows that shard has ever stored, ``total_inserted`` as the
     shard last reported it in any answer; only the shards whose cached value an index
     reaches are asked again, with one ``state`` call each (``StaleIndexError``: a row
     never written);
   - every priority at most its shard's ``priority_limit`` (``ValueError``).

   A call refused here changes nothing on any shard.
2. Each shard then gets its own rows (shard bits cleared), all shards at once. A shard
   stores the priorities of its live rows and skips, without error, the rows
   overwritten since they were sampled; the call returns the number skipped over all
   shards.
3. A shard refuses its part (all or nothing, as a local ``ReplayBuffer`` does) only in
   a race the client cannot see: since its latest answer to this client, its directory
   was deleted and created again under the running service (another tag), or it lost
   committed rows to a machine crash without ``durability="fsync"`` (fewer rows than it
   had reported). The other shards may have
   stored their parts by then; the error names the shards that did. A shard that dies
   during the call is retried by Ray (an update is idempotent); one stopped for good
   raises ``ShardUnavailable``, and if the buffer was relaunched under the same name the
   client reconnects once and checks the indices again (step 1), so indices of the
   buffer it replaced are refused before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rlfleet.buffer.errors import StaleIndexError
from rlfleet.buffer.indices import clear_shard, counter_of, shard_of, tag_of
from rlfleet.buffer.priorities import check_finite, check_non_negative
from rlfleet.buffer.shard_table import ShardTable

__all__ = ["check_update"]

PerShard = dict[int, tuple[np.ndarray, np.ndarray]]


def check_update(table: ShardTable, idx: np.ndarray, prio: np.ndarray,
                 refresh: Callable[[list[int]], None]) -> PerShard:
    """Check a parsed update (``[n]`` int64 indices and float64 priorities, n >= 1) against
    ``table``; returns each shard's part: ``{shard: (its indices, priorities)}``.

    ``refresh(shards)`` asks those shards for their state and notes it in ``table``.

    Raises:
        ValueError, StaleIndexError: see the module docstring (nothing was sent).
    """
    name = table.name
    check_finite(prio)  # the same words as a local buffer's
    check_non_negative(idx)
    shard = shard_of(idx)
    wrong = shard >= len(table)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise StaleIndexError(
            f"update_priority: index[{i}]={int(idx[i])} names shard {int(shard[i])}, but "
            f"buffer {name!r} has shards 0..{len(table) - 1}; pass the 'index' of a batch "
            f"sampled from this buffer"
        )
    tags = np.array([e.index_tag for e in table.entries], dtype=np.int64)
    foreign = tag_of(idx) != tags[shard]
    if foreign.any():
        i = int(np.flatnonzero(foreign)[0])
        k = int(shard[i])
        raise StaleIndexError(
            f"update_priority: index[{i}]={int(idx[i])} belongs to an earlier buffer deleted "
            f"and created again under the name {name!r}, or to another buffer: it carries "
            f"tag {int(tag_of(idx[i]))}, and shard {k} of this buffer issues tag "
            f"{int(tags[k])}; pass only indices that this buffer returned since it was created"
        )
    counter = counter_of(idx)
    present = np.unique(shard).tolist()
    top = {k: int(counter[shard == k].max()) for k in present}
    stale = [k for k in present if top[k] >= table[k].total_inserted]
    if stale:  # the cache may be behind: ask those shards once
        refresh(stale)
    written = np.array([e.total_inserted for e in table.entries], dtype=np.int64)
    unwritten = counter >= written[shard]
    if unwritten.any():
        i = int(np.flatnonzero(unwritten)[0])
        k, end = int(shard[i]), int(written[shard[i]])
        have = f"rows 0..{end - 1}" if end else "no row"
        raise StaleIndexError(
            f"update_priority: index[{i}]={int(idx[i])} names row {int(counter[i])} of shard "
            f"{k}, which has written {have}: it was never written; pass only indices that "
            f"this buffer's extend or sample returned"
        )
    limits = np.array([e.priority_limit for e in table.entries], dtype=np.float64)
    above = prio > limits[shard]
    if above.any():
        i = int(np.flatnonzero(above)[0])
        k = int(shard[i])
        raise ValueError(
            f"update_priority: priority[{i}]={float(prio[i])!r} is above {limits[k]:.4g}, the "
            f"largest shard {k} of buffer {name!r} accepts (its p**alpha summed over its "
            f"capacity must stay finite); scale the priorities down"
        )
    return {k: (clear_shard(idx[shard == k]), prio[shard == k]) for k in present}
