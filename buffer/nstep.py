"""n-step returns rebuilt at sample time from the stored one-step rows.

A sampler given ``n_step: {"n": n, "gamma": g}`` returns, for each drawn row ``i``, the
transition from row ``i`` to ``k`` steps on, where ``k`` is ``n`` or fewer when the
episode ends sooner (its ``next.done`` row, terminated or truncated):

- the row's own keys (``observation``, ``action``, ``episode_id``, ...) from row ``i``;
- ``next.reward``: ``sum_{j<k} g**j * reward[i + j]``;
- every other ``next`` key (``observation``, ``done``, ``terminated``, ``truncated``,
  and any of the user's) from row ``i + k - 1``: the observation ``k`` steps on, or the
  episode's true final one, with the flags of that last step;
- ``next.discount`` (float32, shaped as ``next.reward``): ``g**k``, the factor a loss
  bootstraps with (``reward + discount * (1 - terminated) * V(next.observation)``).

Nothing is stored twice: the window's ``k`` rows are read where they lie. They must be
rows of one episode, in order (``episode_id`` equal, ``step`` rising by 1), inside the
committed window. The row after ``i`` is ``i + 1``; in a frame-stack buffer, where a
collector's batch ends, the row its forward link ``frame_stack.next`` names (``frames``).
A row whose ``n``-step window is not complete yet (the episode goes on past the write
cursor) or is broken (the episode's next rows were written into another shard, or
elsewhere in the ring without a link, see ``write_plan``) is not returned and is drawn
again. Rows past ``i`` are younger than ``i``, so a row whose own copy survived
the overwrite check has an intact window too.

Runs wherever the buffer lives, inside ``row_reader.RowReader``; holds read-only views.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rlfleet.buffer.frame_kernels import nstep_returns, nstep_windows
from rlfleet.buffer.frames import NEXT_KEY, PREV_KEY

__all__ = ["DISCOUNT_KEY", "NStep"]

DISCOUNT_KEY = ("next", "discount")
REWARD_KEY = ("next", "reward")
NEEDED = (("episode_id",), ("step",), ("next", "done"), REWARD_KEY)



class NStep:
    """The n-step rebuild over one buffer's column views ``[capacity, *shape]``.

    Args:
        n: steps per window (>= 1).
        gamma: discount per step, in ``[0, 1]``.
        views: the buffer's mapped columns; must hold ``NEEDED``.
        capacity: rows of the ring.
        stack_size: a frame-stack buffer's stack size (``frames``): ``windows`` then also
            checks that each row's stacks rebuild; 0 for other buffers.
    """

    def __init__(self, n: int, gamma: float, views: Mapping[tuple[str, ...], np.ndarray], capacity: int,
                 stack_size: int = 0) -> None:
        self.n, self.gamma, self.capacity = int(n), float(gamma), capacity
        self.episode = views[("episode_id",)]
        self.step = views[("step",)]
        self.done = views[("next", "done")].reshape(len(views[("next", "done")]), -1)
        self.reward = views[REWARD_KEY]
        self.reward2d = self.reward.reshape(len(self.reward), -1)
        # the later row's copy of every "next" key but the reward (summed) and the discount
        self.next_views = [(key, v) for key, v in views.items()
                           if key[0] == "next" and key not in (REWARD_KEY, DISCOUNT_KEY)]
        self.powers = self.gamma ** np.arange(self.n + 1, dtype=np.float64)
        # a frame-stack buffer's forward links (``frames``): windows follow them across the
        # batches of one episode; elsewhere the next row of a window is the next counter
        self.next_link = views.get(NEXT_KEY, np.empty(0, dtype=np.int64))
        self.prev = views.get(PREV_KEY, np.empty(0, dtype=np.int64))
        self.chain = stack_size + 1 if stack_size else 0  # rows a row's two stacks read

    @staticmethod
    def check_schema(schema: Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]], n: int) -> None:
        """Raise ``ValueError`` if ``schema`` lacks a column the rebuild reads, or
        already holds ``next.discount``."""
        missing = [".".join(k) for k in NEEDED if k not in schema]
        if missing:
            raise ValueError(
                f"sampler n_step={{'n': {n}, ...}} reads {', '.join(missing)} of every row, which the "
                f"buffer schema lacks (it has {sorted('.'.join(k) for k in schema)}); insert rows in "
                f"rlfleet's layout (collectors write them) or drop n_step"
            )
        if DISCOUNT_KEY in schema:
            raise ValueError(
                "sampler n_step: the rows already hold a 'next.discount' column, which n-step "
                "samples write; rename that column or drop n_step"
            )

    def windows(self, idx: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """For row counters ``idx`` (any shape) in the committed window ``[start, end)``:
        ``(complete, rows)``: bool of ``idx``'s shape (in a frame-stack buffer: and the
        row's stacks rebuild), and the counters of each window's rows, int64
        ``[*idx.shape, n]``, ``-1`` past its end (and where not complete). One compiled
        call (``frame_kernels``)."""
        complete, rows = nstep_windows(self.episode, self.step, self.done, self.next_link, self.prev,
                                       idx.reshape(-1), start, end, self.capacity, self.n, self.chain)
        return complete.reshape(idx.shape), rows.reshape(*idx.shape, self.n)

    def rebuild(self, idx: np.ndarray, rows: np.ndarray, out: dict[tuple[str, ...], np.ndarray]) -> np.ndarray:
        """Turn the one-step rows gathered in ``out`` (at counters ``idx``) into the
        transitions of their windows (``rows``, as ``windows`` gave them), in place; adds
        ``next.discount``. Returns the counters of the windows' last rows (a frame-stack
        buffer rebuilds the next stack from them).

        Raises:
            ValueError: a caller's batch (``sample(out=)``) holds a non-contiguous reward
                or discount.
        """
        m = idx.size
        reward = out[REWARD_KEY]
        discount = out.get(DISCOUNT_KEY)
        if discount is None:
            discount = out[DISCOUNT_KEY] = np.empty(reward.shape, dtype=np.float32)
        last = np.empty(m, dtype=np.int64)
        slots = np.empty(m, dtype=np.int64)
        nstep_returns(self.reward2d, rows.reshape(m, self.n), self.powers, self.capacity,
                      _rows(reward, m, REWARD_KEY), _rows(discount, m, DISCOUNT_KEY), last, slots)
        slots = slots.reshape(idx.shape)
        for key, view in self.next_views:  # a frame-stack buffer's next stacks are no view
            view.take(slots, 0, out[key], "clip")
        return last.reshape(idx.shape)


def _rows(a: np.ndarray, m: int, key: tuple[str, ...]) -> np.ndarray:
    """``a`` as ``[m, d]``, a view the kernel writes through."""
    if not a.flags.c_contiguous:  # then the reshape would copy, and the writes be lost
        raise ValueError(f"sample(out=): the batch's '{'.'.join(key)}' is not contiguous")
    return a.reshape(m, -1)
