"""A policy network of the user's own: ``policy.type: "package.module:factory"``.

The factory is called as ``factory(observation_space, action_space, **policy.kwargs)`` and
returns a ``torch.nn.Module`` with the same contract as the built-in networks:

- ``Discrete`` actions (DQN): ``module(obs [B, *obs_shape]) -> q [B, n]``, column ``k``
  the value of action ``action_space.start + k``;
- 1-D ``Box`` actions (SAC): ``module(obs) -> (mean [B, A], log_std [B, A])`` of a
  Gaussian whose ``tanh`` is rescaled to the box bounds.

Observations arrive as stored: the env's dtype (float64 CartPole stays float64), so cast
inside the module. ``build_user_policy`` calls the module on two observations and checks
the output against the action space, so a wrong shape fails on the driver before any
actor starts, with the shape it got and the one it needs. Every process (driver,
collectors, learners, ``rlfleet export``) builds the module the same way, so weights,
broadcasts, checkpoints and the exported program all carry the module's own
``state_dict``. Runs anywhere; thread-safe as far as the factory is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium
import numpy as np
import torch
from torch import nn

from rlfleet.collector.user_code import import_attr

__all__ = ["build_user_policy", "is_factory_path"]


def is_factory_path(policy_type: str) -> bool:
    """Whether ``policy.type`` names a factory (``module:callable``) rather than a built-in."""
    module, sep, attr = policy_type.partition(":")
    return bool(sep and module and attr)


def build_user_policy(
    policy_type: str, kwargs: Mapping[str, Any], observation_space: gymnasium.Space, action_space: gymnasium.Space
) -> nn.Module:
    """Call the factory ``policy_type`` names and check what it returns.

    Raises:
        ValueError: the factory does not import or is not callable, fails on these
            arguments, returns no ``nn.Module``, or its output does not fit the action
            space; the message names ``policy.type``, what it got and what it needs.
    """
    factory = import_attr(policy_type, "policy.type")
    if not callable(factory):
        raise ValueError(
            f"policy.type {policy_type!r}: the module has no callable "
            f"{policy_type.partition(':')[2]!r}; name a function (or class) returning an nn.Module"
        )
    try:
        module = factory(observation_space, action_space, **dict(kwargs))
    except TypeError as e:
        raise ValueError(
            f"policy.type {policy_type!r}: calling it as factory(observation_space, "
            f"action_space, **policy.kwargs) with kwargs {dict(kwargs)!r} failed: {e}"
        ) from e
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"policy.type {policy_type!r} returned {type(module).__name__}, not a torch.nn.Module"
        )
    _check_output(policy_type, module, observation_space, action_space)
    if isinstance(action_space, gymnasium.spaces.Discrete) and not hasattr(module, "action_start"):
        # what DQN and the exported program read to map columns to actions
        module.action_start = int(action_space.start)
    return module


def _check_output(name: str, module: nn.Module, observation_space: gymnasium.Space,
                  action_space: gymnasium.Space) -> None:
    shape = tuple(getattr(observation_space, "shape", None) or ())
    dtype = getattr(observation_space, "dtype", None) or np.float32
    obs = torch.as_tensor(np.zeros((2, *shape), dtype=dtype))
    try:
        with torch.no_grad():
            out = module(obs)
    except Exception as e:
        raise ValueError(
            f"policy.type {name!r}: the module failed on a batch of 2 observations "
            f"{list(obs.shape)} {obs.dtype}: {type(e).__name__}: {e}"
        ) from e
    if isinstance(action_space, gymnasium.spaces.Discrete):
        need = [2, int(action_space.n)]
        if not isinstance(out, torch.Tensor) or list(out.shape) != need:
            raise ValueError(
                f"policy.type {name!r}: for {action_space} the module must map observations "
                f"[B, {', '.join(map(str, shape))}] to Q-values [B, {action_space.n}]; on B=2 it "
                f"returned {_describe(out)}, expected a tensor of shape {need}"
            )
        return
    if isinstance(action_space, gymnasium.spaces.Box) and len(action_space.shape) == 1:
        need = [2, int(action_space.shape[0])]
        ok = isinstance(out, (tuple, list)) and len(out) == 2 and all(
            isinstance(t, torch.Tensor) and list(t.shape) == need for t in out)
        if not ok:
            raise ValueError(
                f"policy.type {name!r}: for {action_space} the module must return (mean, "
                f"log_std), each [B, {need[1]}]; on B=2 it returned {_describe(out)}"
            )
        return
    raise ValueError(
        f"policy.type {name!r}: action space {action_space} is not supported: use a Discrete "
        "or a 1-D Box action space"
    )


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {list(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of " + ", ".join(_describe(o) for o in out)
    return type(out).__name__
