"""Building gymnasium envs from an ``EnvConfig``: single envs, vector envs, seeds.

An env is named by a registered gymnasium id (``"CartPole-v1"``) or by
``"package.module:callable"`` (found as ``python -m`` would, the working directory first:
see ``user_code``); wrappers are applied to each single env in order.

Vector envs autoreset in ``SAME_STEP`` mode: when env j ends an episode, the same
``step`` call resets it, returns the reset observation in ``obs[j]`` and the true final
observation in ``infos["final_obs"][j]``. Every ``step`` call is then one transition per
env, so the collector stores all of them and masks none (``NEXT_STEP`` mode would spend
one step per episode on a reset that is not a transition, and need a mask).

Seeds: ``derive_seeds(seed, n)`` spreads one integer into ``n`` independent 32-bit seeds
with ``numpy.random.SeedSequence``. The collector derives its actor seed from
``(run seed, collector index, incarnation)`` and its env seeds from that, so actor i,
env j gets a seed distinct from every other env in the fleet, and a fleet run with the
same seed and the same restarts is reproducible. All functions run wherever they are
called (driver or actor) and keep no shared state.

``VectorStepper`` is the collector's hot path over a vector env: it writes each step's
observations straight into the caller's array and, for a ``SyncVectorEnv``, steps the
K envs in a plain Python loop with the same ``SAME_STEP`` semantics. That skips what the
vector wrapper adds per env and step (re-iterating the actions through the vector action
space, merging every info dict, stacking): with 32 CartPole envs the loop steps as fast
as bare envs do, and a whole collector measured about 30 % more frames per CPU second.

``vectorization: envpool`` builds an EnvPool pool instead (``envpool_env``, which also
keeps EnvPool's next-step autoreset out of sight); ``VectorStepper`` steps it with one
batched call.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium
import numpy as np

from rlfleet.collector.config import EnvConfig
from rlfleet.collector.envpool_env import EnvPoolEnv, EnvPoolVectorEnv, reset_envpool
from rlfleet.collector.user_code import import_attr

__all__ = ["VectorStepper", "derive_seeds", "make_env", "make_vector_env"]


def derive_seeds(seed: int, count: int, *, salt: tuple[int, ...] = ()) -> list[int]:
    """``count`` independent 32-bit seeds derived from ``seed`` (and optional ``salt`` ints)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed = {seed!r}: must be an integer >= 0")
    sequence = np.random.SeedSequence([int(seed), *(int(s) for s in salt)])
    return [int(s) for s in sequence.generate_state(count, dtype=np.uint32)]


def _env_factory(env_id: str, kwargs: Mapping[str, Any]) -> Callable[[], gymnasium.Env]:
    if ":" in env_id:
        target = import_attr(env_id, "env.id")
        attr = env_id.partition(":")[2]
        if callable(target):
            return functools.partial(target, **kwargs)
        # gymnasium's own "module:EnvId" form: importing the module registers the id.
        if attr in gymnasium.registry:
            return functools.partial(gymnasium.make, attr, **kwargs)
        raise ValueError(
            f"env.id {env_id!r}: the module has no callable {attr!r} and no gymnasium id "
            f"{attr!r} was registered by importing it"
        )
    if env_id not in gymnasium.registry:
        _register_namespace(env_id)
    if env_id not in gymnasium.registry:
        by_lower = {name.lower(): name for name in gymnasium.registry}
        close = [by_lower[m] for m in difflib.get_close_matches(env_id.lower(), list(by_lower), n=5, cutoff=0.5)]
        hint = f"close matches: {close}" if close else "no close match among registered ids"
        raise ValueError(
            f"env.id {env_id!r} is not a registered gymnasium id ({hint}); use a registered id "
            "or 'package.module:callable'"
        )
    return functools.partial(gymnasium.make, env_id, **kwargs)


# Env namespaces whose ids a package registers when imported: ``ALE/Pong-v5`` works as
# it is (gymnasium's own ``"ale_py:ALE/Pong-v5"`` form does too).
NAMESPACE_PACKAGES = {"ALE": ("ale_py", "atari")}


def _register_namespace(env_id: str) -> None:
    namespace = env_id.partition("/")[0] if "/" in env_id else None
    if namespace not in NAMESPACE_PACKAGES:
        return
    module, extra = NAMESPACE_PACKAGES[namespace]
    try:
        gymnasium.register_envs(importlib.import_module(module))
    except ImportError as e:
        raise ValueError(
            f"env.id {env_id!r} needs the {module} package, which does not import ({e}); "
            f'install it with: pip install "rlfleet[{extra}]"'
        ) from None


def _wrapper(spec: str | Mapping[str, Any], index: int) -> Callable[[gymnasium.Env], gymnasium.Env]:
    kwargs: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        spec = spec["type"]
    if ":" in spec:
        target = import_attr(spec, f"env.wrappers[{index}]")
    else:
        target = getattr(gymnasium.wrappers, spec, None)
        if target is None:
            names = [n for n in dir(gymnasium.wrappers) if not n.startswith("_")]
            close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
            raise ValueError(
                f"env.wrappers[{index}] = {spec!r} is not in gymnasium.wrappers (close matches: "
                f"{close}); use a gymnasium wrapper name or 'package.module:callable'"
            )
    if not callable(target):
        raise ValueError(f"env.wrappers[{index}] = {spec!r} is not callable")
    return functools.partial(target, **kwargs) if kwargs else target


def _check_config(env: EnvConfig) -> None:
    if not isinstance(env, EnvConfig):
        raise TypeError(f"env must be an EnvConfig, got {type(env).__name__}")


def make_env(env: EnvConfig, *, seed: int | None = None) -> gymnasium.Env:
    """Build one env from the config, wrappers applied.

    Args:
        env: Which env, its kwargs and wrappers (``num_envs`` is ignored here). With
            ``vectorization: envpool``, a one-env EnvPool pool (``EnvPoolEnv``).
        seed: If given, the env is reset once with it and its action and observation
            spaces are seeded with it.

    Returns:
        The wrapped ``gymnasium.Env``.

    Raises:
        ValueError: Unknown id (the message lists close matches), a module that does not
            import, an unknown wrapper, or a callable that does not return an Env.
    """
    _check_config(env)
    if env.vectorization == "envpool":
        made: gymnasium.Env = EnvPoolEnv(env.id, env.kwargs, seed=0 if seed is None else seed)
        if seed is not None:
            made.action_space.seed(seed)
            made.observation_space.seed(seed)
        return made
    factory = _env_factory(env.id, env.kwargs)
    wrappers = [_wrapper(w, i) for i, w in enumerate(env.wrappers)]
    made = factory()
    if not isinstance(made, gymnasium.Env):
        raise ValueError(
            f"env.id {env.id!r} returned {type(made).__name__}, not a gymnasium.Env; the "
            "callable must return a gymnasium.Env"
        )
    for wrap in wrappers:
        made = wrap(made)
    if seed is not None:
        made.reset(seed=seed)
        made.action_space.seed(seed)
        made.observation_space.seed(seed)
    return made


def make_vector_env(env: EnvConfig, *, seed: int) -> gymnasium.vector.VectorEnv:
    """Build ``env.num_envs`` copies as one vector env, autoreset in ``SAME_STEP`` mode.

    Env j is reset with ``derive_seeds(seed, num_envs)[j]`` and the vector action space is
    seeded with ``seed``, so the result is ready to ``step``. The caller owns it and must
    ``close()`` it (an ``"async"`` vector env holds one subprocess per env).
    """
    venv, _ = reset_vector_env(env, seed=seed)
    return venv


def reset_vector_env(env: EnvConfig, *, seed: int) -> tuple[gymnasium.vector.VectorEnv, np.ndarray]:
    """Like ``make_vector_env``, also returning the first observation ``[num_envs, *obs_shape]``."""
    _check_config(env)
    if env.vectorization == "envpool":
        venv, obs = reset_envpool(env, derive_seeds(seed, env.num_envs))
        venv.action_space.seed(seed)
        return venv, obs
    # Checks id and wrappers in this process before any subprocess starts.
    _env_factory(env.id, env.kwargs)
    for i, w in enumerate(env.wrappers):
        _wrapper(w, i)
    fns = [functools.partial(make_env, env) for _ in range(env.num_envs)]
    mode = gymnasium.vector.AutoresetMode.SAME_STEP
    if env.vectorization == "sync":
        # copy=False: the collector copies each observation into its own arrays at once.
        venv = gymnasium.vector.SyncVectorEnv(fns, copy=False, autoreset_mode=mode)
    else:
        venv = gymnasium.vector.AsyncVectorEnv(fns, copy=False, autoreset_mode=mode)
    try:
        obs, _ = venv.reset(seed=derive_seeds(seed, env.num_envs))
        venv.action_space.seed(seed)
    except BaseException:
        venv.close()
        raise
    return venv, obs


# (reward float64 [K], terminated bool [K], truncated bool [K], {env: first obs of next episode})
_StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, Any]]


class VectorStepper:
    """Steps a ``SAME_STEP`` vector env into caller-owned arrays (collector's hot path).

    Runs in the collector's process; not thread-safe (one per vector env). For a
    ``SyncVectorEnv`` it steps ``venv.envs`` itself in a loop, exactly as the vector env
    would in ``SAME_STEP`` mode (env j that ends is reset in the same call); an EnvPool
    pool in one batched call (``EnvPoolVectorEnv.step_into``); any other vector env
    (``AsyncVectorEnv``) through its own ``step``. The vector env
    stays the owner of the envs: close it, not this.

    Args:
        venv: A vector env built by ``reset_vector_env`` (``SAME_STEP`` autoreset).
    """

    def __init__(self, venv: gymnasium.vector.VectorEnv) -> None:
        if venv.metadata.get("autoreset_mode") != gymnasium.vector.AutoresetMode.SAME_STEP:
            raise ValueError(
                f"VectorStepper: the vector env autoresets in "
                f"{venv.metadata.get('autoreset_mode')} mode; build it with reset_vector_env "
                f"(SAME_STEP)"
            )
        self.venv = venv
        self.num_envs = venv.num_envs
        self._envs = list(venv.envs) if isinstance(venv, gymnasium.vector.SyncVectorEnv) else None
        self._step_into = venv.step_into if isinstance(venv, EnvPoolVectorEnv) else None

    def step(self, actions: Any, next_obs: np.ndarray) -> _StepResult:
        """One step of every env.

        Args:
            actions: K actions: a list of scalars for ``Discrete`` spaces (the
                collector passes NumPy int64, which envs check fastest), else an array
                ``[K, ...]``.
            next_obs: ``[K, *obs_shape]``, filled with each env's observation after the
                action: the true final observation where the episode ended.

        Returns:
            ``(reward float64 [K], terminated bool [K], truncated bool [K], resets)``
            where ``resets`` maps each env that ended to the first observation of its
            next episode.
        """
        if self._step_into is not None:
            return self._step_into(actions, next_obs)
        if self._envs is None:
            return self._step_vector(actions, next_obs)
        rewards, terminations, truncations = [], [], []
        resets: dict[int, Any] = {}
        for j, env in enumerate(self._envs):
            obs, reward, terminated, truncated, _ = env.step(actions[j])
            next_obs[j] = obs
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            if terminated or truncated:
                resets[j], _ = env.reset()
        return (np.array(rewards, dtype=np.float64), np.array(terminations, dtype=bool),
                np.array(truncations, dtype=bool), resets)

    def _step_vector(self, actions: Any, next_obs: np.ndarray) -> _StepResult:
        obs, reward, terminated, truncated, infos = self.venv.step(actions)
        next_obs[...] = obs
        resets: dict[int, Any] = {}
        for j in np.flatnonzero(terminated | truncated):
            resets[int(j)] = obs[j].copy()
            next_obs[j] = infos["final_obs"][j]
        return (np.asarray(reward, dtype=np.float64), np.asarray(terminated, dtype=bool),
                np.asarray(truncated, dtype=bool), resets)
