"""Run configuration: frozen dataclasses mirroring the YAML in ``configs/``, and a strict loader.

Runs on the driver (``rlfleet run``, ``rlfleet serve``); the dataclasses are plain values
and may be pickled to actors. Everything here is immutable and thread-safe.

A config file maps one-to-one onto :class:`RunConfig`: every YAML mapping is a dataclass,
every leaf a typed field. Loading is strict, because a typo in a config silently falling
back to a default costs a whole run:

- an unknown key is an error naming its path and the nearest valid key;
- a value of the wrong type is an error naming the path, the expected type and the value;
- a YAML syntax error names the file, line and column; a duplicated key names both lines;
- ``key=value`` overrides (``learner.lr=1e-3``, ``env.kwargs.max_episode_steps=200``,
  ``policy.hidden=[128,128]``) are parsed as YAML scalars and type-checked the same way.

The env, collector and policy sections are the collector package's own dataclasses; this
module composes them and adds the sections that belong to the run; the buffer section
lives in ``config_buffer``. It runs past 400 lines on purpose: the rest of the schema, a
docstring per field, reads in one place.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlfleet.buffer import DEFAULT_NAMESPACE, check_name, check_namespace
from rlfleet.collector.config import CollectorConfig, EnvConfig, ExplorationConfig, PolicyConfig
from rlfleet.launch.config_buffer import (
    BufferConfig, NStepConfig, RateLimiterConfig, SamplerConfig, _checked_by, _positive,
)
from rlfleet.launch.config_loader import ConfigError, apply_overrides, build, check_choices, parse_yaml

__all__ = [
    "BufferConfig",
    "CollectorConfig",
    "ConfigError",
    "EnvConfig",
    "ExplorationConfig",
    "LOGGERS",
    "LearnerConfig",
    "NStepConfig",
    "PolicyConfig",
    "RateLimiterConfig",
    "RayConfig",
    "RunConfig",
    "RunSection",
    "SamplerConfig",
    "WandbConfig",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_config",
]


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RayConfig:
    """Where the run's Ray cluster comes from.

    Attributes:
        address: None starts an embedded local Ray of the run's own, always (even when
            ``RAY_ADDRESS`` is set or a cluster runs on the machine); ``"auto"`` joins the
            cluster ``ray start`` started on this machine; ``"HOST:PORT"`` joins that one.
        namespace: Ray namespace of the run's named actors: the replay service, the
            collectors and the learners (``rlfleet status --namespace`` lists them).
        num_cpus: logical CPUs of an embedded local Ray (None: the machine's count).
        include_dashboard: start the dashboard of an embedded Ray (None: when the
            dashboard package imports). It binds to 127.0.0.1.
        placement_timeout_s: how long the run waits for its placement groups (shards,
            collectors, learners) before it fails naming what does not fit.
        connect_timeout_s: with an address, the longest wait to learn whether the
            cluster answers, accepts this process's token and runs the same versions.
        runtime_env: Ray runtime environment of the run's job, passed to
            ``ray.init(runtime_env=...)`` when the run starts or joins Ray: every actor of
            the run (shards, collectors, learners) runs in it. Ray's own fields, e.g.
            ``{working_dir: ., pip: ["gymnasium[atari]"], env_vars: {OMP_NUM_THREADS: "1"}}``;
            Ray checks them before the run starts (numbers in ``env_vars`` become
            strings). None: no runtime env. A process that called ``ray.init`` itself
            keeps its own (the run warns).
    """

    address: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    num_cpus: int | None = None
    include_dashboard: bool | None = None
    placement_timeout_s: float = 60.0
    connect_timeout_s: float = 30.0
    runtime_env: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _checked_by(check_namespace, self.namespace)
        if self.runtime_env is not None:
            if not isinstance(self.runtime_env, Mapping) or not all(isinstance(k, str) for k in self.runtime_env):
                raise ConfigError(f"runtime_env: {self.runtime_env!r} is not a mapping of Ray runtime_env fields; "
                                  "write e.g. {env_vars: {OMP_NUM_THREADS: '1'}, pip: [...]}, or null for none")
            env, env_vars = dict(self.runtime_env), self.runtime_env.get("env_vars")
            if isinstance(env_vars, Mapping):  # Ray takes strings; YAML reads OMP_NUM_THREADS: 1 as a number
                env["env_vars"] = {k: str(v) if type(v) in (int, float) else v for k, v in env_vars.items()}
            object.__setattr__(self, "runtime_env", env)
        if self.num_cpus is not None:
            _positive("num_cpus", self.num_cpus)
        _positive("placement_timeout_s", self.placement_timeout_s)
        _positive("connect_timeout_s", self.connect_timeout_s)
        if self.address is not None and not self.address.strip():
            raise ConfigError("address: '' is empty; use null (embedded Ray), 'auto' or 'HOST:PORT'")


@dataclass(frozen=True)
class LearnerConfig:
    """The learner group and its algorithm.

    Attributes:
        algorithm: dqn (discrete actions) | sac (continuous actions).
        num_learners: learner ranks in the torch.distributed group.
        device: cpu | cuda (one GPU per rank).
        batch_size: rows each rank samples per step.
        lr: Adam learning rate.
        gamma: discount.
        publish_every: learner steps between weight publications to the collectors.
        weight_transport: distributed (torch.distributed broadcast) | object_store.
        target_update_every: DQN hard target update period in learner steps
            (0: soft updates with ``tau``).
        tau: soft target update rate (SAC; DQN when ``target_update_every`` is 0).
        double_dqn: DQN picks the next action with the online network.
        n_step: DQN n-step returns.
        grad_clip: max gradient norm.
        prefetch: sample requests each rank keeps in flight.
        sample_split: whole (each group of ``prefetch`` batches from one shard, chosen
            by size or priority mass: one call whatever the shard count) | rows (every
            batch split over all shards, one call per shard); see ``BufferClient``.
        init_alpha: SAC initial temperature.
        target_entropy: SAC target entropy (None: minus the action dimension).
        checkpoint_every: learner steps between checkpoints.
    """

    algorithm: Literal["dqn", "sac"] = "dqn"
    num_learners: int = 1
    device: str = "cpu"
    batch_size: int = 256
    lr: float = 5e-4
    gamma: float = 0.99
    publish_every: int = 50
    weight_transport: Literal["distributed", "object_store"] = "distributed"
    target_update_every: int = 500
    tau: float = 0.005
    double_dqn: bool = True
    n_step: int = 1
    grad_clip: float = 10.0
    prefetch: int = 2
    sample_split: Literal["whole", "rows"] = "whole"
    init_alpha: float = 1.0
    target_entropy: float | None = None
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        check_choices(self)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: {self.device!r} is not one of 'cpu', 'cuda', 'cuda:N'")
        for name in ("num_learners", "batch_size", "lr", "publish_every", "n_step", "checkpoint_every"):
            _positive(name, getattr(self, name))
        for name in ("target_update_every", "tau", "grad_clip", "prefetch"):
            _positive(name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma: {self.gamma!r} must be in [0, 1]")
        _positive("init_alpha", self.init_alpha)


LoggerName = Literal["tensorboard", "wandb"]
LOGGERS: tuple[str, ...] = typing.get_args(LoggerName)

@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases settings, used when ``run.loggers`` includes ``wandb``.

    The W&B run is named after the run directory, its files go to ``<run dir>/wandb/``,
    and its id is kept in ``<run dir>/wandb_run_id`` so ``--resume`` continues it.

    Attributes:
        project: W&B project.
        entity: W&B team or user (None: the logged-in user's default entity).
        mode: online (needs ``wandb login`` or ``WANDB_API_KEY``) | offline (writes
            ``<run dir>/wandb/`` only, no network; upload later with ``wandb sync``) |
            disabled (nothing is written).
        group: W&B run group, to show runs side by side (None: none).
        tags: W&B run tags.
    """

    project: str = "rlfleet"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    group: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.project.strip() or set(self.project) & set("/\\#?%:") or len(self.project) > 128:
            raise ConfigError(f"project: {self.project!r} is not a W&B project name; use 1-128 characters "
                              "without / \\ # ? % :")
        object.__setattr__(self, "tags", tuple(self.tags))
        for i, tag in enumerate(self.tags):
            if not isinstance(tag, str) or not 0 < len(tag) <= 64:
                raise ConfigError(f"tags[{i}]: {tag!r} is not a W&B tag; use a string of 1-64 characters")


@dataclass(frozen=True)
class RunSection:
    """When the run stops, where it writes, and how the driver paces it.

    Attributes:
        dir: run directories are created under this directory.
        total_frames: stop once the collectors produced this many frames.
        target_return: stop once the mean return of the last ``return_window``
            episodes reaches it (None: no target).
        return_window: episodes averaged for ``target_return``.
        time_limit_s: stop after this much wall time.
        learner_steps_per_frame: learner steps per collected frame; collectors and
            learners then take turns, the collectors paused while the learners take the
            steps new frames paid for (None: both run freely; bound them with
            ``buffer.rate_limiter.samples_per_insert`` instead).
        steps_per_iteration: learner steps per ``LearnerGroup.step`` call of the loop.
        log_every_s: seconds between metrics.jsonl lines and progress updates.
        loggers: where each metrics.jsonl record also goes, besides the file (which
            stays the source of truth): ``tensorboard`` (event files in
            ``<run dir>/tensorboard/``; ``pip install "rlfleet[tensorboard]"``) and/or
            ``wandb`` (``pip install "rlfleet[wandb]"``). Empty: the file only.
        wandb: see :class:`WandbConfig` (used when ``loggers`` includes ``wandb``).
    """

    dir: str = "runs"
    total_frames: int = 300_000
    target_return: float | None = None
    return_window: int = 20
    time_limit_s: float = 900.0
    learner_steps_per_frame: float | None = None
    steps_per_iteration: int = 50
    log_every_s: float = 2.0
    loggers: tuple[LoggerName, ...] = ()
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loggers, str) or not isinstance(self.loggers, (tuple, list)):
            raise ConfigError(f"loggers: {self.loggers!r} is not a list; write e.g. [tensorboard, wandb], or [] for none")
        object.__setattr__(self, "loggers", tuple(self.loggers))
        for i, name in enumerate(self.loggers):
            if name not in LOGGERS:
                raise ConfigError(f"loggers[{i}]: {name!r} is not one of {', '.join(repr(n) for n in LOGGERS)}")
            if name in self.loggers[:i]:
                raise ConfigError(f"loggers[{i}]: {name!r} is listed twice in {list(self.loggers)!r}")
        for name in ("total_frames", "return_window", "time_limit_s", "steps_per_iteration", "log_every_s"):
            _positive(name, getattr(self, name))
        if self.learner_steps_per_frame is not None:
            _positive("learner_steps_per_frame", self.learner_steps_per_frame)


@dataclass(frozen=True)
class RunConfig:
    """One run: the whole YAML file.

    Attributes:
        name: the config's name; a run's directory is ``<run.dir>/<name>-<time>``, and
            that directory's name names the run's replay service and actors.
        seed: seed of collectors (per actor and env, derived), learners and buffer.
    """

    name: str = "rlfleet"
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        _checked_by(lambda: check_name(self.name, argument="name"))
        self.buffer.frame_stack_spec(self.env)  # raises ConfigError for what the buffer cannot store
        n_step = self.learner.n_step
        sampler = self.buffer.sampler
        if sampler.n_step is not None:
            if n_step > 1:
                raise ConfigError(
                    f"learner.n_step: {n_step} and buffer.sampler.n_step both ask for n-step returns; "
                    f"keep buffer.sampler.n_step (rebuilt at sample time, any sampler) and set learner.n_step: 1"
                )
            gamma = sampler.n_step.gamma
            if gamma is None:  # the learner's discount
                object.__setattr__(sampler.n_step, "gamma", float(self.learner.gamma))
            elif gamma != self.learner.gamma:
                raise ConfigError(
                    f"buffer.sampler.n_step.gamma: {gamma} differs from learner.gamma: {self.learner.gamma}; "
                    f"the rewards would be summed with one discount and bootstrapped with the other: leave "
                    f"n_step.gamma out (it takes learner.gamma) or make them equal"
                )
        elif n_step > 1 and (sampler.type != "sequence" or sampler.length != n_step):
            raise ConfigError(
                f"learner.n_step: {n_step} needs slices of {n_step} rows, but buffer.sampler is "
                f"{sampler.to_mapping()}; set buffer.sampler.n_step: {{n: {n_step}}} (n-step rebuilt at "
                f"sample time, with any sampler) or buffer.sampler to {{type: sequence, length: {n_step}}}"
            )


# --------------------------------------------------------------------------- public


def parse_config(
    text: str, overrides: Sequence[str] | Mapping[str, Any] = (), *, source: str = "<string>"
) -> RunConfig:
    """Parse YAML text into a :class:`RunConfig`, then apply ``key=value`` overrides.

    Runs on the driver. Raises:
        ConfigError: see :func:`load_config`.
    """
    data = parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        config = build(RunConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return apply_overrides(config, overrides)


def load_config(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()) -> RunConfig:
    """Load a YAML config file strictly and apply ``key=value`` overrides.

    Runs on the driver; thread-safe.

    Args:
        path: a YAML file shaped like DESIGN.md's config section.
        overrides: ``dotted.key=value`` strings, values written as YAML (``null``,
            ``[64, 64]``), as on the command line; or a mapping of dotted keys to Python
            values, ``{"learner.lr": 1e-3, "policy.hidden": [128, 128]}``.

    Returns:
        The frozen :class:`RunConfig`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: a YAML syntax error (with line and column), an unknown key (with
            the nearest valid key), or a value of the wrong type or out of range.
    """
    path = Path(path)
    if not path.is_file():
        hint = "" if path.exists() else "; ready configs are in configs/ (e.g. configs/cartpole_dqn.yaml)"
        raise FileNotFoundError(f"load_config: config file {str(path)!r} does not exist or is not a file{hint}")
    return parse_config(path.read_text(), overrides, source=str(path))


def config_to_dict(config: Any) -> Any:
    """A plain-data view of a config (dicts, lists, scalars), fit for YAML or JSON."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {k: config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    return config


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML text that :func:`parse_config` reads back equal."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
