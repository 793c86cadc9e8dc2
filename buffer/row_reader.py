"""Copying sampled rows out of a buffer's column maps, redrawing the torn ones, and weighing them.

A sample draws row counters from the window under its lock (``Window.draw_accepted``),
copies the rows without the lock (an ``extend`` may run meanwhile), then re-reads the
window start: rows it passed were being overwritten while they were copied, so their
copy may be torn, and they are drawn and copied again. Finally the counters become the
buffer's indices (its tag ORed in, one vectorised op). For the prioritized sampler each
row also comes with its sampling mass ``p**alpha``, from which ``importance_weights``
computes the ``weight`` of a batch: the one place weights are computed, for a local
buffer's batch and for a sharded service's batch assembled from several shards.

Runs wherever the buffer lives. ``RowReader`` is thread-safe: it holds only read-only
references to the maps, and every window access goes through the window's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlfleet.buffer.arrays import positions
from rlfleet.buffer.frames import FRAME_KEY, FrameStack
from rlfleet.buffer.indices import with_tag
from rlfleet.buffer.nstep import DISCOUNT_KEY, REWARD_KEY, NStep
from rlfleet.buffer.window import MAX_REDRAWS, Window

__all__ = ["RowReader", "importance_weights"]

Arrays = dict[tuple[str, ...], np.ndarray]


def importance_weights(mass: np.ndarray, beta: float, out: np.ndarray | None = None) -> np.ndarray:
    """The importance weights of a batch, float32 ``[n]``, normalised by the batch max.

    The weight of row ``i`` is ``(N * P(i)) ** -beta`` divided by the batch's largest,
    with ``P(i) = mass_i / total mass`` and ``N`` the rows held: the totals cancel, leaving
    ``(min mass / mass_i) ** beta``. So it needs only the rows' sampling masses
    (``p_i ** alpha``, float64 ``[n]``, all > 0), and rows drawn from several shards in
    proportion to their masses are weighed as one buffer's.
    """
    return np.power(mass.min() / mass, beta, dtype=np.float32, out=out)


class RowReader:
    """Gathers rows by counter from the column views ``[capacity, *shape]`` of one buffer.

    Args:
        window: the buffer's window (draws, the current start, the sample count).
        views: ``{key path: column view}`` of the mapped data files.
        capacity: rows the ring holds (row ``i`` lives in slot ``i % capacity``).
        tag: the buffer's index tag (``indices``).
        beta: the prioritized sampler's importance exponent; None for other samplers.
        n_step: the sampler's ``{"n": n, "gamma": g}``: samples are n-step transitions
            (``nstep``); None: the stored one-step rows.
    """

    def __init__(self, window: Window, views: Mapping[tuple[str, ...], np.ndarray], capacity: int,
                 tag: int, *, beta: float | None = None, n_step: Mapping[str, Any] | None = None,
                 frame_stack: Mapping[str, Any] | None = None) -> None:
        self.window = window
        self.beta = beta
        self.views = dict(views)
        self.capacity = capacity
        self._tag_bits = with_tag(np.int64(0), tag)
        # a frame-stack buffer's stored frames and links are not keys of its rows
        self._layout = [(key, v, v.shape[1:], v.dtype) for key, v in self.views.items()
                        if frame_stack is None or key[0] != FRAME_KEY[0]]
        self.frames = None if frame_stack is None else FrameStack(frame_stack, self.views, capacity)
        self.nstep = None if n_step is None else NStep(n_step["n"], n_step["gamma"], self.views, capacity,
                                                       0 if self.frames is None else self.frames.size)

    def out_layout(self, lead: tuple[int, ...]) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
        """What a sample with batch dims ``lead`` holds: ``{key: (shape, dtype)}``."""
        layout = {key: ((*lead, *row_shape), dtype) for key, _, row_shape, dtype in self._layout}
        layout[("index",)] = (lead, np.dtype(np.int64))
        if self.frames is not None:
            frame = self.views[FRAME_KEY]
            stack = ((*lead, self.frames.size, *frame.shape[1:]), frame.dtype)
            layout[self.frames.key] = layout[self.frames.next_key] = stack
        if self.nstep is not None:
            layout[DISCOUNT_KEY] = ((*lead, *self.views[REWARD_KEY].shape[1:]), np.dtype(np.float32))
        if self.beta is not None:
            layout[("weight",)] = (lead, np.dtype(np.float32))
        return layout

    def read_column(self, key: tuple[str, ...], idx: np.ndarray) -> np.ndarray:
        return np.take(self.views[key], idx % self.capacity, axis=0)

    def gather(self, idx: np.ndarray, into: Arrays | None = None, *, skip_next: bool = False) -> Arrays:
        """The stored columns of counters ``idx`` (any shape): fresh arrays, or written
        into ``into``. A frame-stack buffer's stacks are not among them (``rows``).
        ``skip_next``: the ``next`` keys are only allocated, not read (n-step fills them
        from the windows' rows)."""
        slots = idx % self.capacity
        lead = slots.shape
        out = {} if into is None else into
        for key, src, row_shape, dtype in self._layout:
            dst = np.empty(lead + row_shape, dtype=dtype) if into is None else into[key]
            if not (skip_next and key[0] == "next"):
                src.take(slots, 0, dst, "clip")  # 'clip': unbuffered into out (positional: cheaper)
            if into is None:
                out[key] = dst
        return out

    def rows(self, idx: np.ndarray, k: np.ndarray | None, into: Arrays | None = None) -> tuple[Arrays, np.ndarray]:
        """The rows of counters ``idx`` as samples hold them: ``gather``, then the n-step
        windows ``k`` (their rows, ``NStep.windows``; None: one-step rows) and the frame
        stacks rebuilt.
        Returns them and the oldest counter each row read (what the overwrite check
        compares with the window start)."""
        out = self.gather(idx, into, skip_next=k is not None)
        last = None if k is None else self.nstep.rebuild(idx, k, out)
        if self.frames is not None:
            oldest = self.frames.rebuild(idx, last, out)
            return out, oldest if idx.ndim == 1 else oldest.min(axis=1)
        return out, idx if idx.ndim == 1 else idx[:, 0]

    def at_positions(self, pos: Any, write_lock: threading.Lock) -> tuple[Arrays, int, bool]:
        """The committed rows at positions ``pos`` (0 the oldest live row, -1 the newest;
        ``arrays.positions`` says what ``pos`` may be): ``(arrays, rows, scalar)``. In a
        frame-stack buffer positions count only the rows whose stacks rebuild (reset rows
        and rows whose chain left the window are skipped).

        ``write_lock`` is the buffer's: positions count from a settled window, not one
        that an in-flight extend has shrunk while it overwrites the oldest rows. A read
        that the window start passed meanwhile is read again.
        """
        window = self.window
        for _ in range(MAX_REDRAWS):
            with write_lock:
                start, end = window.bounds()
            if self.frames is None:
                pos_array, scalar = positions(pos, end - start)
                out = self.gather(pos_array + start)
                oldest = start
            else:  # positions count the rows that read back: not reset rows, not broken chains
                counters = np.arange(start, end, dtype=np.int64)
                readable = counters[self.frames.readable(counters, start, end)]
                pos_array, scalar = positions(pos, len(readable))
                out, oldest_read = self.rows(readable[pos_array], None)
                oldest = int(oldest_read.min()) if len(oldest_read) else start
            if window.bounds()[0] <= oldest:
                return out, len(pos_array), scalar
        raise RuntimeError("getitem: rows were overwritten while being read, too many times")

    def sample(self, n: int, *, into: Arrays | None = None) -> Arrays:
        """``n`` rows plus ``("index",)`` and, for the prioritized sampler, ``("weight",)``
        (``importance_weights``). Fresh arrays, or written into ``into`` (views of a
        caller's batch)."""
        out, mass = self.draw(n, into=into)
        if mass is not None:
            out[("weight",)] = importance_weights(
                mass, self.beta, out=None if into is None else into[("weight",)])
        return out

    def draw(self, n: int, *, into: Arrays | None = None) -> tuple[Arrays, np.ndarray | None]:
        """``n`` rows plus ``("index",)``, and the sampling mass of each row (float64
        ``[n]``, prioritized sampler) or None."""
        window = self.window
        idx, mass, k, drawn_start = self._draw(n)
        out, oldest = self.rows(idx, k, into)
        lock = window.lock
        for _ in range(MAX_REDRAWS):
            with lock:  # inline, not bounds(): a call less on the hot path
                start_now = window.start
            # rows drawn from [start, end) are intact unless the window start passed the
            # oldest row each read (the common case, a window that did not move, needs no
            # scan of the draw)
            if start_now == drawn_start or oldest.min() >= start_now:
                break
            stale = oldest < start_now
            # rows overwritten while we copied them: their copy may be torn, redraw
            count = int(stale.sum())
            new_idx, new_mass, new_k, _ = self._draw(count)
            fresh, new_oldest = self.rows(new_idx, new_k)
            for key in fresh:  # not `out`: a caller's batch (into) also holds index and weight
                out[key][stale] = fresh[key]
            idx[stale] = new_idx  # without frame stacks `oldest` is (a view of) idx
            if self.frames is not None:
                oldest[stale] = new_oldest
            if mass is not None:
                mass[stale] = new_mass
        else:
            raise RuntimeError(
                f"sample: rows were overwritten faster than they could be copied "
                f"{MAX_REDRAWS} times; the buffer (capacity {self.capacity}) is too small "
                f"for its insert rate"
            )
        # the counters become the buffer's indices in place: one vectorised OR (idx is ours)
        np.bitwise_or(idx, self._tag_bits, out=idx)
        if into is None:
            out[("index",)] = idx
        else:
            into[("index",)][...] = idx
        with lock:
            window.samples += n
        return out, mass

    def _draw(self, n: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
        """Counters of ``n`` rows the sampler accepts, their masses, their n-step windows'
        rows (None without ``n_step``) and the window start of the draw."""
        window = self.window
        if window.sampler.rejects:
            idx, mass, _, _, drawn_start = window.draw_accepted(n, self.read_column)
        else:  # the common case, a call less
            idx, mass, _, _, drawn_start = window.draw(n)
        if self.nstep is None and self.frames is None:
            return idx, mass, None, drawn_start
        # Rows whose n-step window is not complete (the episode goes on past the write
        # cursor, or its next rows lie elsewhere) or whose frame stacks cannot be rebuilt
        # (reset rows, chains that left the window) are drawn again. Only the redrawn
        # rows are checked again.
        complete, k = self._accept(idx)
        if complete.all():  # the common case: nothing to redraw
            return idx, mass, k, drawn_start
        bad = np.flatnonzero(~complete if complete.ndim == 1 else ~complete.all(axis=1))
        for _ in range(MAX_REDRAWS):
            if not len(bad):
                return idx, mass, k, drawn_start
            new_idx, new_mass, _, _, _ = window.draw_accepted(len(bad), self.read_column)
            idx[bad] = new_idx
            if mass is not None:
                mass[bad] = new_mass
            new_complete, new_k = self._accept(new_idx)
            if k is not None:
                k[bad] = new_k
            bad = bad[~new_complete if new_complete.ndim == 1 else ~new_complete.all(axis=1)]
        if self.nstep is None:
            raise ValueError(
                f"sample: found no row whose frame stacks can be rebuilt in {MAX_REDRAWS} "
                f"redraws: every row's {self.frames.size} frames before it must still be "
                f"stored; insert more rows"
            )
        raise ValueError(
            f"sample: found no rows with a complete {self.nstep.n}-step window in {MAX_REDRAWS} "
            f"redraws: each needs the next {self.nstep.n - 1} rows of its episode stored after it "
            f"(or its episode's end); insert more rows or use a smaller n_step"
        )

    def _accept(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Which drawn counters a sample may return, and their n-step windows' rows
        (``NStep.windows``; None without n-step)."""
        window = self.window
        with window.lock:
            start, end = window.start, window.end
        if self.nstep is None:
            return self.frames.readable(idx, start, end), None
        return self.nstep.windows(idx, start, end)  # with frame stacks: their chains too
