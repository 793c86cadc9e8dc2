"""Checks ``rlfleet run`` makes before it starts actors, and the resume adjustments.

Runs on the driver; pure functions of the config (and, for resume, of the buffer's
schema on disk, for the loggers of the packages installed), so they are tested without
Ray. Split from ``job.py`` so that the run's main loop reads on its own. Thread-safe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rlfleet.launch.config import ConfigError, RunConfig
from rlfleet.launch.loggers import import_logger_module

__all__ = [
    "CPUS_PER_COLLECTOR",
    "CPUS_PER_LEARNER",
    "FORMAT_2_STEP_KEYS",
    "buffer_schema",
    "check_loggers",
    "check_placement",
    "check_resume_schema",
    "check_runtime_env",
    "required_resources",
    "resume_exploration",
]

# What the collectors write under "next" besides the observation (buffer format 2,
# DESIGN.md "Data"): per-row shape and dtype. Format 1 had them at the root, shape [].
FORMAT_2_STEP_KEYS = {
    "reward": ((1,), "float32"),
    "terminated": ((1,), "bool"),
    "truncated": ((1,), "bool"),
    "done": ((1,), "bool"),
}

# Logical CPUs each actor kind asks Ray for (shards ask for none: they mostly wait on I/O).
CPUS_PER_COLLECTOR = 1.0
CPUS_PER_LEARNER = 1.0


def required_resources(config: RunConfig) -> dict[str, float]:
    """Ray resources the run's learners and collectors ask for, e.g. ``{"CPU": 3.0}``."""
    need = {"CPU": config.collector.num_workers * CPUS_PER_COLLECTOR + config.learner.num_learners * CPUS_PER_LEARNER}
    gpus = config.collector.num_workers * config.collector.num_gpus
    if config.learner.device.startswith("cuda"):
        gpus += config.learner.num_learners
    if gpus:
        need["GPU"] = gpus
    return need


def check_placement(config: RunConfig, resources: dict[str, float]) -> None:
    """Refuse a run whose learners and collectors cannot fit the cluster's resources.

    Args:
        config: the run.
        resources: the cluster's total resources (``ray.cluster_resources()``).

    Raises:
        ValueError: naming the resource that is short, what the run needs and what the
            cluster has, and the settings that change it.
    """
    need = required_resources(config)
    for resource, amount in need.items():
        have = float(resources.get(resource, 0.0))
        if amount > have + 1e-9:
            parts = []
            if resource == "CPU":
                parts.append(f"{config.collector.num_workers} collector(s) x {CPUS_PER_COLLECTOR:g}")
                parts.append(f"{config.learner.num_learners} learner(s) x {CPUS_PER_LEARNER:g}")
                fix = "lower collector.num_workers or learner.num_learners, or add nodes"
            else:
                if config.learner.device.startswith("cuda"):
                    parts.append(f"{config.learner.num_learners} learner(s) x 1")
                if config.collector.num_gpus:
                    parts.append(f"{config.collector.num_workers} collector(s) x {config.collector.num_gpus:g}")
                fix = "lower learner.num_learners or collector.num_gpus, use learner.device=cpu, or add GPU nodes"
            raise ValueError(
                f"placement: the run needs {amount:g} {resource} ({' + '.join(parts)}) but the "
                f"cluster has {have:g} {resource}; {fix}"
            )


def check_loggers(config: RunConfig) -> None:
    """Import the packages of ``run.loggers`` now, seconds into the run, not after start-up.

    Raises:
        LoggerError: a package is missing, naming the extra to install
            (``pip install "rlfleet[tensorboard]"``).
    """
    for name in config.run.loggers:
        import_logger_module(name)


def check_runtime_env(config: RunConfig) -> None:
    """Have Ray check ``ray.runtime_env`` before the run starts Ray with it.

    Raises:
        ConfigError: a field Ray refuses (``env_vars`` values that are not strings, a
            ``working_dir`` that does not exist, ...), in Ray's words.
    """
    if config.ray.runtime_env is None:
        return
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**config.ray.runtime_env)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"ray.runtime_env: {e}") from None


def resume_exploration(config: RunConfig, frames_done: int) -> RunConfig:
    """Continue the exploration schedule where the stopped run left it."""
    exploration = config.collector.exploration
    per_actor = frames_done // config.collector.num_workers
    if exploration.frames > 0:
        fraction = min(1.0, per_actor / exploration.frames)
        exploration = dataclasses.replace(
            exploration,
            start=exploration.start + (exploration.end - exploration.start) * fraction,
            frames=max(0, exploration.frames - per_actor),
        )
    collector = dataclasses.replace(config.collector, init_random_frames=0, exploration=exploration)
    return dataclasses.replace(config, collector=collector)


def check_resume_schema(schema: dict | None, observation_space: Any, action_space: Any, where: str) -> None:
    """Refuse to resume into a buffer whose rows the current env cannot produce.

    The collectors write buffer format 2 (TorchRL's layout); a buffer of format-1 rows
    (reward and flags at the root) is refused too, since no batch of the new layout
    fits its schema (and the buffer opens such a directory read-only until upgraded).

    Raises:
        SchemaMismatch: naming the key, what the buffer holds and what the env gives.
    """
    import numpy as np

    from rlfleet.buffer.errors import SchemaMismatch

    if not schema:
        return
    if any((key,) in schema for key in FORMAT_2_STEP_KEYS):
        raise SchemaMismatch(
            f"resume: the buffer at {where} holds format-1 rows (reward and flags at the root) and "
            "this rlfleet writes format 2 (TorchRL's layout: 'next.reward', 'next.done', ...); "
            f"migrate it in place with `rlfleet check --upgrade {where}`, or start a new run"
        )
    expect = {
        ("observation",): (tuple(observation_space.shape), np.dtype(observation_space.dtype)),
        ("next", "observation"): (tuple(observation_space.shape), np.dtype(observation_space.dtype)),
        **{("next", key): (shape, np.dtype(dtype)) for key, (shape, dtype) in FORMAT_2_STEP_KEYS.items()},
    }
    if getattr(action_space, "shape", None) is not None:
        expect[("action",)] = (tuple(action_space.shape), None)
    for key, (shape, dtype) in expect.items():
        if key not in schema:
            raise SchemaMismatch(
                f"resume: the buffer at {where} has no key {'.'.join(key)!r}; it was written by "
                "another kind of run; start a new run instead of resuming"
            )
        have_shape, have_dtype = schema[key]
        have_shape = tuple(have_shape)
        if have_shape != shape or (dtype is not None and np.dtype(have_dtype) != dtype):
            got = f"{list(have_shape)} {np.dtype(have_dtype)}"
            want = f"{list(shape)} {dtype if dtype is not None else ''}".strip()
            raise SchemaMismatch(
                f"resume: key {'.'.join(key)!r} of the buffer at {where} is {got} but the env "
                f"gives {want}; resume with the run's own env settings (config.yaml) or start a new run"
            )


def buffer_schema(buffer_path: Path) -> dict | None:
    from rlfleet.buffer import ReplayBuffer

    shard = buffer_path / "shard-0"
    if not shard.exists():
        return None
    rb = ReplayBuffer.open(shard)
    try:
        return rb.schema
    finally:
        rb.close()
