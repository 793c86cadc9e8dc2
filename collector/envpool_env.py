"""EnvPool (C++ vectorised envs) as a collector backend: ``env.vectorization: envpool``.

With ``vectorization: envpool`` the collector's K envs are one EnvPool pool
(``envpool.make(env.id, env_type="gymnasium", num_envs=K, ...)``) stepped in one batched
C++ call instead of a Python loop over gymnasium envs. ``env.id`` is an EnvPool task id
(``"CartPole-v1"``, ``"Pong-v5"``: see ``envpool.list_all_envs()``) and ``env.kwargs`` go
to ``envpool.make``; Atari preprocessing (grey 84x84, ``frame_skip``, ``noop_max``,
``stack_num``...) is EnvPool's own, set through those kwargs, so ``env.wrappers`` must be
empty. ``num_envs`` and the seeds come from the config and the run seed, not kwargs.

Why a shim: the collector's contract (``envs.py``) is ``SAME_STEP`` autoreset: every
step call is one transition per env, and for env j that ended an episode ``next_obs[j]``
is the true final observation and ``resets[j]`` the first observation of the next one.
EnvPool autoresets on the *next* step: the call after a done ignores env j's action and
returns its reset observation, a step that is no transition. ``EnvPoolVectorEnv`` hides
that: after a step where envs D ended, it steps only D once more
(``pool.step(actions, env_id=D)``), which makes EnvPool reset them, and hands their
reset observations back as ``resets``; the caller never sees the reset step. That
costs one extra, partial call per step in which any episode ended, and each call pays
EnvPool's Python wrapper (about 60 us): with 8 CartPole envs (episodes of ~20 random
steps) 30 % of steps make one, and the pool is no faster than the ``"sync"`` loop;
with Atari (episodes of thousands of steps) the cost vanishes.

Seeds: ``reset_vector_env`` derives one 32-bit seed per env (``derive_seeds``) exactly
as for the other backends; EnvPool takes them as a per-env seed list (``seed=[...]``, its
``env_seed`` config), each reinterpreted as int32 (same 32 bits), so env j of collector i
gets its own seed as with gymnasium envs. The trajectories differ from a ``"sync"`` run
with the same seed: EnvPool's envs draw from their own C++ RNGs. Seeds are fixed when
the pool is built; ``reset(seed=...)`` of the vector env refuses a seed.

Flags are EnvPool's: an episode that fails on the step reaching ``max_episode_steps``
comes back truncated and not terminated (gymnasium's ``TimeLimit`` says both).

Threads: EnvPool steps the envs on its own thread pool. ``num_threads`` (an EnvPool
kwarg) defaults here to 1, since a collector actor reserves one CPU; raise it in
``env.kwargs`` when collectors get more.

Where it runs: in the collector's process (a Ray actor, or a test's thread), and on the
driver, where ``make_env`` builds a one-env pool to read the spaces. Not thread-safe:
one thread steps a pool. ``envpool`` is an optional dependency (``rlfleet[envpool]``),
imported when a pool is built, never at import of this module.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import gymnasium
import numpy as np

from rlfleet.collector.config import EnvConfig

__all__ = ["DEFAULT_NUM_THREADS", "EnvPoolEnv", "EnvPoolVectorEnv", "import_envpool", "reset_envpool"]

DEFAULT_NUM_THREADS = 1
# EnvPool kwargs that the config sets itself, and where the user sets them instead.
_RESERVED_KWARGS = {
    "num_envs": "set env.num_envs",
    "batch_size": "the collector steps every env each call (EnvPool's sync mode)",
    "seed": "seeds derive from the run's seed",
    "env_seed": "seeds derive from the run's seed",
    "env_type": "the collector uses env_type='gymnasium'",
}


def import_envpool() -> ModuleType:
    """The ``envpool`` module.

    Raises:
        ValueError: It does not import; the message says how to install it.
    """
    try:
        envpool = importlib.import_module("envpool")
    except ImportError as e:
        raise ValueError(
            f"env.vectorization = 'envpool' needs the envpool package, which does not import "
            f'({e}); install it with: pip install "rlfleet[envpool]"'
        ) from None
    version = getattr(envpool, "__version__", "0")
    if int(version.split(".")[0]) < 1:
        # Before 1.0, envpool.make took one seed for the whole pool, not one per env.
        raise ValueError(
            f"env.vectorization = 'envpool' needs envpool >= 1.0, found {version}; upgrade it "
            'with: pip install -U "rlfleet[envpool]"'
        )
    return envpool


def _make_pool(task_id: str, kwargs: Mapping[str, Any], seeds: list[int]) -> Any:
    """``envpool.make(task_id, ...)`` with one env per seed, errors in rlfleet's words."""
    envpool = import_envpool()
    known = envpool.list_all_envs()
    if task_id not in known:
        by_lower = {name.lower(): name for name in known}
        close = [by_lower[m] for m in difflib.get_close_matches(task_id.lower(), list(by_lower), n=5, cutoff=0.5)]
        hint = f"close matches: {close}" if close else "no close match; see envpool.list_all_envs()"
        raise ValueError(f"env.id {task_id!r} is not an envpool task id ({hint})")
    for key, instead in _RESERVED_KWARGS.items():
        if key in kwargs:
            raise ValueError(
                f"env.kwargs[{key!r}] = {kwargs[key]!r}: not allowed with env.vectorization "
                f"'envpool' ({instead}); remove it"
            )
    if not seeds or any(not 0 <= int(s) < 2**32 for s in seeds):
        raise ValueError(f"seeds = {seeds!r}: need one 32-bit seed (0 <= seed < 2**32) per env")
    options = {"num_threads": DEFAULT_NUM_THREADS, **kwargs}
    # int32, same 32 bits: EnvPool checks seeds against the int32 range.
    env_seeds = [int(s) for s in np.asarray(seeds, dtype=np.uint32).view(np.int32)]
    try:
        return envpool.make(task_id, env_type="gymnasium", num_envs=len(seeds), seed=env_seeds, **options)
    except TypeError as e:
        # EnvPool's config is a namedtuple: an unknown kwarg fails as a TypeError.
        if "unexpected keyword argument" not in str(e):
            raise
        valid = sorted(set(envpool.make_spec(task_id).config._fields) - set(_RESERVED_KWARGS))
        raise ValueError(
            f"env.kwargs = {dict(kwargs)!r}: envpool task {task_id!r} rejects them ({e}); "
            f"its kwargs are {valid}"
        ) from e


def _spaces(task_id: str, pool: Any) -> tuple[gymnasium.Space, gymnasium.Space]:
    with warnings.catch_warnings():
        # EnvPool builds float32 Boxes from float64 bounds; gymnasium warns on every build.
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")
        # One env's spaces (older EnvPools lack the single_* names of gymnasium's VectorEnv).
        obs_space, act_space = pool.observation_space, pool.action_space
    if not isinstance(obs_space, gymnasium.spaces.Box):
        raise ValueError(
            f"env.id {task_id!r}: envpool's observation space is {obs_space}; the collector "
            "needs a Box observation space"
        )
    return obs_space, act_space


# (reward float64 [K], terminated bool [K], truncated bool [K], {env: first obs of next episode})
_StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, Any]]


class EnvPoolVectorEnv(gymnasium.vector.VectorEnv):
    """An EnvPool pool as a ``SAME_STEP`` gymnasium vector env; see the module docstring.

    ``VectorStepper`` steps it through ``step_into`` (no info dicts); ``step`` gives the
    gymnasium ``SAME_STEP`` result for any other caller: the reset observation in
    ``obs[j]`` and the true final one in ``infos["final_obs"][j]``. Runs in one thread.

    Args:
        task_id: An EnvPool task id.
        kwargs: Further ``envpool.make`` kwargs (``num_threads`` defaults to 1).
        seeds: One 32-bit seed per env; their count is ``num_envs``.

    Raises:
        ValueError: envpool is missing, an unknown task id (close matches listed), or
            kwargs EnvPool rejects or the config sets itself.
    """

    metadata: dict[str, Any] = {"autoreset_mode": gymnasium.vector.AutoresetMode.SAME_STEP}

    def __init__(self, task_id: str, kwargs: Mapping[str, Any], seeds: list[int]) -> None:
        self.pool = _make_pool(task_id, kwargs, seeds)
        self.num_envs = len(seeds)
        try:
            self.single_observation_space, self.single_action_space = _spaces(task_id, self.pool)
        except BaseException:
            self.pool.close()
            raise
        self.observation_space = gymnasium.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gymnasium.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self._all_ids = np.arange(self.num_envs, dtype=np.int32)
        # The action of a reset step is ignored by EnvPool; any valid one will do.
        act = self.single_action_space
        self._reset_actions = np.zeros((self.num_envs, *act.shape), dtype=act.dtype)

    def reset(self, *, seed: int | list[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every env; returns ``(obs [K, *obs_shape], {})``.

        Raises:
            ValueError: A seed or options were given (seeds are fixed when the pool is built).
        """
        if seed is not None or options:
            raise ValueError(
                f"EnvPoolVectorEnv.reset(seed={seed!r}, options={options!r}): EnvPool fixes its "
                "seeds when the pool is built; build a new one (reset_vector_env) to reseed"
            )
        obs, info = self.pool.reset(self._all_ids)
        out = np.empty((self.num_envs, *obs.shape[1:]), obs.dtype)
        out[info["env_id"]] = obs
        return out, {}

    def step_into(self, actions: Any, next_obs: np.ndarray) -> _StepResult:
        """One transition per env, ``SAME_STEP``; the signature of ``VectorStepper.step``."""
        obs, reward, terminated, truncated, info = self.pool.step(np.asarray(actions), self._all_ids)
        ids = info["env_id"]
        next_obs[ids] = obs
        rewards = np.empty(self.num_envs, np.float64)
        terminations = np.empty(self.num_envs, bool)
        truncations = np.empty(self.num_envs, bool)
        rewards[ids], terminations[ids], truncations[ids] = reward, terminated, truncated
        resets: dict[int, Any] = {}
        ended = np.flatnonzero(terminations | truncations).astype(np.int32)
        if ended.size:
            # EnvPool resets an env that ended on its next step: take that step now.
            first, _, term, trunc, info = self.pool.step(self._reset_actions[: ended.size], ended)
            if np.any(info["elapsed_step"] != 0) or np.any(term | trunc):
                raise RuntimeError(
                    f"EnvPoolVectorEnv: envs {ended.tolist()} ended, but stepping them again did "
                    f"not reset them (elapsed_step {info['elapsed_step'].tolist()}); this envpool "
                    "version does not autoreset on the next step"
                )
            for j, obs_j in zip(info["env_id"].tolist(), first):
                resets[j] = obs_j.copy()  # EnvPool reuses its output buffers
        return rewards, terminations, truncations, resets

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Gymnasium ``SAME_STEP`` step: ``(obs, reward, terminated, truncated, infos)``."""
        obs = np.empty((self.num_envs, *self.single_observation_space.shape), self.single_observation_space.dtype)
        reward, terminated, truncated, resets = self.step_into(actions, obs)
        infos: dict[str, Any] = {}
        if resets:
            final = np.full(self.num_envs, None, dtype=object)
            for j, first in resets.items():
                final[j] = obs[j].copy()
                obs[j] = first
            infos = {"final_obs": final, "_final_obs": terminated | truncated, "final_info": {}}
        return obs, reward, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        self.pool.close()


class EnvPoolEnv(gymnasium.Env):
    """One EnvPool env as a plain ``gymnasium.Env`` (what ``make_env`` returns for envpool).

    The driver builds one to read the spaces before a run; it also steps like any env
    (call ``reset`` after an episode ends). ``reset(seed=s)`` rebuilds the one-env pool
    with seed ``s``. Not thread-safe.

    Args:
        task_id, kwargs: As for ``EnvPoolVectorEnv``.
        seed: The env's seed, taken modulo 2**32.
    """

    def __init__(self, task_id: str, kwargs: Mapping[str, Any], seed: int = 0) -> None:
        self._task_id, self._kwargs = task_id, dict(kwargs)
        self._venv = EnvPoolVectorEnv(task_id, kwargs, [seed % 2**32])
        self.observation_space = self._venv.single_observation_space
        self.action_space = self._venv.single_action_space
        self._obs = np.empty((1, *self.observation_space.shape), self.observation_space.dtype)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._venv.close()
            self._venv = EnvPoolVectorEnv(self._task_id, self._kwargs, [seed % 2**32])
        obs, _ = self._venv.reset(options=options)
        return obs[0], {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward, terminated, truncated, _ = self._venv.step_into(np.asarray([action]), self._obs)
        return self._obs[0].copy(), float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def close(self) -> None:
        self._venv.close()


def reset_envpool(env: EnvConfig, seeds: list[int]) -> tuple[EnvPoolVectorEnv, np.ndarray]:
    """Build ``env`` as an ``EnvPoolVectorEnv`` seeded with ``seeds`` (one per env) and
    reset it; returns it and the first observation ``[num_envs, *obs_shape]``."""
    venv = EnvPoolVectorEnv(env.id, env.kwargs, seeds)
    try:
        obs, _ = venv.reset()
    except BaseException:
        venv.close()
        raise
    return venv, obs
