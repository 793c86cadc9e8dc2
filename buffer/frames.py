"""Frame stacks stored once: a row keeps its newest frame, stacks are rebuilt on read.

A pixel env wrapped in a frame stack (gymnasium's ``FrameStackObservation``) emits
``observation`` and ``next.observation`` as ``[k, *frame]`` stacks, and each stack
repeats ``k - 1`` frames of the one before: stored as they come, an Atari row holds 8
frames of which one is new (56.4 KB for 7 KB of news). A buffer created with
``frame_stack={"key": "observation"}`` stores instead, per row:

- ``frame_stack.frame`` ``[*frame]``: the newest frame of the row's ``next.observation``
  (on an episode's last row, its true final frame);
- ``frame_stack.prev`` int64: the counter of the row before it in its episode, in this
  buffer: ``START`` on a reset row, ``UNKNOWN`` where that row is not in this buffer
  (the episode began in another shard, or before a reopen);
- ``frame_stack.next`` int64: the counter of the row after it in its episode, once that
  row is stored (-1 before). Written into the older row after the
  newer one is committed (an aligned 8-byte store: a reader sees -1 or the link), so
  n-step windows (``nstep``) go on across a collector's batches;

and every other key as it comes. An episode costs one row more: a *reset row*, written
just before its step 0 row, holding the newest frame of the reset observation. It has
the root keys of its step 0 row but ``step`` -1, and zeros for every ``next`` key;
samplers and reads by position skip it.

Row ``i`` is rebuilt by following ``prev`` from it: ``c0 = i, c1 = prev[c0], ...``. Its
``next.observation`` is the frames of ``c_{k-1} .. c0``, its ``observation`` those of
``c_k .. c1``. A chain that reaches the reset row stays on it: its frame repeats
(``padding="reset"``, gymnasium's default) or zeros take the place of the frames before
it (``"zero"``), the padding the env applied. A row is readable only when its whole
chain is: no ``UNKNOWN`` link and every row of the chain still in the committed window.
A chain's rows are older than the row, so the oldest, ``c_k``, is what the overwrite
checks look at. With n-step samples the next stack is the chain of the window's last row.

``compact`` checks a batch against the stacks it replaces before anything is stored:
each stack must be the one before it in its episode shifted by one frame (within the
batch, and against the stored rows where the episode began in an earlier batch), and a
step 0 stack must be its padding. So a buffer never returns a stack the env did not emit;
an env whose observations are not such stacks is refused with the row that breaks it.

The walks along the links are compiled loops (``frame_kernels``): a stacked sample of
32 rows costs little more than copying its frames.

Runs wherever the buffer lives: ``compact`` and ``commit`` in the writer, under the
buffer's write lock (they keep the open episodes' last rows); ``readable`` and
``rebuild`` in readers, over read-only views (thread-safe).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rlfleet.buffer import frame_kernels
from rlfleet.buffer.errors import SchemaMismatch
from rlfleet.buffer.storage import Schema, format_key

__all__ = ["FRAME_KEY", "NEXT_KEY", "PREV_KEY", "START", "UNKNOWN", "FrameStack", "check_frame_stack"]

FRAME_KEY = ("frame_stack", "frame")
PREV_KEY = ("frame_stack", "prev")
NEXT_KEY = ("frame_stack", "next")
START = -1  # the link of a reset row
UNKNOWN = -2  # the link of a row whose predecessor is not in this buffer
PADDINGS = ("reset", "zero")
NEEDED = (("episode_id",), ("step",), ("next", "done"))


def check_frame_stack(spec: Any) -> dict[str, Any] | None:
    """The frame-stack option as stored in ``meta.json``: ``{"key": [...], "padding": ...}``
    (``"size"`` joins once the first batch shows it), or None.

    Accepts None, a key (``"observation"``) or a mapping ``{"key": "observation",
    "padding": "reset" | "zero"}``; raises ``ValueError`` naming what is wrong.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"key": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"frame_stack={spec!r}: expected None, a key such as 'observation', or "
            f"{{'key': 'observation', 'padding': 'reset'}}"
        )
    unknown = sorted(set(spec) - {"key", "padding", "size"})
    if unknown:
        raise ValueError(f"frame_stack: unknown option(s) {unknown}; it takes 'key' and 'padding'")
    key = spec.get("key", "observation")
    key = tuple(key.split(".")) if isinstance(key, str) else tuple(key)
    if not key or key[0] == "next" or not all(isinstance(p, str) and p for p in key):
        raise ValueError(
            f"frame_stack key={spec.get('key')!r}: name the observation key, e.g. 'observation' "
            f"(its 'next' twin is stacked alike)"
        )
    padding = spec.get("padding", "reset")
    if padding not in PADDINGS:
        raise ValueError(
            f"frame_stack padding={padding!r}: must be 'reset' (the reset frame repeats, "
            f"gymnasium's default) or 'zero'"
        )
    out = {"key": list(key), "padding": padding}
    if spec.get("size") is not None:
        out["size"] = int(spec["size"])
    return out


class FrameStack:
    """The stored-once layout of one buffer: schemas, the writer's compaction, the
    readers' rebuild.

    Args:
        spec: ``check_frame_stack``'s mapping, with ``"size"``.
        views: the buffer's mapped columns (stored schema), ``[capacity, *shape]``.
        capacity: rows of the ring.
    """

    def __init__(self, spec: Mapping[str, Any], views: Mapping[tuple[str, ...], np.ndarray], capacity: int) -> None:
        self.key = tuple(spec["key"])
        self.next_key = ("next", *self.key)
        self.size = int(spec["size"])
        self.zero_padding = spec["padding"] == "zero"
        self.capacity = capacity
        self.frame = views[FRAME_KEY]
        self.frame2d = self.frame.reshape(capacity, -1)  # a view: the map is contiguous
        self.stack_shape = (self.size, *self.frame.shape[1:])
        self.prev = views[PREV_KEY]
        self.step = views[("step",)]
        self.episode = views[("episode_id",)]
        # writer state: episode id -> (counter, step) of its newest row, while it goes on
        self._open: dict[int, tuple[int, int]] = {}
        self._pending: dict[int, tuple[int, int]] | None = None
        self._links: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.int64))

    # ------------------------------------------------------------------ schemas
    @staticmethod
    def stored_schema(spec: Mapping[str, Any], schema: Schema) -> tuple[Schema, int]:
        """The stored schema for the logical ``schema`` of a first batch, and the stack size.

        Raises:
            SchemaMismatch: the batch lacks the stacked keys or what linking reads, the two
                stacks differ, or already holds a ``frame_stack`` column.
        """
        key = tuple(spec["key"])
        next_key = ("next", *key)
        where = f"extend (frame_stack key {format_key(key)!r})"
        for k in (key, next_key, *NEEDED):
            if k not in schema:
                raise SchemaMismatch(
                    f"{where}: the batch lacks '{format_key(k)}', which a frame-stack buffer "
                    f"needs (it has {sorted(format_key(s) for s in schema)}); insert rows in "
                    f"rlfleet's layout or create the buffer without frame_stack"
                )
        if any(k[0] == FRAME_KEY[0] for k in schema):
            raise SchemaMismatch(f"{where}: the key '{FRAME_KEY[0]}' is reserved for the stored frames; rename it")
        shape, dtype = schema[key]
        if schema[next_key] != (shape, dtype):
            raise SchemaMismatch(
                f"{where}: '{format_key(key)}' is {list(shape)} {dtype} but "
                f"'{format_key(next_key)}' is {list(schema[next_key][0])} {schema[next_key][1]}; "
                f"both must be the same stacks"
            )
        if len(shape) < 2 or shape[0] < 2:
            raise SchemaMismatch(
                f"{where}: '{format_key(key)}' has per-row shape {list(shape)}: a frame stack "
                f"needs [k >= 2, *frame] (stacked along the first axis, as FrameStackObservation "
                f"does); create the buffer without frame_stack"
            )
        stored = {k: v for k, v in schema.items() if k not in (key, next_key)}
        stored[FRAME_KEY] = (shape[1:], dtype)
        stored[PREV_KEY] = ((), np.dtype(np.int64))
        stored[NEXT_KEY] = ((), np.dtype(np.int64))
        return stored, int(shape[0])

    @staticmethod
    def logical_schema(spec: Mapping[str, Any], stored: Schema) -> Schema:
        """The schema batches have, from the stored one (the inverse of ``stored_schema``)."""
        shape, dtype = stored[FRAME_KEY]
        stack = ((int(spec["size"]), *shape), dtype)
        out = {k: v for k, v in stored.items() if k[0] != FRAME_KEY[0]}
        out[tuple(spec["key"])] = stack
        out[("next", *spec["key"])] = stack
        return out

    # ------------------------------------------------------------------ the writer
    def compact(self, arrays: Mapping[tuple[str, ...], np.ndarray], n: int, first: int,
                start: int) -> tuple[dict[tuple[str, ...], np.ndarray], np.ndarray]:
        """The stored rows of a checked logical batch of ``n`` rows whose first stored row
        gets counter ``first`` (``start``: the window's start), and the positions of the
        transitions among them (the reset rows fill the others). Call ``commit`` once
        they are stored.

        Raises:
            SchemaMismatch: a stack is not its predecessor shifted by one frame, or a step 0
                stack is not its padding (nothing stored; the row is named).
        """
        obs, nxt = arrays[self.key], arrays[self.next_key]
        episode = arrays[("episode_id",)].reshape(n)
        step = arrays[("step",)].reshape(n)
        done = arrays[("next", "done")].reshape(n, -1).any(axis=1)
        # every next stack is its observation shifted by one frame, plus the new frame
        bad = ~(nxt[:, :-1] == obs[:, 1:]).reshape(n, -1).all(axis=1)
        self._refuse(bad, "its next stack is not its observation stack shifted by one frame")
        resets = np.flatnonzero(step == 0)
        if len(resets):
            first_frames = obs[resets, -1:]
            pad = np.zeros_like(first_frames) if self.zero_padding else first_frames
            bad_pad = ~(obs[resets, :-1] == pad).reshape(len(resets), -1).all(axis=1)
            self._refuse(np.isin(np.arange(n), resets[bad_pad]),
                         f"it is an episode's step 0 but its stack is not padded with "
                         f"{'zeros' if self.zero_padding else 'the reset frame'}")
        # where each row lands: after the reset rows of the step 0 rows up to it
        pos = np.arange(n) + np.cumsum(step == 0)
        m = n + len(resets)
        out: dict[tuple[str, ...], np.ndarray] = {}
        for key, a in arrays.items():
            if key in (self.key, self.next_key):
                continue
            col = np.zeros((m, *a.shape[1:]), dtype=a.dtype)
            col[pos] = a
            if len(resets) and key[0] != "next":
                col[pos[resets] - 1] = a[resets]  # the reset row: its episode's ids
            out[key] = col
        out[("step",)][pos[resets] - 1] = -1
        frames = np.empty((m, *obs.shape[2:]), dtype=obs.dtype)
        frames[pos] = nxt[:, -1]
        frames[pos[resets] - 1] = obs[resets, -1]
        out[FRAME_KEY] = frames
        prev = np.full(m, UNKNOWN, dtype=np.int64)
        prev[pos[resets] - 1] = START
        prev[pos[resets]] = first + pos[resets] - 1
        # the rest link to the row before them in the batch, or in the buffer
        pending = dict(self._open)
        stored_checks: list[tuple[int, int]] = []  # (row, counter of its predecessor)
        for j in range(n):
            e, s = int(episode[j]), int(step[j])
            if s > 0:
                before = pending.get(e)
                if before is not None and before[1] == s - 1:
                    prev[pos[j]] = before[0]
                    at = before[0] - first
                    if at >= 0:  # in this batch: compare the stacks here
                        row = int(np.searchsorted(pos, at))
                        if not np.array_equal(obs[j], nxt[row]):
                            self._refuse(np.arange(n) == j, f"its stack is not the next stack of "
                                         f"row {row}, the step before it in episode {e}")
                    else:
                        stored_checks.append((j, before[0]))
            if done[j]:
                pending.pop(e, None)
            else:
                pending[e] = (first + int(pos[j]), s)
        if stored_checks:
            rows = np.array([r for r, _ in stored_checks])
            before = np.array([c for _, c in stored_checks], dtype=np.int64)
            stacks, valid = self._next_stacks(before, start, first)
            same = (stacks == obs[rows]).reshape(len(rows), -1).all(axis=1)
            bad_rows = rows[valid & ~same]
            self._refuse(np.isin(np.arange(n), bad_rows),
                         "its stack is not the next stack of the stored row before it in its episode")
        out[PREV_KEY] = prev
        # forward links: within the batch now, to earlier batches' rows once stored (commit)
        nxt = np.full(m, -1, dtype=np.int64)
        linked = np.flatnonzero(prev >= first)
        nxt[prev[linked] - first] = first + linked
        out[NEXT_KEY] = nxt
        back = np.flatnonzero((prev >= 0) & (prev < first))
        self._links = (prev[back], first + back)
        self._pending = pending
        return out, pos

    def append(self, window: Any, columns: Any, arrays: Mapping[tuple[str, ...], np.ndarray], n: int,
               sync: bool) -> np.ndarray:
        """Store a checked logical batch of ``n`` rows through ``window.append`` (the commit
        protocol) into ``columns``; returns the transitions' row counters (``[n]``; reset
        rows lie between them). Under the buffer's write lock.

        Raises:
            SchemaMismatch: as ``compact`` (nothing stored).
        """
        rows, pos = self.compact(arrays, n, window.end, window.start)
        m = window.check_room(len(rows[FRAME_KEY]))
        try:
            first, _ = window.append(columns, rows, m, sync)
        except BaseException:
            self.forget()
            raise
        self.commit(window.start, columns.views[NEXT_KEY])
        return pos + first

    def commit(self, start: int, next_view: np.ndarray) -> None:
        """The rows ``compact`` made are stored: link the rows of earlier batches they
        continue to them (through the writer's map ``next_view``; rows since overwritten
        are left alone) and keep their open episodes (those whose newest row has left the
        window since are forgotten)."""
        if self._pending is None:
            return
        older, newer = self._links
        live = older >= start
        next_view[older[live] % self.capacity] = newer[live]
        self._open, self._pending = self._pending, None
        if len(self._open) > 4096:  # episodes abandoned mid-way (a collector died)
            self._open = {e: v for e, v in self._open.items() if v[0] >= start}

    def forget(self) -> None:
        """The write after ``compact`` failed: drop what it would have kept."""
        self._pending = None

    @staticmethod
    def _refuse(bad: np.ndarray, why: str) -> None:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SchemaMismatch(
                f"extend: row {row} of the batch ({int(bad.sum())} row(s) in all): {why}. A "
                f"frame_stack buffer stores each frame once and rebuilds the stacks, so it takes "
                f"only stacks of k consecutive frames of one episode, along the first axis; "
                f"create the buffer without frame_stack for other observations"
            )

    # ------------------------------------------------------------------ the readers
    def readable(self, idx: np.ndarray, start: int, end: int) -> np.ndarray:
        """Which row counters ``idx`` (any shape) are transitions whose stacks can be
        rebuilt from rows in ``[start, end)``."""
        flat = idx.reshape(-1)
        ok = frame_kernels.chains(self.prev, self.step, flat, self.capacity, start, end, self.size + 1, True)
        return ok.reshape(idx.shape)

    def _next_stacks(self, idx: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The next stacks of stored rows ``idx`` ``[n]`` and whether they rebuild."""
        valid = frame_kernels.chains(self.prev, self.step, idx, self.capacity, start, end, self.size, False)
        out: dict[tuple[str, ...], np.ndarray] = {}
        self.rebuild(idx, idx, out)
        return out[self.next_key], valid

    def rebuild(self, idx: np.ndarray, last: np.ndarray | None, out: dict[tuple[str, ...], np.ndarray]) -> np.ndarray:
        """Write the ``observation`` and ``next.observation`` stacks of rows ``idx`` (any
        shape: ``[n]``, or ``[n, L]`` slices) into ``out`` (fresh arrays unless ``out``
        holds them); the next stack is that of row ``last`` (n-step: the window's last
        row, ``idx + k - 1``; None: ``idx``). Returns the oldest counter each row read
        (``idx``'s shape), for the overwrite check."""
        lead, k = idx.shape, self.size
        flat = idx.reshape(-1)
        n, width = len(flat), self.frame2d.shape[1]
        stacks = []
        for key in (self.key, self.next_key):
            dst = out.get(key)
            if dst is None:
                dst = out[key] = np.empty(lead + self.stack_shape, dtype=self.frame.dtype)
            if not dst.flags.c_contiguous:  # then the reshape below would copy, not view
                raise ValueError(f"sample(out=): the batch's '{'.'.join(key)}' is not contiguous")
            stacks.append(dst.reshape(n, k, width))
        oldest = np.empty(n, dtype=np.int64)
        frame_kernels.stack_frames(self.frame2d, self.prev, flat, flat if last is None else last.reshape(-1),
                                   self.capacity, self.zero_padding, stacks[0], stacks[1], oldest)
        return oldest.reshape(lead)
