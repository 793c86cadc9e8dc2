"""Where the rows of one ``extend`` go: the writer's node's shards, none left empty.

Runs in the process of a ``BufferClient``; pure functions, thread-safe.

The rule (``plan_write``):

- Candidates are the shards on the caller's own node (every shard when that node has
  none): a shard's rows live on its node's disk, so a local write never crosses the
  network.
- A batch goes whole to the candidate that has stored the fewest rows (as this client
  last heard), ties taken in turn. So every local shard gets rows from the second batch
  on, and they fill evenly whatever the batch sizes.
- When inserts never wait (no ``samples_per_insert``), a batch of at least
  ``2 * MIN_CHUNK_BYTES`` is cut instead into contiguous chunks of at least that size,
  one per candidate (least filled first), sent together and written in parallel.

Why not cut every batch: each call costs both sides a fixed few hundred microseconds
and the chunks' shards compete for the node's cores. Measured here (2 cores, 2 local
shards, ``rlfleet bench remote`` schemas), cut/whole insert rows/s: CartPole rows, 1,024
to 32,768 per batch, 0.57-0.76; Atari rows (56 kB), 64 / 256 / 1,024 per batch (1.8 / 7
/ 29 MB chunks), 0.82 / 0.62 / 1.24. A collector's batch of CartPole rows would lose a
quarter of its insert rate for nothing; one of Atari frames gains once chunks pass
about 16 MB, and a single such batch fills every local shard at once.

Why contiguous, and cut at episode boundaries: collector batches are env-major (each
env's T steps in a row), and the sequence sampler never draws a slice across shards,
so every cut through an episode segment loses the slices that would span it. A
contiguous chunk keeps every segment whole except at its cuts, and each cut moves to
the nearest change of ``episode_id`` within an eighth of a chunk (an env boundary when
the envs divide evenly, the end of an episode otherwise).

Why one shard per client for a frame-stack buffer (``home``): its rows link to the row
before them in their episode, in the same shard (``frames``), and a collector's envs
carry their episodes from batch to batch. So every batch of one client goes whole to its
home shard (``home_shard``): collector ``c``'s is writer ``c mod W``, so a fleet's
collectors spread evenly over the W shards of their node. A batch sent elsewhere (the home shard is not a writer of
this node any more) starts its episodes' chains anew there: their first rows cannot be
rebuilt and are never sampled, nothing wrong is returned.

Why whole batches when the limiter may hold inserts: it admits each call on its own, so
chunks of one batch could be stored in part when the wait times out, and a timed-out
extend must store nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["MIN_CHUNK_BYTES", "chunk_count", "cut_points", "home_shard", "plan_write"]

MIN_CHUNK_BYTES = 16 << 20


def chunk_count(rows: int, nbytes: int, shards: int) -> int:
    """How many chunks a batch of ``rows`` rows and ``nbytes`` bytes is cut into over
    ``shards`` candidates (when the limiter never holds inserts): each chunk carries at
    least ``MIN_CHUNK_BYTES`` and one row."""
    return max(1, min(shards, rows, nbytes // MIN_CHUNK_BYTES))


def cut_points(rows: int, parts: int, episode_id: np.ndarray | None = None) -> list[int]:
    """``[0, c_1, ..., rows]``: ``parts`` contiguous chunks of about equal size, each inner
    cut moved to the nearest change of ``episode_id`` (``[rows]``) within an eighth of a
    chunk. Every chunk keeps at least three quarters of its even size."""
    cuts = [round(i * rows / parts) for i in range(parts + 1)]
    if episode_id is None or parts == 1:
        return cuts
    ep = np.asarray(episode_id).reshape(rows, -1)[:, 0]
    boundaries = np.flatnonzero(ep[1:] != ep[:-1]) + 1  # row b starts another episode
    window = rows // (8 * parts)
    if not len(boundaries) or not window:
        return cuts
    for i in range(1, parts):
        at = int(np.searchsorted(boundaries, cuts[i]))
        near = [int(b) for b in boundaries[max(0, at - 1):at + 1]]
        best = min(near, key=lambda b: abs(b - cuts[i]))
        if abs(best - cuts[i]) <= window:
            cuts[i] = best
    return cuts


def home_shard(writers: Sequence[int], collector_id: np.ndarray | None) -> int:
    """The shard every batch of a client of a frame-stack buffer goes to: writer
    ``collector_id mod len(writers)`` for the collector that wrote the first batch (its
    first row's ``collector_id``), a random writer for rows without one."""
    if collector_id is not None and np.asarray(collector_id).size:
        return writers[int(np.asarray(collector_id).reshape(-1)[0]) % len(writers)]
    return writers[int.from_bytes(os.urandom(2), "little") % len(writers)]


def plan_write(rows: int, nbytes: int, writers: Sequence[int], inserted: Sequence[int], turn: int,
               *, split: bool, episode_id: np.ndarray | None = None,
               home: int | None = None) -> list[tuple[int, int, int]]:
    """The calls of one extend: ``[(shard, first row, end row), ...]`` in batch order.

    Args:
        rows: rows in the batch (> 0).
        nbytes: the batch's payload in bytes.
        writers: the candidate shards (the caller's node's).
        inserted: rows each shard has stored, by shard number, as last heard.
        turn: a counter that advances per extend, to break ties in turn.
        split: whether the batch may be cut (inserts never wait).
        episode_id: the batch's ``episode_id`` ``[rows]``, where cuts prefer to fall.
        home: the shard every batch of this client goes to whole (a frame-stack buffer),
            when it is one of ``writers``.
    """
    if home is not None and home in writers:
        return [(home, 0, rows)]
    n = len(writers)
    # least filled first; among equals, the one whose turn it is
    order = sorted(range(n), key=lambda i: (inserted[writers[i]], (i - turn) % n))
    parts = chunk_count(rows, nbytes, n) if split else 1
    cuts = cut_points(rows, parts, episode_id)
    return [(writers[order[i]], cuts[i], cuts[i + 1]) for i in range(parts)]
