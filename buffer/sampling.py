"""Copying sampled rows out of a buffer's column maps, and redrawing the torn ones.

A sample draws row counters from the window under its lock (``Window.draw_accepted``),
copies the rows without the lock (an ``extend`` may run meanwhile), then re-reads the
window start: rows it passed were being overwritten while they were copied, so their
copy may be torn, and they are drawn and copied again. Finally the counters become the
buffer's indices (its tag ORed in, one vectorised op) and, for the prioritized sampler,
importance weights are computed from the rows' sampling mass.

Runs wherever the buffer lives. ``RowReader`` is thread-safe: it holds only read-only
references to the maps, and every window access goes through the window's lock.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rlfleet.buffer.indices import with_tag
from rlfleet.buffer.window import MAX_REDRAWS, Window

__all__ = ["RowReader"]

Arrays = dict[tuple[str, ...], np.ndarray]


class RowReader:
    """Gathers rows by counter from the column views ``[capacity, *shape]`` of one buffer.

    Args:
        window: the buffer's window (draws, the current start, the sample count).
        views: ``{key path: column view}`` of the mapped data files.
        capacity: rows the ring holds (row ``i`` lives in slot ``i % capacity``).
        tag: the buffer's index tag (``indices``).
        beta: the prioritized sampler's importance exponent; None for other samplers.
    """

    def __init__(self, window: Window, views: Mapping[tuple[str, ...], np.ndarray], capacity: int,
                 tag: int, *, beta: float | None = None) -> None:
        self.window = window
        self.beta = beta
        self.views = dict(views)
        self.capacity = capacity
        self._tag_bits = with_tag(np.int64(0), tag)
        self._layout = [(key, v, v.shape[1:], v.dtype) for key, v in self.views.items()]

    def out_layout(self, lead: tuple[int, ...]) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
        """What a sample with batch dims ``lead`` holds: ``{key: (shape, dtype)}``."""
        layout = {key: ((*lead, *row_shape), dtype) for key, _, row_shape, dtype in self._layout}
        layout[("index",)] = (lead, np.dtype(np.int64))
        if self.beta is not None:
            layout[("weight",)] = (lead, np.dtype(np.float32))
        return layout

    def read_column(self, key: tuple[str, ...], idx: np.ndarray) -> np.ndarray:
        return np.take(self.views[key], idx % self.capacity, axis=0)

    def gather(self, idx: np.ndarray, into: Arrays | None = None) -> Arrays:
        """The rows of counters ``idx`` (any shape): fresh arrays, or written into ``into``."""
        slots = idx % self.capacity
        lead = slots.shape
        out = {} if into is None else into
        for key, src, row_shape, dtype in self._layout:
            dst = np.empty(lead + row_shape, dtype=dtype) if into is None else into[key]
            src.take(slots, 0, dst, "clip")  # 'clip': unbuffered into out (positional: cheaper)
            if into is None:
                out[key] = dst
        return out

    def sample(self, n: int, *, normalised: bool, total_mass: float | None = None,
               total_size: int | None = None, into: Arrays | None = None) -> Arrays:
        """``n`` rows plus ``("index",)`` and, for the prioritized sampler, ``("weight",)``: float32 normalised by the batch max, or float64 unnormalised
        ``(total_size * P(i)) ** -beta`` (defaults: the window's own mass and size).
        Fresh arrays, or written into ``into`` (views of a caller's batch)."""
        window = self.window
        if window.sampler.rejects:
            idx, mass, size, total, drawn_start = window.draw_accepted(n, self.read_column)
        else:  # the common case, a call less
            idx, mass, size, total, drawn_start = window.draw(n)
        out = self.gather(idx, into)
        first_col = idx if idx.ndim == 1 else idx[:, 0]
        lock = window.lock
        for _ in range(MAX_REDRAWS):
            with lock:  # inline, not bounds(): a call less on the hot path
                start_now = window.start
            # rows drawn from [start, end) are intact unless the window start passed them
            # (the common case, a window that did not move, needs no scan of the draw)
            if start_now == drawn_start or first_col.min() >= start_now:
                break
            stale = first_col < start_now
            # rows overwritten while we copied them: their copy may be torn, redraw
            k = int(stale.sum())
            new_idx, new_mass, _, _, _ = window.draw_accepted(k, self.read_column)
            fresh = self.gather(new_idx)
            for key in out:
                out[key][stale] = fresh[key]
            idx[stale] = new_idx
            first_col = idx if idx.ndim == 1 else idx[:, 0]
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
        if mass is not None and normalised:
            # (size * P(i)) ** -beta over its batch max is (mass_i / min mass) ** -beta
            weight = None if into is None else into[("weight",)]
            out[("weight",)] = np.power(mass.min() / mass, self.beta, dtype=np.float32, out=weight)
        elif mass is not None:
            tm = total if total_mass is None else float(total_mass)
            ts = size if total_size is None else int(total_size)
            out[("weight",)] = np.power(ts * (mass / tm), -self.beta)
        with lock:
            window.samples += n
        return out
