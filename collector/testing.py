"""A deterministic env for tests: every observation says which env, episode and step it is.

``CountingEnv`` observations are int64 ``[tag, episode, step]``: ``tag`` is the seed of
the env's first seeded reset (unique per env across a fleet, since the collector derives
distinct seeds), ``episode`` counts the env's episodes from 0, ``step`` counts steps
within the episode from 0. Episode ``e`` lasts ``1 + (tag + e) % max_length`` steps and
ends terminated when ``e`` is even, truncated when odd, so both ends and one-step
episodes occur. The reward of the step leaving step ``s`` is ``s + 1``. From any stored
transition a test can therefore check that ``next.observation`` is exactly the
observation that followed, including the true final one at an episode end.

Importable by Ray workers as ``"rlfleet.collector.testing:CountingEnv"``.

Rows are in TorchRL's layout (buffer format 2): reward and the flags are read from
``("next", "reward")`` (float32 ``[N, 1]``) and ``("next", "terminated" | "truncated" |
"done")`` (bool ``[N, 1]``); rows of another layout fail the checks, naming the key.

``check_counting_rows`` checks each transition on its own (also after sampling);
``check_counting_stream`` checks rows in insertion order: every env's rows form its
exact trajectory from its first step, with nothing lost, duplicated or reordered. Both
raise ``AssertionError`` with the first offending row, so tests can call them directly.
"""

from __future__ import annotations

from typing import Any

from tensordict import TensorDictBase

import gymnasium
import numpy as np

__all__ = [
    "CountingEnv",
    "PixelCountingEnv",
    "check_counting_rows",
    "check_counting_stream",
    "decode_pixels",
    "episode_length",
]


def episode_length(tag: int, episode: int, max_length: int) -> int:
    """How many steps episode ``episode`` of the env with this ``tag`` lasts."""
    return 1 + (tag + episode) % max_length


class CountingEnv(gymnasium.Env):
    """Observations ``[tag, episode, step]`` (int64); see the module docstring.

    Args:
        max_length: Longest episode, in steps.
        num_actions: Size of the ``Discrete`` action space (actions are ignored).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, max_length: int = 7, num_actions: int = 2) -> None:
        if max_length < 1:
            raise ValueError(f"CountingEnv: max_length = {max_length}: must be >= 1")
        self.max_length = max_length
        self.observation_space = gymnasium.spaces.Box(0, np.iinfo(np.int64).max, (3,), np.int64)
        self.action_space = gymnasium.spaces.Discrete(num_actions)
        self.tag = 0
        self.episode = -1
        self.step_count = 0
        self.length = 1

    def _obs(self) -> np.ndarray:
        return np.array([self.tag, self.episode, self.step_count], dtype=np.int64)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.tag = int(seed)
            self.episode = -1
        self.episode += 1
        self.step_count = 0
        self.length = episode_length(self.tag, self.episode, self.max_length)
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = float(self.step_count + 1)
        self.step_count += 1
        ended = self.step_count >= self.length
        terminated = ended and self.episode % 2 == 0
        truncated = ended and self.episode % 2 == 1
        return self._obs(), reward, terminated, truncated, {}


class PixelCountingEnv(CountingEnv):
    """``CountingEnv`` with uint8 image observations ``[C, H, W]``: channel ``c`` of every
    frame is filled with byte ``c`` of ``tag``, ``episode`` and ``step`` written as three
    little-endian 16-bit numbers (so ``C >= 6``; the numbers wrap at 65,536), and pixel
    ``(c, 0, 0)`` of channel ``c >= 6`` holds ``c``. With a grey ``shape`` ``[H, W]``
    (``W >= 6``, as Atari frames before stacking) row 0 holds those 6 bytes and the other
    rows are filled with them. :func:`decode_pixels` reads frames back to ``[tag, episode,
    step]``. Importable by Ray workers as
    ``"rlfleet.collector.testing:PixelCountingEnv"``; the policy sees an image and builds
    its CNN, so rows, datasets and samplers meet real pixel rows.

    Args:
        max_length, num_actions: as for ``CountingEnv``.
        shape: ``[C, H, W]`` of a frame.
    """

    def __init__(self, max_length: int = 7, num_actions: int = 2, shape: tuple[int, int, int] = (6, 16, 16)) -> None:
        super().__init__(max_length=max_length, num_actions=num_actions)
        shape = tuple(int(d) for d in shape)
        if not ((len(shape) == 3 and shape[0] >= 6) or (len(shape) == 2 and shape[1] >= 6)) or min(shape) < 1:
            raise ValueError(
                f"PixelCountingEnv: shape = {shape}: must be [C, H, W] with C >= 6, or grey [H, W] with W >= 6"
            )
        self.observation_space = gymnasium.spaces.Box(0, 255, shape, np.uint8)

    def _obs(self) -> np.ndarray:
        numbers = np.array([self.tag, self.episode, self.step_count], dtype=np.int64).astype("<u2")  # mod 65,536
        if len(self.observation_space.shape) == 2:
            h, w = self.observation_space.shape
            frame = np.zeros((h, w), dtype=np.uint8)
            frame[:, :6] = numbers.view(np.uint8)
            return frame
        c, h, w = self.observation_space.shape
        frame = np.zeros((c, h, w), dtype=np.uint8)
        frame[:6] = numbers.view(np.uint8)[:, None, None]
        frame[6:, 0, 0] = np.arange(6, c, dtype=np.uint8)
        return frame


def decode_pixels(frames: np.ndarray, *, grey: bool = False) -> np.ndarray:
    """``[..., C, H, W]`` uint8 frames of ``PixelCountingEnv`` -> int64 ``[..., 3]``
    ``[tag, episode, step]`` (each modulo 65,536), read from pixel ``(0, 0)``; with
    ``grey``, ``[..., H, W]`` frames, read from row 0."""
    frames = np.asarray(frames)
    corner = np.ascontiguousarray(frames[..., 0, :6] if grey else frames[..., :6, 0, 0])
    return corner.view("<u2").astype(np.int64)


def _next_column(rows: TensorDictBase, name: str, dtype: type) -> np.ndarray:
    """``rows["next", name]`` as a flat ``[N]`` array, once it is ``dtype [N, 1]`` (format 2)."""
    n = rows.shape[0]
    value = rows.get(("next", name), None)
    if value is None:
        where = "at the root" if name in rows.keys() else "nowhere"
        raise AssertionError(
            f"rows lack key 'next.{name}' (found {where}); buffer format 2 (TorchRL's "
            f"layout) stores reward and flags under 'next'"
        )
    array = value.numpy()
    if array.shape != (n, 1) or array.dtype != np.dtype(dtype):
        raise AssertionError(
            f"key 'next.{name}' is {array.dtype} {list(array.shape)}; format 2 stores it as "
            f"{np.dtype(dtype)} [{n}, 1]"
        )
    return array[:, 0]


def check_counting_rows(rows: TensorDictBase, *, max_length: int) -> None:
    """Check every row of ``rows [N]`` (from ``CountingEnv``) against the env's rules.

    Per row: ``step`` matches the observation, ``next.observation`` is the observation
    one step later (the true final one at an episode end), ``next.reward``,
    ``next.terminated``, ``next.truncated`` and ``next.done`` (each ``[N, 1]``) follow
    from the episode's length; ``episode_id`` maps one-to-one to ``(tag, episode)``
    within ``rows``.

    Raises:
        AssertionError: naming the first bad row and what differs.
    """
    obs = rows["observation"].numpy()
    nxt = rows["next", "observation"].numpy()
    step = rows["step"].numpy()
    reward = _next_column(rows, "reward", np.float32)
    term = _next_column(rows, "terminated", np.bool_)
    trunc = _next_column(rows, "truncated", np.bool_)
    done = _next_column(rows, "done", np.bool_)
    eids = rows["episode_id"].numpy()
    owner: dict[int, tuple[int, int]] = {}
    for i in range(obs.shape[0]):
        tag, episode, s = (int(x) for x in obs[i])
        length = episode_length(tag, episode, max_length)
        ended = s + 1 == length
        expected = {
            "step": s,
            "next.observation": [tag, episode, s + 1],
            "reward": float(s + 1),
            "terminated": ended and episode % 2 == 0,
            "truncated": ended and episode % 2 == 1,
            "done": ended,
        }
        got = {
            "step": int(step[i]),
            "next.observation": [int(x) for x in nxt[i]],
            "reward": float(reward[i]),
            "terminated": bool(term[i]),
            "truncated": bool(trunc[i]),
            "done": bool(done[i]),
        }
        if got != expected:
            raise AssertionError(f"row {i} (obs {obs[i].tolist()}): got {got}, expected {expected}")
        key = (tag, episode)
        if owner.setdefault(int(eids[i]), key) != key:
            raise AssertionError(
                f"row {i}: episode_id {int(eids[i])} is used by {owner[int(eids[i])]} and {key}"
            )
    if len(set(owner.values())) != len(owner):
        raise AssertionError("one (tag, episode) carries more than one episode_id")


def check_counting_stream(rows: TensorDictBase, *, max_length: int) -> dict[int, int]:
    """Check rows in insertion order: each env's rows are its whole trajectory, in order.

    Also runs ``check_counting_rows``. For each env (tag), the first row must be episode
    0 step 0, and each later row of that env must follow the previous one (next step,
    or step 0 of the next episode after an end).

    Returns:
        ``{tag: rows of that env}``.

    Raises:
        AssertionError: naming the first row that breaks the order.
    """
    check_counting_rows(rows, max_length=max_length)
    obs = rows["observation"].numpy()
    done = rows["next", "done"].numpy()[:, 0]
    last: dict[int, tuple[int, int, bool]] = {}
    counts: dict[int, int] = {}
    for i in range(obs.shape[0]):
        tag, episode, s = (int(x) for x in obs[i])
        if tag in last:
            pe, ps, pdone = last[tag]
            want = (pe + 1, 0) if pdone else (pe, ps + 1)
        else:
            want = (0, 0)
        if (episode, s) != want:
            raise AssertionError(
                f"row {i}: env {tag} jumps to episode {episode} step {s}, expected {want}"
            )
        last[tag] = (episode, s, bool(done[i]))
        counts[tag] = counts.get(tag, 0) + 1
    return counts
