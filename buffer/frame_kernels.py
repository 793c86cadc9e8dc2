"""Compiled loops for frame stacks and n-step windows (numba): one call per batch.

Following ``frame_stack.prev`` links is a chain of dependent gathers, and an n-step
window a walk of up to n rows; in numpy each step is several calls over the whole batch
(about 60 small calls a sample of 32 rows, 300 us), where the frames themselves take
about 100 us to copy. These kernels do the walks row by row, and a sample calls three:
``nstep_windows`` accepts the drawn rows (windows complete, stacks rebuildable),
``nstep_returns`` sums the rewards, ``stack_frames`` walks the links and copies the
frames as it goes (as fast as ``np.take``, without the slot arrays between). So a
stacked sample costs little more than copying its frames. ``cache=True`` keeps the
machine code next to this file (the first process on a machine compiles, about a
second). Layout and semantics: ``frames`` and ``nstep``.

Runs wherever the buffer lives; pure functions of their arguments (thread-safe).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["chains", "nstep_returns", "nstep_windows", "stack_frames"]

START = -1  # as frames.START / frames.UNKNOWN (numba reads module globals as constants)
UNKNOWN = -2


@numba.njit(cache=True, nogil=True)
def _readable(prev: np.ndarray, step: np.ndarray, row: int, cap: int, start: int, end: int, length: int,
              transitions_only: bool) -> bool:
    """Whether row counter ``row`` has a chain of ``length`` rows that can be rebuilt:
    every row in ``[start, end)``, every link known and older (reset rows end a chain);
    with ``transitions_only``, the row is no reset row (step >= 0)."""
    cur = row
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
    return ok


@numba.njit(cache=True, nogil=True)
def chains(prev: np.ndarray, step: np.ndarray, idx: np.ndarray, cap: int, start: int, end: int,
           length: int, transitions_only: bool) -> np.ndarray:
    """``_readable`` of each row counter of ``idx``."""
    valid = np.empty(idx.shape[0], dtype=np.bool_)
    for r in range(idx.shape[0]):
        valid[r] = _readable(prev, step, idx[r], cap, start, end, length, transitions_only)
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
def stack_frames(frame: np.ndarray, prev: np.ndarray, idx: np.ndarray, last: np.ndarray, cap: int,
                 zero_pad: bool, obs: np.ndarray, nxt: np.ndarray, oldest: np.ndarray) -> None:
    """Copy each row's stacks, oldest frame first: ``obs[r]`` the observation stack of
    row ``idx[r]``, ``nxt[r]`` the next stack of row ``last[r]`` (the end of its n-step
    window; ``idx`` for one-step rows). ``frame`` is the stored frames ``[cap, F]``,
    ``obs`` and ``nxt`` ``[n, size, F]``; with ``zero_pad`` the entries before an
    episode's reset row are zeros, else they repeat it. ``oldest[r]``: the oldest
    counter row ``r`` read (for the overwrite check).

    Two passes: the walks find every frame's slot, then plain loops copy them (measured:
    as fast as ``np.take``; copying inside the walk loop ran 1.5x slower)."""
    n, size, width = obs.shape[0], obs.shape[1], frame.shape[1]
    chain = np.empty(size + 1, dtype=np.int64)
    padded = np.empty(size + 1, dtype=np.bool_)
    slots = np.empty((n, 2, size), dtype=np.int64)  # -1: a zero frame
    for r in range(n):
        _walk(prev, idx[r], cap, size + 1, chain, padded)
        for m in range(size):  # m-th newest frame of the observation stack: chain[m + 1]
            slots[r, 0, size - 1 - m] = -1 if zero_pad and padded[m + 1] else chain[m + 1] % cap
        oldest[r] = chain[size]
        if last[r] != idx[r]:
            _walk(prev, last[r], cap, size, chain, padded)
        for m in range(size):
            slots[r, 1, size - 1 - m] = -1 if zero_pad and padded[m] else chain[m] % cap
    for r in range(n):
        for j in range(size):
            _copy(frame, slots[r, 0, j], obs[r, j], width)
        for j in range(size):
            _copy(frame, slots[r, 1, j], nxt[r, j], width)


@numba.njit(cache=True, nogil=True, inline="always")
def _copy(frame: np.ndarray, slot: int, dst: np.ndarray, width: int) -> None:
    """``dst[:] = frame[slot]`` (zeros for slot -1) as a plain loop, which LLVM
    vectorises; numba's slice assignment runs several times slower."""
    if slot < 0:
        for c in range(width):
            dst[c] = 0
    else:
        src = frame[slot]
        for c in range(width):
            dst[c] = src[c]


@numba.njit(cache=True, nogil=True)
def nstep_windows(episode: np.ndarray, step: np.ndarray, done: np.ndarray, next_link: np.ndarray,
                  prev: np.ndarray, idx: np.ndarray, start: int, end: int, cap: int, n: int,
                  chain: int) -> tuple[np.ndarray, np.ndarray]:
    """``(complete, rows)`` of each row counter of ``idx`` (``nstep.NStep.windows``): the
    window takes ``rows[r, :k]`` (``-1`` after), rows of one episode with ``step`` rising
    by 1, below ``end``, ending at the n-th row or the first done one. The row after
    ``i`` is ``i + 1`` when that continues the episode, else ``next_link[i]`` (a
    frame-stack buffer's forward links; an empty array where there are none). ``done``
    is ``[cap, d]``. With ``chain`` > 0 (a frame-stack buffer, ``prev`` its back links)
    a window is complete only if its row's stacks rebuild too (``_readable`` over
    ``chain`` rows in ``[start, end)``): the sampler's whole acceptance in one call."""
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
        if complete[r] and chain > 0:
            complete[r] = _readable(prev, step, idx[r], cap, start, end, chain, True)
        if not complete[r]:
            rows[r, :] = -1
    return complete, rows


@numba.njit(cache=True, nogil=True)
def nstep_returns(reward: np.ndarray, rows: np.ndarray, powers: np.ndarray, cap: int, total: np.ndarray,
                  discount: np.ndarray, last: np.ndarray, last_slot: np.ndarray) -> None:
    """Per window ``r`` (``rows[r, :k]``, ``-1`` after): ``total[r] = sum_j powers[j] *
    reward[rows[r, j] % cap]`` (summed in float64), ``discount[r] = powers[k]``, and its
    last row's counter and ring slot. ``reward`` is ``[cap, d]``, ``total`` and
    ``discount`` ``[n, d]``."""
    for r in range(rows.shape[0]):
        k = 0
        while k < rows.shape[1] and rows[r, k] >= 0:
            k += 1
        for c in range(total.shape[1]):
            acc = 0.0
            for j in range(k):
                acc += powers[j] * reward[rows[r, j] % cap, c]
            total[r, c] = acc
            discount[r, c] = powers[k]
        last[r] = rows[r, k - 1]
        last_slot[r] = rows[r, k - 1] % cap
