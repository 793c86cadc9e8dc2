"""Export a run's final policy with ``torch.export``: ``policy.pt2``, loadable without rlfleet.

The exported program maps a batch of observations to the actions the trained policy
takes, greedily (no exploration):

- ``Discrete`` actions: ``obs [B, *obs_shape] -> action int64 [B]`` (argmax of Q-values);
- ``Box`` actions: ``obs [B, *obs_shape] -> action float32 [B, A]`` (``tanh`` of the mean,
  rescaled to the box bounds).

The batch dimension is dynamic; the rank and the dtype are not (``torch.export`` fixes
them), so the program takes a batch in the observation space's dtype. Anyone with torch
loads it with::

    policy = torch.export.load("policy.pt2").module()
    actions = policy(torch.as_tensor(obs_batch, dtype=torch.float32))   # [B, *obs_shape]
    action = policy(torch.as_tensor(obs, dtype=torch.float32)[None])[0]  # one observation

With rlfleet installed, :func:`load_exported` wraps the same program so that it takes one
observation or a batch, as numpy or torch, in any float dtype (float64 included), and
says what to pass when the shape fits neither.

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

__all__ = ["ExportedPolicy", "GreedyPolicy", "export", "export_arguments", "export_policy", "export_run",
           "load_exported"]

logger = logging.getLogger(__name__)

_MAX_BATCH = 1 << 20


class GreedyPolicy(nn.Module):
    """``obs [B, ...] -> action`` (greedy) around any policy module of the run.

    ``Discrete``: argmax of the Q-values plus the space's ``start``. ``Box``: the mode of
    the squashed Gaussian, ``tanh(mean)`` rescaled to the box bounds (what
    ``GaussianActor.deterministic`` computes; a network of the user's own returns
    ``(mean, log_std)`` the same way).
    """

    def __init__(self, policy: nn.Module, action_space: gymnasium.Space) -> None:
        super().__init__()
        self.policy = policy
        self.discrete = isinstance(action_space, gymnasium.spaces.Discrete)
        if self.discrete:
            self.action_start = int(action_space.start)
        else:
            low = torch.as_tensor(np.asarray(action_space.low), dtype=torch.float32)
            high = torch.as_tensor(np.asarray(action_space.high), dtype=torch.float32)
            self.register_buffer("scale", (high - low) / 2.0)
            self.register_buffer("bias", (high + low) / 2.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return self.policy(obs).argmax(dim=-1) + self.action_start
        mean = self.policy(obs)[0]
        return torch.tanh(mean) * self.scale + self.bias


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
        policy: the run's policy module (``build_policy``: a ``QNetwork``, a
            ``GaussianActor`` or a network of the user's own) holding the trained
            weights (any device; it is exported from a CPU copy).
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
    module = GreedyPolicy(copy.deepcopy(policy), action_space).to("cpu").eval().requires_grad_(False)
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


class ExportedPolicy:
    """An exported ``policy.pt2`` for acting: one observation or a batch, any float dtype.

    Runs wherever it is loaded; thread-safe as far as the program is (no state).

    Args:
        path: ``policy.pt2``, or the run directory holding it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / RunDir(path).policy_path.name
        if not path.is_file():
            raise FileNotFoundError(f"load_exported: {str(path)!r} does not exist; export it with `rlfleet export RUN_DIR`")
        self.path = path
        exported = torch.export.load(path)
        self.program = exported.module()
        placeholder = next(n for n in exported.graph.nodes if n.op == "placeholder"
                           and n.name in exported.graph_signature.user_inputs)
        example = placeholder.meta["val"]
        self.obs_shape = tuple(int(d) for d in example.shape[1:])
        self.dtype: torch.dtype = example.dtype

    def __call__(self, obs: Any) -> torch.Tensor:
        """The greedy action of one observation ``[*obs_shape]`` (action ``[]`` or ``[A]``)
        or of a batch ``[B, *obs_shape]`` (actions ``[B]`` or ``[B, A]``).

        Raises:
            ValueError: a shape that is neither, or floats for an integer (image) space.
        """
        x = obs if isinstance(obs, torch.Tensor) else torch.as_tensor(np.asarray(obs))
        single = tuple(x.shape) == self.obs_shape
        if not single and tuple(x.shape[1:]) != self.obs_shape:
            want = ", ".join(map(str, self.obs_shape))
            raise ValueError(
                f"{self.path.name}: observation of shape {list(x.shape)}: pass one observation "
                f"of shape [{want}] or a batch [B, {want}]"
            )
        if x.dtype != self.dtype:
            if x.is_floating_point() and not self.dtype.is_floating_point:
                raise ValueError(
                    f"{self.path.name}: observation of dtype {x.dtype}: the policy takes "
                    f"{self.dtype} observations, as the env gives them; pass those"
                )
            x = x.to(self.dtype)
        with torch.no_grad():
            out = self.program(x[None] if single else x)
        return out[0] if single else out


def load_exported(path: str | os.PathLike) -> ExportedPolicy:
    """Load ``policy.pt2`` (or a run directory's) as an :class:`ExportedPolicy`."""
    return ExportedPolicy(path)


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
    print(f"load it with: torch.export.load({str(path)!r}).module() (a batch [B, *obs_shape]), "
          "or rlfleet.launch.export.load_exported(path) (one observation or a batch)")
    return 0
