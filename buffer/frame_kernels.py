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
def stack_slots(prev: np.ndarray, idx: np.ndarray, last: np.ndarray, cap: int, size: int,
                obs_slots: np.ndarray, next_slots: np.ndarray, obs_pad: np.ndarray,
                next_pad: np.ndarray, oldest: np.ndarray) -> None:
    """The ring slots of the frames of each row's stacks, oldest first: ``obs_slots`` and
    ``next_slots`` ``[n, size]`` (the next stack is row ``last``'s, the end of its n-step
    window: consecutive counters after ``idx``), which entries lie before the episode's
    reset row (``*_pad``), and the oldest counter each row reads (``oldest``)."""
    n = idx.shape[0]
    chain = np.empty(size + 1, dtype=np.int64)
    padded = np.empty(size + 1, dtype=np.bool_)
    for r in range(n):
        cur = idx[r]
        pad = False
        chain[0] = cur
        padded[0] = False
        for j in range(1, size + 1):
            if not pad:
                link = prev[cur % cap]
                if link == START:
                    pad = True
                elif link >= 0:
                    cur = link
            chain[j] = cur
            padded[j] = pad
        for m in range(size):  # m-th newest frame of the observation stack: chain[m + 1]
            obs_slots[r, size - 1 - m] = chain[m + 1] % cap
            obs_pad[r, size - 1 - m] = padded[m + 1]
        window = last[r] - idx[r] + 1
        for m in range(size):
            if m < window:
                next_slots[r, size - 1 - m] = (last[r] - m) % cap
                next_pad[r, size - 1 - m] = False
            else:
                next_slots[r, size - 1 - m] = chain[m - window + 1] % cap
                next_pad[r, size - 1 - m] = padded[m - window + 1]
        oldest[r] = chain[size]


@numba.njit(cache=True, nogil=True)
def nstep_windows(episode: np.ndarray, step: np.ndarray, done: np.ndarray, idx: np.ndarray, end: int,
                  cap: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(complete, k)`` of each row counter of ``idx`` (``nstep.NStep.windows``): the
    window takes rows ``i .. i + k - 1`` of one episode, in order, below ``end``, ending at
    the n-th row or the first done one. ``done`` is ``[cap, d]``."""
    count = idx.shape[0]
    complete = np.zeros(count, dtype=np.bool_)
    ks = np.zeros(count, dtype=np.int64)
    for r in range(count):
        i = idx[r]
        slot = i % cap
        episode0, step0 = episode[slot], step[slot]
        for j in range(n):
            row = i + j
            slot = row % cap
            if j and (row >= end or episode[slot] != episode0 or step[slot] != step0 + j):
                break
            ended = j == n - 1
            for c in range(done.shape[1]):
                ended = ended or done[slot, c]
            if ended:
                complete[r] = True
                ks[r] = j + 1
                break
    return complete, ks


@numba.njit(cache=True, nogil=True)
def nstep_returns(reward: np.ndarray, idx: np.ndarray, k: np.ndarray, powers: np.ndarray, cap: int,
                  total: np.ndarray) -> None:
    """``total[r] = sum_{j < k[r]} powers[j] * reward[(idx[r] + j) % cap]``; ``reward`` is
    ``[cap, d]``, ``total`` float64 ``[n, d]``."""
    for r in range(idx.shape[0]):
        for c in range(total.shape[1]):
            total[r, c] = 0.0
        for j in range(k[r]):
            slot = (idx[r] + j) % cap
            for c in range(total.shape[1]):
                total[r, c] += powers[j] * reward[slot, c]
