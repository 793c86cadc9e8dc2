"""Compiled loops for frame stacks and n-step windows (numba): one call per batch.

Following ``frame_stack.prev`` links is a chain of dependent gathers, and an n-step
window a walk of up to n rows; in numpy each step is several calls over the whole batch
(about 60 small calls a sample of 32 rows, 300 us), where the frames themselves take
about 130 us to copy. These kernels do the walks row by row in one call each, so a
stacked sample costs little more than copying its frames. ``cache=True`` keeps the
machine code next to this file (the first process on a machine compiles, about a
second). Layout and semantics: ``frames`` and ``nstep``.

Runs wherever the buffer lives; pure functions of their arguments (thread-safe).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["chains", "nstep_returns", "nstep_windows", "stack_slots"]

START = -1  # as frames.START / frames.UNKNOWN (numba reads module globals as constants)
UNKNOWN = -2


@numba.njit(cache=True, nogil=True)
def chains(prev: np.ndarray, step: np.ndarray, idx: np.ndarray, cap: int, start: int, end: int,
           length: int, transitions_only: bool) -> np.ndarray:
    """Whether each row counter of ``idx`` has a chain of ``length`` rows that can be
    rebuilt: every row in ``[start, end)``, every link known and older (reset rows end
    a chain); with ``transitions_only``, the row is no reset row (step >= 0)."""
    n = idx.shape[0]
    valid = np.empty(n, dtype=np.bool_)
    for r in range(n):
        cur = idx[r]
        ok = start <= cur < end
        if ok and transitions_only:
            ok = step[cur % cap] >= 0
        j = 1
        while ok and j < length:
            link = prev[cur % cap]
            if link == START:
                break  # the reset row: the rest of the chain repeats it
            if link == UNKNOWN or link >= cur or link < start:
                ok = False
            cur = link
            j += 1
        valid[r] = ok
    return valid


@numba.njit(cache=True, nogil=True)
def _walk(prev: np.ndarray, row: int, cap: int, length: int, chain: np.ndarray, padded: np.ndarray) -> None:
    """``chain[j]``: the row ``j`` links back from ``row`` (staying on the reset row, from
    where ``padded``); unknown links are not followed (readers checked them first)."""
    cur = row
    pad = False
    chain[0] = cur
    padded[0] = False
    for j in range(1, length):
        if not pad:
            link = prev[cur % cap]
            if link == START:
                pad = True
            elif link >= 0:
                cur = link
        chain[j] = cur
        padded[j] = pad


@numba.njit(cache=True, nogil=True)
def stack_slots(prev: np.ndarray, idx: np.ndarray, last: np.ndarray, cap: int, size: int,
                obs_slots: np.ndarray, next_slots: np.ndarray, obs_pad: np.ndarray,
                next_pad: np.ndarray, oldest: np.ndarray) -> None:
    """The ring slots of the frames of each row's stacks, oldest first: ``obs_slots`` and
    ``next_slots`` ``[n, size]`` (the next stack is row ``last``'s, the end of its n-step
    window), which entries lie before the episode's reset row (``*_pad``), and the oldest
    counter each row reads (``oldest``)."""
    n = idx.shape[0]
    chain = np.empty(size + 1, dtype=np.int64)
    padded = np.empty(size + 1, dtype=np.bool_)
    for r in range(n):
        _walk(prev, idx[r], cap, size + 1, chain, padded)
        for m in range(size):  # m-th newest frame of the observation stack: chain[m + 1]
            obs_slots[r, size - 1 - m] = chain[m + 1] % cap
            obs_pad[r, size - 1 - m] = padded[m + 1]
        oldest[r] = chain[size]
        if last[r] != idx[r]:
            _walk(prev, last[r], cap, size, chain, padded)
            for m in range(size):
                next_slots[r, size - 1 - m] = chain[m] % cap
                next_pad[r, size - 1 - m] = padded[m]
        else:
            for m in range(size):
                next_slots[r, size - 1 - m] = chain[m] % cap
                next_pad[r, size - 1 - m] = padded[m]


@numba.njit(cache=True, nogil=True)
def nstep_windows(episode: np.ndarray, step: np.ndarray, done: np.ndarray, next_link: np.ndarray,
                  idx: np.ndarray, end: int, cap: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(complete, rows)`` of each row counter of ``idx`` (``nstep.NStep.windows``): the
    window takes ``rows[r, :k]`` (``-1`` after), rows of one episode with ``step`` rising
    by 1, below ``end``, ending at the n-th row or the first done one. The row after
    ``i`` is ``i + 1`` when that continues the episode, else ``next_link[i]`` (a
    frame-stack buffer's forward links; an empty array where there are none). ``done``
    is ``[cap, d]``."""
    count = idx.shape[0]
    complete = np.zeros(count, dtype=np.bool_)
    rows = np.full((count, n), -1, dtype=np.int64)
    linked = next_link.shape[0] > 0
    for r in range(count):
        cur = idx[r]
        slot = cur % cap
        episode0, step0 = episode[slot], step[slot]
        for j in range(n):
            if j:
                nxt = cur + 1
                ok = nxt < end and episode[nxt % cap] == episode0 and step[nxt % cap] == step0 + j
                if not ok and linked:
                    nxt = next_link[cur % cap]
                    ok = cur < nxt < end and episode[nxt % cap] == episode0 and step[nxt % cap] == step0 + j
                if not ok:
                    break
                cur = nxt
                slot = cur % cap
            rows[r, j] = cur
            ended = j == n - 1
            for c in range(done.shape[1]):
                ended = ended or done[slot, c]
            if ended:
                complete[r] = True
                break
        if not complete[r]:
            rows[r, :] = -1
    return complete, rows


@numba.njit(cache=True, nogil=True)
def nstep_returns(reward: np.ndarray, rows: np.ndarray, powers: np.ndarray, cap: int, total: np.ndarray) -> None:
    """``total[r] = sum_j powers[j] * reward[rows[r, j] % cap]`` over the window's rows
    (``rows[r, j] >= 0``); ``reward`` is ``[cap, d]``, ``total`` float64 ``[n, d]``."""
    for r in range(rows.shape[0]):
        for c in range(total.shape[1]):
            total[r, c] = 0.0
        for j in range(rows.shape[1]):
            if rows[r, j] < 0:
                break
            slot = rows[r, j] % cap
            for c in range(total.shape[1]):
                total[r, c] += powers[j] * reward[slot, c]
