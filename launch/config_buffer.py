"""The ``buffer`` section of a run config (buffer, sampler, n-step, rate limiter), and
the bridge every section uses to run an option's own check (``_checked_by``).

Split from ``config.py``, which composes the sections into ``RunConfig``; the values
are judged by the buffer's own checks (``check_sampler``, ``parse_capacity``,
``RateLimiterSpec``), so YAML, overrides and the Python API share one grammar. Plain
frozen dataclasses: immutable, thread-safe, picklable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rlfleet.buffer.capacity import parse_capacity
from rlfleet.buffer.rate_limiter import RateLimiterSpec
from rlfleet.buffer.sampling import check_n_step, check_sampler
from rlfleet.launch.config_loader import ConfigError, check_choices

__all__ = ["BufferConfig", "NStepConfig", "RateLimiterConfig", "SamplerConfig", "stacking_wrapper"]

FRAME_STACK_WRAPPERS = ("FrameStackObservation", "gymnasium.wrappers:FrameStackObservation")


def stacking_wrapper(env: Any) -> dict[str, Any] | None:
    """The kwargs of the env's last wrapper when it is gymnasium's ``FrameStackObservation``
    (its observations are then ``[stack_size, *frame]`` stacks), else None."""
    wrappers = tuple(getattr(env, "wrappers", ()) or ())
    if not wrappers:
        return None
    last = wrappers[-1]
    name = last.get("type") if isinstance(last, dict) or hasattr(last, "get") else last
    if name not in FRAME_STACK_WRAPPERS:
        return None
    return {k: v for k, v in last.items() if k != "type"} if hasattr(last, "items") else {}


def _checked_by(check: Callable[..., Any], *args: Any, words: tuple[str, str] = ("", "")) -> Any:
    """``check(*args)``, an option's own check (the buffer's), its ``ValueError`` turned
    into a ``ConfigError``.

    The message keeps the option, the value and the fix. ``words``: how the check names
    the option at the start of its message and how this section names it, since the
    loader puts the section's path in front (``rate_limiter.timeout_s=0`` becomes
    ``buffer.rate_limiter.timeout_s=0``).
    """
    try:
        return check(*args)
    except ConfigError:
        raise
    except ValueError as e:
        message, (theirs, ours) = str(e), words
        if theirs and message.startswith(theirs):
            message = ours + message[len(theirs):]
        raise ConfigError(message) from None


def _positive(section_field: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        limit = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section_field}: {value!r} must be {limit}")


@dataclass(frozen=True)
class NStepConfig:
    """n-step transitions rebuilt at sample time (``rlfleet.buffer.nstep``).

    Attributes:
        n: steps per transition (fewer where the episode ends sooner).
        gamma: discount of the summed rewards and of ``next.discount``; null: ``learner.gamma``.
    """

    n: int = 3
    gamma: float | None = None

    def __post_init__(self) -> None:
        _checked_by(check_n_step, {"n": self.n, "gamma": 0.99 if self.gamma is None else self.gamma},
                    words=("sampler n_step ", ""))


@dataclass(frozen=True)
class SamplerConfig:
    """How learners draw rows. Written ``{type: prioritized, alpha: 0.6}`` or just ``uniform``.

    The values are checked by the buffer's own ``rlfleet.buffer.sampling.check_sampler``.

    Attributes:
        type: uniform | without_replacement | prioritized | sequence.
        alpha: priority exponent (prioritized only).
        beta: importance-weight exponent (prioritized only).
        length: rows per slice (sequence only).
        n_step: ``{n: 3, gamma: 0.99}``: every sample is an n-step transition (any type;
            the learner bootstraps with its ``next.discount``); null: one-step rows.
    """

    type: Literal["uniform", "without_replacement", "prioritized", "sequence"] = "uniform"
    alpha: float = 0.6
    beta: float = 0.4
    length: int = 8
    n_step: NStepConfig | None = None

    def __post_init__(self) -> None:
        check_choices(self)
        # every value is checked, also those the chosen type ignores, under the type owning it
        for owner in ({"type": "prioritized", "alpha": self.alpha, "beta": self.beta},
                      {"type": "sequence", "length": self.length}):
            _checked_by(check_sampler, owner, words=("sampler ", ""))

    def to_mapping(self) -> dict[str, Any]:
        """The sampler as ``ReplayService.launch``/``ReplayBuffer.create`` take it.

        Only the parameters of the chosen type are included.
        """
        if self.type == "prioritized":
            out: dict[str, Any] = {"type": "prioritized", "alpha": self.alpha, "beta": self.beta}
        elif self.type == "sequence":
            out = {"type": "sequence", "length": self.length}
        else:
            out = {"type": self.type}
        if self.n_step is not None:  # gamma is filled from learner.gamma by RunConfig
            out["n_step"] = {"n": self.n_step.n, "gamma": self.n_step.gamma}
        return out


@dataclass(frozen=True)
class RateLimiterConfig(RateLimiterSpec):
    """Reverb-style rate limiter: the buffer's own ``RateLimiterSpec``, which checks its
    values, with the run's default ``min_size_to_sample``.

    Attributes:
        min_size_to_sample: rows held before sampling is allowed (the buffer's total
            when the limiter is buffer-wide, else each shard's).
        samples_per_insert: target ratio of sampled to inserted rows (None: no ratio).
        error_margin: tolerance around the ratio, in rows.
        timeout_s: longest a blocked insert or sample waits before raising.
    """

    min_size_to_sample: int = 5000

    def __post_init__(self) -> None:
        _checked_by(self.validate, words=("rate_limiter.", ""))  # the spec's own check


@dataclass(frozen=True)
class BufferConfig:
    """The run's replay service.

    Attributes:
        path: directory of the buffer (None: ``<run dir>/buffer``).
        capacity: total rows over all shards, or a size string such as "500GB" (the
            buffer's own grammar: ``rlfleet.buffer.capacity.parse_capacity``).
        num_shards: shard actors; capacity is split evenly over them.
        sampler: see :class:`SamplerConfig`.
        rate_limiter: see :class:`RateLimiterConfig`.
        durability: process | fsync.
        placement: spread | pack (how shards are placed over nodes).
        node_resource: a custom Ray resource naming the nodes that may hold shards
            (e.g. ``rlfleet_buffer``, as the cluster files declare it); None: any node.
        overcommit: allow a capacity beyond the free disk (sparse files).
        frame_stack: whether observations are frame stacks stored one frame per row
            (``rlfleet.buffer.frames``): ``auto`` (when the env's wrappers end in
            gymnasium's ``FrameStackObservation``, with its ``padding_type``), ``reset`` or
            ``zero`` (declared, with that padding), or ``off`` (stacks stored as they come).
    """

    path: str | None = None
    capacity: int | str = 1_000_000
    num_shards: int = 1
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rate_limiter: RateLimiterConfig = field(default_factory=RateLimiterConfig)
    durability: Literal["process", "fsync"] = "process"
    placement: Literal["spread", "pack"] = "spread"
    node_resource: str | None = None
    overcommit: bool = False
    frame_stack: Literal["auto", "reset", "zero", "off"] = "auto"

    def __post_init__(self) -> None:
        # one grammar for YAML, overrides and the Python API: the buffer's
        _checked_by(parse_capacity, self.capacity, words=("capacity=", "capacity: "))
        _positive("num_shards", self.num_shards)
        check_choices(self)
        if self.node_resource is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", self.node_resource):
            raise ConfigError(
                f"node_resource: {self.node_resource!r} is not a Ray resource name (e.g. 'rlfleet_buffer')"
            )

    def service_kwargs(self, env: Any = None, observation_space: Any = None) -> dict[str, Any]:
        """Keyword arguments for ``ReplayService.launch`` besides ``name``, ``path`` and
        where the shards run (``nodes``, ``detached``, ``seed``, ``namespace``);
        ``env`` (the run's ``EnvConfig``) and its ``observation_space`` decide
        ``frame_stack: auto`` (``frame_stack_spec``)."""
        return {
            "frame_stack": self.frame_stack_spec(env, observation_space),
            "capacity": self.capacity,
            "num_shards": self.num_shards,
            "sampler": self.sampler.to_mapping(),
            "rate_limiter": self.rate_limiter.to_mapping(),
            "durability": self.durability,
            "placement": self.placement,
            "overcommit": self.overcommit,
        }

    def frame_stack_spec(self, env: Any = None, observation_space: Any = None) -> dict[str, Any] | None:
        """``ReplayBuffer.create``'s ``frame_stack`` for this config and the run's env.

        ``auto`` is on for an env whose last wrapper is ``FrameStackObservation``, and
        for an EnvPool env (``vectorization: envpool``) whose ``observation_space`` (when
        given) is uint8 ``[stack_num, H, W]`` with ``stack_num`` (``env.kwargs``, EnvPool's
        Atari default 4) above 1: EnvPool's Atari stacks pad a reset with its first frame.

        Raises:
            ConfigError: ``auto`` meets a ``FrameStackObservation`` whose padding the
                buffer cannot rebuild (a custom padding observation).
        """
        if self.frame_stack == "off":
            return None
        if self.frame_stack in ("reset", "zero"):
            spec = {"key": "observation", "padding": self.frame_stack}
        elif getattr(env, "vectorization", None) == "envpool":
            stack = int(dict(env.kwargs).get("stack_num", 4))
            shape = getattr(observation_space, "shape", None)
            if stack < 2 or shape is None or len(shape) != 3 or shape[0] != stack \
                    or getattr(observation_space, "dtype", None) != "uint8":
                return None
            spec = {"key": "observation", "padding": "reset"}
        else:
            stacking = stacking_wrapper(env)
            if stacking is None:
                return None
            spec = {"key": "observation", "padding": stacking.get("padding_type", "reset")}
        if spec["padding"] not in ("reset", "zero"):
            raise ConfigError(
                f"buffer.frame_stack: auto found FrameStackObservation with padding_type={spec['padding']!r}, "
                f"which the buffer cannot rebuild; use padding_type 'reset' or 'zero', or set "
                f"buffer.frame_stack=off to store the stacks as they come"
            )
        return spec
