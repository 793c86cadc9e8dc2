"""Configuration of the collector side: envs, exploration, collectors, policy.

Frozen dataclasses, one docstring line per field, mirroring the ``env``, ``collector``
and ``policy`` sections of a run's YAML. ``rlfleet.launch`` composes them into its
``RunConfig``; nothing here reads YAML. Each class checks its values when built, so a
bad config fails on the driver with a message naming the field, before any actor starts.
Immutable, hence thread-safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CollectorConfig", "EnvConfig", "ExplorationConfig", "PolicyConfig"]

VECTORIZATIONS = ("sync", "async", "envpool")
EXPLORATIONS = ("epsilon_greedy", "gaussian", "sample", "greedy")
POLICY_TYPES = ("mlp", "cnn", "nature_cnn")


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{owner}.{name} = {value!r}: must be an integer >= {minimum}; set {owner}.{name} "
            f"to {minimum} or more"
        )


def _check_number(owner: str, name: str, value: Any, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        bound = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
        raise ValueError(f"{owner}.{name} = {value!r}: must be a number {bound}")


@dataclass(frozen=True)
class EnvConfig:
    """Which environment each collector actor runs, and how many copies.

    Attributes:
        id: A registered gymnasium id (``"CartPole-v1"``) or ``"package.module:callable"``
            naming a function (or class) that returns a ``gymnasium.Env``; with
            ``vectorization: envpool``, an EnvPool task id (``"Pong-v5"``).
        kwargs: Keyword arguments passed to ``gymnasium.make``, to the callable, or to
            ``envpool.make`` (Atari preprocessing, ``num_threads``: see ``envpool_env``).
        num_envs: Envs per collector actor, stepped together as one vector env.
        vectorization: ``"sync"`` (all envs in the actor's process; fastest for cheap
            envs such as CartPole), ``"async"`` (one subprocess per env) or ``"envpool"``
            (one EnvPool pool of C++ envs stepped in one batched call; needs
            ``rlfleet[envpool]`` and no wrappers).
        wrappers: Applied in order to each single env. Each entry is a name from
            ``gymnasium.wrappers`` (``"FlattenObservation"``), a ``"package.module:callable"``
            path, or a mapping ``{"type": <either of those>, **kwargs}``.
    """

    id: str = "CartPole-v1"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_envs: int = 16
    vectorization: str = "sync"
    wrappers: tuple[str | Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"env.id = {self.id!r}: must be a gymnasium id or 'package.module:callable'")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"env.kwargs = {self.kwargs!r}: must be a mapping of keyword arguments")
        _check_int("env", "num_envs", self.num_envs, 1)
        if self.vectorization not in VECTORIZATIONS:
            raise ValueError(
                f"env.vectorization = {self.vectorization!r}: must be one of {list(VECTORIZATIONS)}"
            )
        if not isinstance(self.wrappers, (tuple, list)):
            raise ValueError(f"env.wrappers = {self.wrappers!r}: must be a list of wrapper names")
        for i, w in enumerate(self.wrappers):
            name = w.get("type") if isinstance(w, Mapping) else w
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"env.wrappers[{i}] = {w!r}: must be a wrapper name, 'package.module:callable', "
                    "or a mapping with a 'type' key"
                )
        if self.vectorization == "envpool" and self.wrappers:
            raise ValueError(
                f"env.wrappers = {list(self.wrappers)!r} with env.vectorization = 'envpool': "
                "EnvPool envs take no gymnasium wrappers; set env.wrappers to [] and configure "
                "EnvPool's own preprocessing through env.kwargs (e.g. stack_num, frame_skip)"
            )
        # Lists from YAML become tuples so the config stays immutable.
        object.__setattr__(self, "wrappers", tuple(self.wrappers))


@dataclass(frozen=True)
class ExplorationConfig:
    """How collectors explore (after the first ``init_random_frames``, which are uniform random).

    Attributes:
        type: ``"epsilon_greedy"`` (Discrete actions: a random action with probability
            epsilon, else the argmax of the Q-values), ``"greedy"`` (Discrete: always the
            argmax), ``"gaussian"`` (Box actions: the actor's deterministic action plus
            ``N(0, sigma)`` noise in units of half the box width, clipped to the box), or
            ``"sample"`` (Box actions: draw from the actor's own squashed Gaussian, as SAC does).
        start: Epsilon at frame 0 of the schedule.
        end: Epsilon once ``frames`` frames (per collector actor) have been collected.
        frames: Length of the linear epsilon decay, in frames per collector actor.
        sigma: Standard deviation of the ``"gaussian"`` noise, in half box widths.
    """

    type: str = "epsilon_greedy"
    start: float = 1.0
    end: float = 0.05
    frames: int = 50_000
    sigma: float = 0.1

    def __post_init__(self) -> None:
        if self.type not in EXPLORATIONS:
            raise ValueError(
                f"collector.exploration.type = {self.type!r}: must be one of {list(EXPLORATIONS)}"
            )
        _check_number("collector.exploration", "start", self.start, 0.0, 1.0)
        _check_number("collector.exploration", "end", self.end, 0.0, 1.0)
        _check_int("collector.exploration", "frames", self.frames, 0)
        _check_number("collector.exploration", "sigma", self.sigma, 0.0)


@dataclass(frozen=True)
class CollectorConfig:
    """The collector fleet: how many actors, how they batch, where their policy runs.

    Attributes:
        num_workers: Collector actors in the fleet.
        frames_per_batch: Transitions each actor gathers per ``extend`` to the buffer
            (rounded up to a multiple of ``env.num_envs``).
        device: Where each actor's policy runs: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        num_gpus: Ray GPU share reserved per actor (e.g. ``0.25``); needs a cuda device.
        init_random_frames: Frames per actor with uniform random actions before the policy acts.
        exploration: Exploration after the random frames.
        report_interval_s: How often, at most, each actor sends its counters (frames,
            returns, timings) to the fleet while it collects; 0: after every batch. Each
            report is a Ray call, and at one per 1024-frame batch they cost a fast fleet
            about a fifth of its frames; ``fleet.stats()`` lags by at most this much (a
            paced ``rlfleet run`` reads frames to take turns, and reports every batch).
    """

    num_workers: int = 2
    frames_per_batch: int = 1024
    device: str = "cpu"
    num_gpus: float = 0
    init_random_frames: int = 5000
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    report_interval_s: float = 0.25

    def __post_init__(self) -> None:
        _check_int("collector", "num_workers", self.num_workers, 1)
        _check_number("collector", "report_interval_s", self.report_interval_s, 0.0, 60.0)
        _check_int("collector", "frames_per_batch", self.frames_per_batch, 1)
        _check_number("collector", "num_gpus", self.num_gpus, 0.0)
        _check_int("collector", "init_random_frames", self.init_random_frames, 0)
        if not isinstance(self.device, str) or not (
            self.device == "cpu" or self.device == "cuda" or _is_cuda_index(self.device)
        ):
            raise ValueError(
                f"collector.device = {self.device!r}: must be 'cpu', 'cuda' or 'cuda:N'"
            )
        if self.num_gpus > 0 and self.device == "cpu":
            raise ValueError(
                f"collector.num_gpus = {self.num_gpus} with collector.device = 'cpu': a GPU "
                "share is only useful for a cuda policy; set collector.device to 'cuda' or "
                "collector.num_gpus to 0"
            )
        if isinstance(self.exploration, Mapping):
            object.__setattr__(self, "exploration", ExplorationConfig(**self.exploration))
        if not isinstance(self.exploration, ExplorationConfig):
            raise ValueError(
                f"collector.exploration = {self.exploration!r}: must be an ExplorationConfig"
            )


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


@dataclass(frozen=True)
class PolicyConfig:
    """The policy network (the learners build the same module from the same config).

    Attributes:
        type: ``"mlp"``: an MLP on 1-D observations, or a small CNN encoder followed by
            the MLP on ``[C, H, W]`` uint8 image observations. ``"cnn"``: the same, but
            insists on image observations. ``"nature_cnn"``: the Nature-DQN encoder (the
            usual one for Atari, images of at least 36x36). ``"package.module:factory"``: a network of
            your own, ``factory(observation_space, action_space, **kwargs) -> nn.Module``
            (see ``rlfleet.collector.user_policy`` for what it must return).
        hidden: Widths of the MLP's hidden layers (built-in types; SAC's critics use
            them with any type).
        kwargs: Keyword arguments of a factory of your own.
    """

    type: str = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        custom = isinstance(self.type, str) and ":" in self.type
        if not custom and self.type not in POLICY_TYPES:
            raise ValueError(
                f"policy.type = {self.type!r}: must be one of {list(POLICY_TYPES)} or "
                "'package.module:factory' naming a function that returns your own nn.Module"
            )
        if custom:
            module, _, attr = self.type.partition(":")
            if not module or not attr:
                raise ValueError(f"policy.type = {self.type!r}: expected 'package.module:factory'")
        if not isinstance(self.hidden, (tuple, list)):
            raise ValueError(f"policy.hidden = {self.hidden!r}: must be a list of layer widths")
        for i, width in enumerate(self.hidden):
            _check_int("policy", f"hidden[{i}]", width, 1)
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"policy.kwargs = {self.kwargs!r}: must be a mapping of keyword arguments")
        if self.kwargs and not custom:
            raise ValueError(
                f"policy.kwargs = {dict(self.kwargs)!r}: only a policy.type of your own "
                f"('package.module:factory') takes kwargs; {self.type!r} takes policy.hidden"
            )
