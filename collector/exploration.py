"""Turning a policy's output into env actions, with exploration.

One ``Explorer`` per collector. The collector calls it once per vector step::

    actions = explorer.act(policy, obs_tensor, frames)   # [K] or [K, A], numpy

- The first ``init_random_frames`` frames: uniform random actions (no forward pass).
- ``Discrete`` actions (``QNetwork``): ``epsilon_greedy`` takes a uniform random action
  with probability epsilon, decayed linearly from ``start`` to ``end`` over ``frames``
  frames; ``greedy`` always takes the argmax.
- ``Box`` actions (``GaussianActor``): ``gaussian`` adds ``N(0, sigma)`` (in half box
  widths) to the deterministic action ``tanh(mean)`` and clips to the box; ``sample``
  draws ``tanh(z), z ~ N(mean, std)`` from the actor itself.

All randomness comes from one numpy generator seeded by the collector, so a collector
with the same seed and weights takes the same actions. Not thread-safe (one per collector).
"""

from __future__ import annotations

import gymnasium
import numpy as np
import torch
from torch import nn

from rlfleet.collector.config import ExplorationConfig

__all__ = ["Explorer"]

_DISCRETE = ("epsilon_greedy", "greedy")
_BOX = ("gaussian", "sample")


class Explorer:
    """Picks the K actions of one vector step (runs in the collector's process).

    Args:
        config: Exploration type and schedule.
        action_space: The single env's action space (``Discrete`` or 1-D ``Box``).
        num_envs: K, the number of actions per call.
        init_random_frames: Frames of uniform random actions before the policy acts.
        seed: Seed of the generator behind every random choice.

    Raises:
        ValueError: An exploration type that does not fit the action space.
    """

    def __init__(self, config: ExplorationConfig, action_space: gymnasium.Space, *, num_envs: int,
                 init_random_frames: int, seed: int) -> None:
        self.config = config
        self.num_envs = num_envs
        self.init_random_frames = init_random_frames
        self.rng = np.random.default_rng(seed)
        self.discrete = isinstance(action_space, gymnasium.spaces.Discrete)
        allowed = _DISCRETE if self.discrete else _BOX
        if config.type not in allowed:
            raise ValueError(
                f"collector.exploration.type = {config.type!r} does not fit the action space "
                f"{action_space}: use one of {list(allowed)}"
            )
        if self.discrete:
            self.n = int(action_space.n)
            self.start = int(action_space.start)
        else:
            self.low = np.asarray(action_space.low, dtype=np.float32)
            self.high = np.asarray(action_space.high, dtype=np.float32)
            self.dtype = action_space.dtype

    def epsilon(self, frames: int) -> float:
        """Epsilon of the schedule after ``frames`` frames (1.0 during the random frames)."""
        if frames < self.init_random_frames:
            return 1.0
        if self.config.type != "epsilon_greedy":
            return 0.0
        c = self.config
        fraction = 1.0 if c.frames == 0 else min(1.0, frames / c.frames)
        return c.start + (c.end - c.start) * fraction

    def random(self) -> np.ndarray:
        """K uniform random actions."""
        if self.discrete:
            return self.rng.integers(0, self.n, self.num_envs) + self.start
        unit = self.rng.random((self.num_envs, self.low.shape[0]), dtype=np.float32)
        return (self.low + unit * (self.high - self.low)).astype(self.dtype, copy=False)

    def act(self, policy: nn.Module, obs: torch.Tensor, frames: int) -> np.ndarray:
        """The K actions for observations ``obs [K, *obs_shape]`` after ``frames`` frames.

        Runs the policy forward under ``torch.inference_mode`` unless the action is random.
        """
        if frames < self.init_random_frames:
            return self.random()
        if self.discrete:
            eps = self.epsilon(frames)
            if eps >= 1.0:
                return self.random()
            with torch.inference_mode():
                q = policy(obs)
                # argmax in numpy: cheaper than torch's for K rows (a vector step's cost
                # is mostly fixed per call, so every call saved counts)
                greedy = (q if q.device.type == "cpu" else q.cpu()).numpy().argmax(axis=1)
            if self.start:
                greedy += self.start
            if eps > 0.0:
                # One uniform per env decides and, below eps, also picks the action:
                # given u < eps, u / eps is uniform on [0, 1) and independent of the
                # decision (one generator call instead of two).
                u = self.rng.random(self.num_envs)
                explore = u < eps
                if explore.any():
                    picked = np.minimum((u * (self.n / eps)).astype(np.int64), self.n - 1)
                    return np.where(explore, picked + self.start, greedy)
            return greedy
        with torch.inference_mode():
            mean, log_std = policy(obs)
            mean = mean.cpu().numpy()
            log_std = log_std.cpu().numpy()
        if self.config.type == "sample":
            z = mean + np.exp(log_std) * self.rng.standard_normal(mean.shape, dtype=np.float32)
            unit = np.tanh(z)
        else:
            noise = self.config.sigma * self.rng.standard_normal(mean.shape, dtype=np.float32)
            unit = np.clip(np.tanh(mean) + noise, -1.0, 1.0)
        actions = self.low + (unit + 1.0) * 0.5 * (self.high - self.low)
        return actions.astype(self.dtype, copy=False)
