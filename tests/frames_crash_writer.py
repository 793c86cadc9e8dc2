"""Helper process for the frame-stack crash test: forks writers that the test kills with SIGKILL.

Usage: ``python frames_crash_writer.py PATH CAPACITY DURABILITY``. It imports rlfleet
once, creates a frame-stack buffer (``padding="reset"``, stacks of ``STACK``) if absent,
then serves lines on stdin through ``crash_writer.serve``:

- ``run SEED``: fork a child that reopens the buffer and, forever, extends it with the
  rows of ``NUM_ENVS`` envs stepped ``m`` steps each (env-major, as a collector writes),
  new episodes numbered from ``SEED * EPISODES_PER_CHILD``. Around each call it prints
  ``begin N`` / ``committed TOTAL_INSERTED``. One batch in six stores more rows than the
  capacity; the others up to half of it, so the ring wraps every few calls. Episodes a
  kill interrupts are never finished (the next child starts new ones).
- ``kill``: SIGKILL the child, reap it, print ``reaped PID SIGNAL``.
- ``quit``: exit.

Every field of a row is a function of its ``(episode, step)`` (``rows_for``), stacks
included: ``frame(e, t)`` is the observation after ``t`` steps of episode ``e`` (grey,
``FRAME``; row 0 holds ``[TAG, e, t]`` as ``PixelCountingEnv`` writes them, so
``decode_pixels(..., grey=True)`` reads them back; the other rows a pattern of ``(e, t)``
so a torn frame shows), and the stack of ``(e, t)`` is ``frame(e, t - STACK + 1) ..
frame(e, t)`` with the reset frame ``frame(e, 0)`` repeated before it, as gymnasium's
``FrameStackObservation(padding_type="reset")`` builds it.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from crash_writer import serve

FRAME = (16, 64)  # 1 KiB a frame: a batch copy takes long enough to be interrupted
STACK = 4
TAG = 7
NUM_ENVS = 3
EPISODES_PER_CHILD = 100_000


def episode_length(episode: int) -> int:
    """1 to 9 steps."""
    return 1 + (episode * 5 + episode // 3) % 9


def frame(episode: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``[n, *FRAME]`` uint8: the observation after ``t`` steps of ``episode``."""
    episode, t = np.asarray(episode, np.int64), np.asarray(t, np.int64)
    pattern = np.arange(int(np.prod(FRAME)), dtype=np.int64).reshape(FRAME)
    out = ((episode[:, None, None] * 31 + t[:, None, None] * 7 + pattern) % 251).astype(np.uint8)
    numbers = np.stack([np.full_like(episode, TAG), episode, t], axis=1).astype("<u2")  # as PixelCountingEnv
    out[:, 0, :6] = numbers.view(np.uint8)
    return out


def stack(episode: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``[n, STACK, *FRAME]``: frames ``t - STACK + 1 .. t``, the reset frame for those before 0."""
    episode, t = np.asarray(episode, np.int64), np.asarray(t, np.int64)
    return np.stack([frame(episode, np.maximum(t - STACK + 1 + j, 0)) for j in range(STACK)], axis=1)


def rows_for(episode: np.ndarray, step: np.ndarray) -> dict[tuple[str, ...], np.ndarray]:
    """The rows of ``(episode, step)`` pairs, every field determined by them."""
    episode, step = np.asarray(episode, np.int64), np.asarray(step, np.int64)
    length = np.array([episode_length(int(e)) for e in episode], dtype=np.int64)
    last = (step == length - 1)[:, None]
    return {
        ("observation",): stack(episode, step),
        ("action",): episode * 10 + step,
        ("episode_id",): episode.copy(),
        ("step",): step.copy(),
        ("next", "observation"): stack(episode, step + 1),
        ("next", "reward"): (episode % 1000 + step * 0.5).astype(np.float32)[:, None],
        ("next", "terminated"): last & (episode % 2 == 0)[:, None],
        ("next", "truncated"): last & (episode % 2 == 1)[:, None],
        ("next", "done"): last.copy(),
    }


class Episodes:
    """``NUM_ENVS`` envs whose episodes are numbered from ``first``; ``take(m)`` steps each
    ``m`` times and returns the ``(episode, step)`` pairs, env-major."""

    def __init__(self, first: int) -> None:
        self.envs = [[first + j, 0] for j in range(NUM_ENVS)]
        self.next = first + NUM_ENVS

    def take(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = []
        for env in self.envs:
            for _ in range(steps):
                pairs.append(tuple(env))
                env[1] += 1
                if env[1] == episode_length(env[0]):
                    env[0], env[1] = self.next, 0
                    self.next += 1
        episode, step = np.array(pairs, dtype=np.int64).T
        return episode, step


def _child(path: str, seed: int) -> None:
    from rlfleet.buffer.replay_buffer import ReplayBuffer

    rng = np.random.default_rng(seed)
    rb = ReplayBuffer.open(path, seed=seed)
    capacity = rb.capacity
    episodes = Episodes(seed * EPISODES_PER_CHILD)
    while True:
        if rng.random() < 1 / 6:  # more stored rows than the capacity: only the newest land
            steps = int(rng.integers(int(capacity * 1.1), int(capacity * 2))) // NUM_ENVS
        else:
            steps = int(rng.integers(1, max(2, capacity // (2 * NUM_ENVS))))
        episode, step = episodes.take(steps)
        os.write(1, f"begin {len(step)}\n".encode())
        rb.extend_arrays(rows_for(episode, step))
        os.write(1, f"committed {rb.total_inserted}\n".encode())


def main() -> int:
    path, capacity, durability = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from rlfleet.buffer.replay_buffer import ReplayBuffer

    if not os.path.exists(os.path.join(path, "meta.json")):
        ReplayBuffer.create(path, capacity=capacity, durability=durability,
                            frame_stack={"key": "observation", "padding": "reset"}).close()
    return serve(lambda seed: _child(path, seed))


if __name__ == "__main__":
    sys.exit(main())
