"""The committed window of one buffer, the commit protocol that moves it, the sampler
that draws from it, and their lock.

Commit protocol (the reason no reader and no reopen ever sees a torn row): the
committed window ``[start, end)`` of row counters lives as two 64-bit words in
``header.bin`` (an aligned 8-byte store is atomic with respect to a process crash), and
``Window.append`` of ``n`` rows stores them in this order:

1. ``start`` moves past every row the batch will overwrite (rows leave the window
   before they are touched); skipped when nothing is overwritten. A batch of more rows
   than the capacity empties the window here (``start = end``);
2. the rows are copied into their slots;
3. only for a batch of more rows than the capacity: ``start`` moves to ``end + n -
   capacity``, past the batch's own rows that never land; for an instant ``start > end``;
4. ``end = end + n``: the commit.

A crash at any instant leaves only whole rows inside the window, and every header state
the protocol passes through is one ``check_buffer`` accepts; the ``start > end`` of step
3 opens as an empty window at ``end`` (``ReplayBuffer.open`` stores the repair). With
``durability="fsync"`` the data and priority pages are msynced before ``end`` is stored,
and the header after each store of steps 1 and 4.

Everything that reads or changes the window, the sampler's per-row state or the random
generator goes through a ``Window`` method, under its one lock.

Runs wherever the buffer lives. Thread-safe: every method takes the lock, except that
``append`` copies rows without it (one writer at a time: the caller serialises them);
``start``, ``end`` and the counters are plain attributes that only that writer changes
(and ``row_reader.RowReader``, under the lock); readers call ``bounds``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from rlfleet.buffer.indices import MAX_COUNTER
from rlfleet.buffer.samplers import Sampler, slot_ranges
from rlfleet.buffer.storage import Header, MemmapColumns

__all__ = ["MAX_REDRAWS", "Window", "settled_window"]

MAX_REDRAWS = 100

Draw = tuple[np.ndarray, np.ndarray | None, int, float, int]


def settled_window(start: int, end: int, capacity: int) -> tuple[int, int]:
    """The committed window a buffer opens with, from the header's words: as stored,
    unless a crash left ``start > end`` (between steps 3 and 4 of an extend of more rows
    than the capacity: the window is then empty) or a window wider than the capacity."""
    if start > end:
        return end, end
    if end - start > max(capacity, 0):
        return end - capacity, end
    return start, end


class Window:
    """The window ``[start, end)``, its sampler and generator, and the buffer's counters.

    Args:
        header: the mapped header (the window's words are stored there).
        sampler: the buffer's sampler, bound by the caller once the files exist.
        start, end: the window read from the header (after any repair).
        seed: seeds the sampler's random generator.
    """

    def __init__(self, header: Header, sampler: Sampler, start: int, end: int, seed: int | None) -> None:
        self.header = header
        self.sampler = sampler
        self.start, self.end = start, end
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        # between an extend's eviction and its commit the window is smaller than it will
        # be; a draw that fails only because of that waits for the commit
        self._shrunk = False
        self._committed = threading.Condition(self.lock)
        self.samples = 0  # rows sampled since open
        self.inserts = 0  # rows inserted since open
        self.priority_updates = 0  # rows whose priority update was accepted
        self.priority_skipped = 0  # rows overwritten between their sample and their update

    def check_room(self, n: int) -> int:
        """Return ``n`` if ``n`` more rows keep the row counter within ``MAX_COUNTER``."""
        if self.end + n > MAX_COUNTER:
            raise ValueError(
                f"extend: {n} rows would take the row counter to {self.end + n}, past "
                f"{MAX_COUNTER} (2**44, what an index can name); this buffer has inserted "
                f"{self.end} rows: create a new buffer to go on"
            )
        return n

    def bounds(self) -> tuple[int, int]:
        with self.lock:
            return self.start, self.end

    def mass(self) -> float:
        """The sampler's total mass over the window (the row count, unless prioritized)."""
        with self.lock:
            return self.sampler.mass(self.start, self.end)

    # ------------------------------------------------------------------ the writer's side
    def append(self, columns: MemmapColumns, arrays: dict[tuple[str, ...], np.ndarray], n: int,
               sync: bool) -> tuple[int, int]:
        """Write ``n`` rows (``arrays[key][:n]``) after the window's end by the commit
        protocol; return the counters the batch was given, ``(end, end + n)`` (with more
        rows than the capacity only the newest land, but all ``n`` are counted). One
        writer at a time."""
        cap, start, end = columns.capacity, self.start, self.end
        last = end + n
        first = last - min(n, cap)
        new_start = max(start, last - cap)
        # disk blocks before any write: a full disk is an OSError here, not a SIGBUS later
        columns.reserve_ahead(min(cap, last), n)
        self.evict(min(new_start, end), sync)  # step 1
        try:
            offset = first - end
            for lo, hi in slot_ranges(first, last, cap):  # step 2
                columns.write(lo, arrays, offset, offset + hi - lo)
                offset += hi - lo
            if sync:
                for lo, hi in slot_ranges(first, last, cap):
                    columns.sync(lo, hi - lo)
        except BaseException:
            self.abandon()
            raise
        self.commit(first, last, new_start, sync)  # steps 3 and 4
        return end, last

    def evict(self, to: int, sync: bool) -> None:
        """Step 1 of the commit protocol: rows below ``to`` leave the window (stored in
        the header, msynced when ``sync``) before the writer overwrites their slots."""
        with self.lock:
            if to > self.start:
                self.sampler.evict(self.start, to)
                self.header.start = to
                self.start = to
                self._shrunk = True
                if sync:
                    self.header.sync()

    def abandon(self) -> None:
        """The write between ``evict`` and ``commit`` failed: the evicted rows stay gone
        (their slots may be half-written); wake the draws waiting for the commit."""
        with self.lock:
            self._shrunk = False
            self._committed.notify_all()

    def commit(self, first: int, last: int, new_start: int, sync: bool) -> None:
        """Steps 3 and 4: rows ``[first, last)`` are written; a batch larger than the
        capacity first stores ``start = new_start`` (past ``end``), then ``end = last``
        makes the rows visible. With ``sync`` the sampler's files are msynced before the
        commit and the header after."""
        with self.lock:
            if new_start > self.end:
                self.header.start = new_start
                self.start = new_start
            self.sampler.commit(first, last, self.header.max_priority)
            if sync:
                self.sampler.sync()
            self.inserts += last - self.end
            self.header.end = last  # the commit
            self.end = last
            if self._shrunk:
                self._shrunk = False
                self._committed.notify_all()
        if sync:
            self.header.sync()

    # ------------------------------------------------------------------ the readers' side
    def draw(self, n: int) -> Draw:
        """Counters of ``n`` rows, their sampling mass (prioritized) or None, the window's
        size, the sampler's total mass and the window start they were drawn from."""
        with self.lock:
            while True:
                start, end = self.start, self.end
                try:
                    if end <= start:
                        raise ValueError("sample: the buffer is empty; extend it before sampling")
                    idx, mass = self.sampler.draw(n, start, end, self.rng)
                    return idx, mass, end - start, self.sampler.mass(start, end), start
                except ValueError:
                    if not self._shrunk:
                        raise
                    self._committed.wait()  # the rows an extend in flight evicted come back

    def draw_accepted(self, n: int, read: Callable[[tuple[str, ...], np.ndarray], np.ndarray]) -> Draw:
        """Draw ``n`` rows the sampler accepts after reading them (sequence boundaries;
        ``read(key, counters)`` gathers a column, without the lock).

        Samplers that reject draw a quarter more candidates than asked, so most calls
        need one round instead of a redraw round for the few rejects.
        """
        if not self.sampler.rejects:
            return self.draw(n)
        kept: list[np.ndarray] = []
        got = 0
        size, total, first_start = 0, 0.0, None
        for _ in range(MAX_REDRAWS):
            want = n - got
            idx, _, size, total, start = self.draw(want + want // 4 + 4)
            first_start = start if first_start is None else first_start
            kept.append(self.sampler.keep(idx, want, read))
            got += len(kept[-1])
            if got >= n:
                # the oldest window start of the rounds: rows it held may since be evicted
                return np.concatenate(kept)[:n], None, size, total, first_start
        raise ValueError(
            f"sample: found no valid {self.sampler.type} rows in {MAX_REDRAWS} redraws "
            f"(e.g. no episode segment of {self.sampler.sequence_length} consecutive steps); "
            f"insert longer episodes or use a shorter sequence length"
        )

    def counts(self) -> dict[str, float | int]:
        """The window and the counters, one consistent snapshot (see ``ReplayBuffer.stats``)."""
        with self.lock:
            return {
                "size": self.end - self.start,
                "total_inserted": self.end,
                "inserts": self.inserts,
                "samples": self.samples,
                "priority_mass": self.sampler.mass(self.start, self.end),
                "max_priority": self.header.max_priority,
                "priority_updates": self.priority_updates,
                "priority_updates_skipped": self.priority_skipped,
            }

    # ------------------------------------------------------------------ priorities
    def update(self, index: np.ndarray, priority: np.ndarray, tag: int,
               limit: float) -> tuple[tuple[float, int] | None, int]:
        """The sampler's update against the window as it is now (see
        ``Sampler.update``); the result (None: refused, nothing stored) and the window's
        ``end`` it was checked against. Raises the header's max priority and counts."""
        with self.lock:
            done = self.sampler.update(index, priority, tag, self.start, self.end, limit)
            if done is not None:
                top, skipped = done
                if top > self.header.max_priority:
                    self.header.max_priority = top
                self.priority_updates += len(index) - skipped
                self.priority_skipped += skipped
            return done, self.end
