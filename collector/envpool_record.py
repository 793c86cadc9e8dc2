"""``record_envpool``: what an EnvPool backend hands the collector, step by step.

Builds an EnvPool vector env exactly as a collector does (``reset_vector_env`` with
``vectorization: envpool``, seeds from ``derive_seeds``), steps it through
``VectorStepper`` with uniform random actions, and keeps every transition, so a test can
check what the collector and the buffer must preserve (the true final observation at an
episode end, one transition per env and step, frame stacks) against a record of real
EnvPool output. Lives apart from ``envpool_env`` because it goes through ``envs``, which
imports ``envpool_env``. Runs in the caller's thread; keeps no state between calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlfleet.collector.config import EnvConfig
from rlfleet.collector.envs import VectorStepper, reset_vector_env

__all__ = ["record_envpool"]


def record_envpool(task_id: str, num_envs: int, steps: int, seed: int, **kwargs: Any) -> dict[str, np.ndarray]:
    """Step an EnvPool task ``steps`` times with random actions and record every transition.

    Args:
        task_id: An EnvPool task id (``"CartPole-v1"``, ``"Pong-v5"``).
        num_envs: K, envs in the pool.
        steps: T, vector steps to take.
        seed: Run seed: env seeds are ``derive_seeds(seed, K)``, actions are drawn from
            the vector action space seeded with ``seed``.
        **kwargs: ``env.kwargs`` for ``envpool.make`` (``max_episode_steps``, ``num_threads``...).

    Returns:
        ``N = T*K`` rows in step order (row ``t*K + j`` is env j's transition at step t)::

            observation, next_observation   env's dtype [N, *obs_shape]
            action                          [N, *act_shape] (int64 [N] for Discrete)
            reward                          float64 [N]
            terminated, truncated           bool [N]
            env, episode, step              int64 [N]: env index, its episode counter
                                            (from 0), step within the episode (from 0)

        ``next_observation`` of a row that ends an episode is the true final observation;
        the env's next row starts the next episode (episode + 1, step 0).

    Raises:
        ValueError: As ``reset_vector_env`` (envpool missing, unknown task id, bad kwargs),
            or ``steps`` < 1.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"record_envpool: steps = {steps!r}: must be an integer >= 1")
    config = EnvConfig(id=task_id, kwargs=kwargs, num_envs=num_envs, vectorization="envpool")
    venv, first = reset_vector_env(config, seed=seed)
    try:
        stepper = VectorStepper(venv)
        obs = np.array(first)
        k = num_envs
        record: dict[str, list[np.ndarray]] = {name: [] for name in (
            "observation", "next_observation", "action", "reward", "terminated", "truncated",
            "env", "episode", "step")}
        episode = np.zeros(k, np.int64)
        step = np.zeros(k, np.int64)
        for _ in range(steps):
            actions = venv.action_space.sample()
            next_obs = np.empty_like(obs)
            reward, terminated, truncated, resets = stepper.step(actions, next_obs)
            for name, value in (("observation", obs.copy()), ("next_observation", next_obs),
                                ("action", np.asarray(actions)), ("reward", reward),
                                ("terminated", terminated), ("truncated", truncated),
                                ("env", np.arange(k, dtype=np.int64)), ("episode", episode.copy()),
                                ("step", step.copy())):
                record[name].append(value)
            obs = next_obs.copy()
            step += 1
            for j, reset_obs in resets.items():
                obs[j] = reset_obs
                episode[j] += 1
                step[j] = 0
    finally:
        venv.close()
    return {name: np.concatenate(values) for name, values in record.items()}
