"""Rebuilding a frame-stack buffer's rows while its stored rows stream by, oldest first.

A buffer created with ``frame_stack`` (``frames``) stores one frame and one link
(``frame_stack.prev``) per row, and a reset row before each episode's step 0. A scan
(``scan.BufferFiles.chunks``) reads the stored rows in counter order, a chunk at a time;
``FrameScan.feed`` turns each chunk into the rows the buffer's readers would return:
``observation`` and ``next.observation`` stacks rebuilt, the ``frame_stack`` columns and
the reset rows left out, and left out (and counted) the rows whose stacks cannot be
rebuilt: a link ``UNKNOWN`` (the episode began before a reopen, or in another shard) or
one to a row the scan did not read (gone from the window before the scan reached it, or
dropped as overwritten by a live writer).

Why it can stream: a row's chain (``c0 = row, c1 = prev[c0], ...``, ``k + 1`` rows for
stacks of ``k``) holds only older rows of its episode, and the writer links each row to
its episode's newest row. So after a chunk, the rows a later row can still reach are, per
episode whose newest row is not done, the ``k`` rows of that newest row's chain. Those are
carried into the next chunk (counter, link, episode, done and frame: no other column),
put in front of it, and chains are followed over both at once, vectorised. Memory: one
chunk plus ``k`` frames per open episode.

The rebuilt stacks equal ``FrameStack.rebuild``'s for every row both call readable; a
scan also rebuilds a row whose chain reached rows overwritten after the scan copied them
(its copy of them is intact).

Runs wherever a scan runs (driver, a Ray task on a shard's node). Not thread-safe: one
``FrameScan`` per stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlfleet.buffer.frames import FRAME_KEY, PREV_KEY, START, FrameStack
from rlfleet.buffer.storage import Schema

__all__ = ["FrameScan"]

Arrays = dict[tuple[str, ...], np.ndarray]

EPISODE_KEY = ("episode_id",)
DONE_KEY = ("next", "done")
COUNTER = ("counter",)  # carried rows only: their row counters


class FrameScan:
    """The logical rows of one frame-stack buffer's stored chunks, fed oldest first.

    Args:
        spec: the buffer's ``meta.json`` ``"frame_stack"`` (``key``, ``padding``, ``size``).
        stored: the buffer's stored schema.
        keys: the logical keys to return (None: all of ``logical_schema``).

    Example::

        rebuild = FrameScan(spec, stored, keys)
        for first, arrays in stored_chunks:            # arrays of FrameScan.stored_keys(...)
            rows, resets, unreadable = rebuild.feed(arrays, first)
    """

    def __init__(self, spec: Mapping[str, Any], stored: Schema, keys: Sequence[tuple[str, ...]] | None = None) -> None:
        self.size = int(spec["size"])
        self.zero_padding = spec["padding"] == "zero"
        self.key = tuple(spec["key"])
        self.next_key = ("next", *self.key)
        self.logical = FrameStack.logical_schema(spec, stored)
        self.keys = list(self.logical) if keys is None else [tuple(k) for k in keys]
        unknown = [k for k in self.keys if k not in self.logical]
        if unknown:
            raise KeyError(f"FrameScan: keys {unknown} are not keys of the buffer's rows ({sorted(self.logical)})")
        self.with_frames = self.key in self.keys or self.next_key in self.keys
        link_keys = [PREV_KEY, EPISODE_KEY, DONE_KEY] + ([FRAME_KEY] if self.with_frames else [])
        self.stored_keys = list(dict.fromkeys(
            [k for k in self.keys if k not in (self.key, self.next_key)] + link_keys))
        self._carry: Arrays = {k: np.zeros((0, *stored[k][0]), stored[k][1]) for k in link_keys}
        self._carry[COUNTER] = np.zeros(0, np.int64)

    def feed(self, arrays: Mapping[tuple[str, ...], np.ndarray], first: int) -> tuple[Arrays, int, int]:
        """The logical rows of the stored rows ``arrays`` (of ``stored_keys``, counters
        ``first, first + 1, ...``, each later than every row fed before): ``(rows,
        reset rows, unreadable rows)``, ``rows`` ``{key: [m, ...]}`` of ``keys``."""
        n = len(arrays[PREV_KEY])
        if not n:
            return {key: np.zeros((0, *self.logical[key][0]), self.logical[key][1]) for key in self.keys}, 0, 0
        carry = self._carry
        c = len(carry[COUNTER])
        counters = np.concatenate([carry[COUNTER], np.arange(first, first + n, dtype=np.int64)])
        both = {k: np.concatenate([carry[k], arrays[k]]) for k in carry if k != COUNTER}
        prev = both[PREV_KEY]
        k = self.size
        # follow the links from every row of the chunk, over carried rows and chunk alike
        rows = np.arange(c, c + n)
        chain = np.empty((n, k + 1), dtype=np.int64)
        padded = np.zeros((n, k + 1), dtype=bool)
        valid = np.ones(n, dtype=bool)
        cur = rows
        for j in range(k + 1):
            chain[:, j] = cur
            if j == k:
                break
            link = prev[cur]
            at_reset = link == START
            at = np.minimum(np.searchsorted(counters, link), len(counters) - 1)
            found = (counters[at] == link) & (link < counters[cur])  # UNKNOWN is never a counter
            valid &= at_reset | found
            padded[:, j + 1] = padded[:, j] | at_reset
            cur = np.where(found & ~at_reset, at, cur)
        reset = prev[rows] == START
        keep = valid & ~reset
        out = {key: np.ascontiguousarray(arrays[key][keep]) for key in self.keys
               if key not in (self.key, self.next_key)}
        if self.with_frames:
            frames = both[FRAME_KEY][chain[keep][:, ::-1]]  # [m, k + 1, *frame], oldest first
            if self.zero_padding:
                frames[padded[keep][:, ::-1]] = 0
            if self.key in self.keys:
                out[self.key] = np.ascontiguousarray(frames[:, :k])
            if self.next_key in self.keys:
                out[self.next_key] = np.ascontiguousarray(frames[:, 1:])
        out = {key: out[key] for key in self.keys}
        self._carry = self._next_carry(counters, both, chain, c)
        return out, int(reset.sum()), int((~valid & ~reset).sum())

    def _next_carry(self, counters: np.ndarray, both: Arrays, chain: np.ndarray, c: int) -> Arrays:
        """The rows a later row can still reach: per episode whose newest row is not done,
        the first ``k`` rows of that row's chain (module docstring)."""
        episode = both[EPISODE_KEY].reshape(-1)
        done = both[DONE_KEY].reshape(len(episode), -1).any(axis=1)
        # the newest row of each episode among carried and chunk rows (the last by counter)
        order = np.argsort(episode, kind="stable")
        last = np.r_[episode[order][1:] != episode[order][:-1], True] if len(order) else np.zeros(0, bool)
        newest = order[last]
        newest = newest[~done[newest]]
        # carried newest rows reach the rows carried with them, of which one chunk did not
        # change anything: keep them all; chunk rows reach what their chains found
        from_chunk = newest[newest >= c] - c
        keep = np.union1d(chain[from_chunk, : self.size].reshape(-1), newest[newest < c])
        old = newest[newest < c]
        if len(old):  # a carried open episode keeps its carried rows
            keep = np.union1d(keep, np.flatnonzero(np.isin(episode[:c], episode[old])))
        carry = {k: v[keep] for k, v in both.items()}
        carry[COUNTER] = counters[keep]
        return carry
