"""Export a run's final policy with ``torch.export``: ``policy.pt2``, loadable without rlfleet.

The exported program maps a batch of observations to the actions the trained policy
takes, greedily (no exploration):

- ``Discrete`` actions: ``obs [B, *obs_shape] -> action int64 [B]`` (argmax of Q-values);
- ``Box`` actions: ``obs [B, *obs_shape] -> action float32 [B, A]`` (``tanh`` of the mean,
  rescaled to the box bounds).

The batch dimension is dynamic. Anyone with torch loads it with::

    policy = torch.export.load("policy.pt2").module()
    action = policy(torch.as_tensor(obs[None]))

``policy.json`` beside it records the observation shape and dtype and the action space.
Runs on the driver (``rlfleet run`` at the end, ``rlfleet export RUN_DIR`` any time);
not thread-safe with respect to the files it writes.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch
from torch import nn

from rlfleet.launch.rundir import RunDir

__all__ = ["GreedyPolicy", "export", "export_arguments", "export_policy", "export_run"]

logger = logging.getLogger(__name__)

_MAX_BATCH = 1 << 20


class GreedyPolicy(nn.Module):
    """Wraps a ``QNetwork`` or ``GaussianActor``: ``obs [B, ...] -> action`` (greedy)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.discrete = not hasattr(policy, "deterministic")
        self.action_start = int(getattr(policy, "action_start", 0))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return self.policy(obs).argmax(dim=-1) + self.action_start
        return self.policy.deterministic(obs)


def _space_info(space: gymnasium.Space) -> dict[str, Any]:
    if isinstance(space, gymnasium.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start), "dtype": "int64"}
    if isinstance(space, gymnasium.spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": np.asarray(space.low).tolist() if space.low.size <= 64 else None,
            "high": np.asarray(space.high).tolist() if space.high.size <= 64 else None,
        }
    return {"type": type(space).__name__}


def export_policy(
    policy: nn.Module,
    observation_space: gymnasium.Space,
    action_space: gymnasium.Space,
    path: str | os.PathLike,
) -> dict[str, Any]:
    """Export ``policy`` (from ``build_policy``) greedily to ``path`` with ``torch.export``.

    Args:
        policy: a ``QNetwork`` or ``GaussianActor`` holding the trained weights (any device;
            it is exported from a CPU copy).
        observation_space: the single env's observation space (shape and dtype of input).
        action_space: the single env's action space (recorded in the returned info).
        path: the ``.pt2`` file to write.

    Returns:
        A description of the program's input and output (what ``policy.json`` holds).

    Raises:
        RuntimeError: ``torch.export`` could not trace the policy (the message says why).
    """
    path = Path(path)
    # A frozen CPU copy: the program's outputs then carry no autograd history.
    module = GreedyPolicy(copy.deepcopy(policy)).to("cpu").eval().requires_grad_(False)
    dtype = getattr(observation_space, "dtype", np.float32)
    example = np.stack([observation_space.sample() for _ in range(2)]).astype(dtype)
    obs = torch.as_tensor(example)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    try:
        with torch.no_grad():
            program = torch.export.export(module, (obs,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch raises many types here; name the step in our words
        raise RuntimeError(f"export: torch.export could not trace the policy {type(policy).__name__}: {e}") from e
    tmp = path.with_name(path.stem + ".tmp.pt2")
    torch.export.save(program, tmp)
    os.replace(tmp, path)
    return {
        "file": path.name,
        "load": f"torch.export.load({path.name!r}).module()",
        "input": {"name": "observation", "shape": ["B", *observation_space.shape], "dtype": str(obs.dtype)},
        "output": "action int64 [B]" if module.discrete else "action float32 [B, A]",
        "observation_space": _space_info(observation_space),
        "action_space": _space_info(action_space),
        "policy": type(policy).__name__,
    }


def load_policy_state(run_dir: RunDir) -> dict[str, torch.Tensor]:
    """The run's final policy ``state_dict`` (``policy_state.pt``), loaded weights-only.

    Raises:
        FileNotFoundError: the run wrote no final policy (it never reached a learner step).
        pickle.UnpicklingError: the file holds more than tensors (pickled code, objects):
            refused, never executed.
    """
    path = run_dir.policy_state_path
    if not path.exists():
        raise FileNotFoundError(
            f"export: {str(path)!r} does not exist: the run saved no policy "
            "yet; continue it with `rlfleet run --resume RUN_DIR` and export when it stops"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f"export: {str(path)!r} holds more than a state_dict of tensors (Weights only load "
            f"failed: {str(e).splitlines()[0]}); it was refused and nothing in it ran. Use a "
            f"policy_state.pt that rlfleet wrote, or re-save it as a plain state_dict"
        ) from e


def export_run(path: str | os.PathLike) -> Path:
    """Rebuild the run's policy from its config and final weights, and export it.

    Runs on the driver. Writes ``policy.pt2`` and ``policy.json`` into the run directory.

    Returns:
        The path of ``policy.pt2``.

    Raises:
        FileNotFoundError: not a run directory, or no final policy in it.
    """
    from rlfleet.collector.envs import make_env
    from rlfleet.collector.policies import build_policy

    run_dir = RunDir.open(path)
    config = run_dir.read_config()
    state = load_policy_state(run_dir)
    env = make_env(config.env, seed=config.seed)
    try:
        observation_space, action_space = env.observation_space, env.action_space
    finally:
        env.close()
    policy = build_policy(config.policy, observation_space, action_space)
    policy.load_state_dict(state)
    info = export_policy(policy, observation_space, action_space, run_dir.policy_path)
    run_dir.write_policy_info(info)
    logger.info("exported %s", run_dir.policy_path)
    return run_dir.policy_path


def export_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``rlfleet export``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `rlfleet run`")


def export(args: argparse.Namespace) -> int:
    """``rlfleet export RUN_DIR``: re-export the run's final policy to ``RUN_DIR/policy.pt2``."""
    try:
        path = export_run(args.run_dir)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"rlfleet export: {e}", file=sys.stderr)
        return 1
    print(f"exported {path}")
    print(f"load it with: torch.export.load({str(path)!r}).module()")
    return 0
