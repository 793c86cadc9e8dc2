"""Policy networks built from a ``PolicyConfig`` and the env's spaces.

Collectors and learners call the same ``build_policy`` with the same config and spaces,
so the modules are identical and a learner's ``state_dict()`` loads into a collector's
policy. ``policy.type: "package.module:factory"`` builds a network of the user's own
instead (``user_policy``). Two built-in heads:

- ``QNetwork`` for ``Discrete`` actions: ``obs [B, *obs_shape] -> q [B, n_actions]``.
- ``GaussianActor`` for 1-D ``Box`` actions: ``obs -> (mean [B, A], log_std [B, A])``;
  an action is ``tanh(z)``, ``z ~ N(mean, exp(log_std))``, rescaled to the box bounds.

Both start with an encoder chosen by the observation space: 1-D ``Box`` observations go
straight to the MLP (cast to float32); ``[C, H, W]`` uint8 images go through a small
stride-2 CNN (scaled to [0, 1]) first. Modules are plain ``nn.Module``s: not thread-safe
while training, fine to share read-only under ``torch.inference_mode``.

``acting_forward`` is the collectors' way to call them: the same computation without
``nn.Module.__call__`` around every layer, whose hook dispatch (a few microseconds per
layer) measured more than the arithmetic itself for a 4-64-64-2 MLP on 32 observations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rlfleet.collector.config import PolicyConfig
from rlfleet.collector.user_policy import build_user_policy, is_factory_path

__all__ = [
    "GaussianActor", "QNetwork", "acting_forward", "build_policy", "check_state_dict", "resolve_device",
]

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    if out_dim is not None:
        layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class _VectorEncoder(nn.Module):
    """``[B, D]`` observations of any numeric dtype -> float32 ``[B, D]``."""

    def __init__(self, obs_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_dim = int(obs_shape[0])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.to(torch.float32)


class _ToUnitFloat(nn.Module):
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]`` (no parameters)."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.to(torch.float32) / 255.0


class _ImageEncoder(nn.Module):
    """``[B, C, H, W]`` uint8 images -> float32 ``[B, F]``.

    ``nature=False`` (``policy.type: cnn``): three stride-2 3x3 convolutions with padding,
    which work for any image size and keep small test images usable. ``nature=True``
    (``policy.type: nature_cnn``): the Nature-DQN stack (Mnih et al. 2015: 32 8x8/4, 64
    4x4/2, 64 3x3/1), the usual Atari encoder, for images of at least 36x36.
    """

    def __init__(self, obs_shape: tuple[int, ...], *, nature: bool = False) -> None:
        super().__init__()
        channels = int(obs_shape[0])
        if nature:
            if min(obs_shape[1:]) < 36:
                raise ValueError(
                    f"build_policy: policy.type 'nature_cnn' needs images of at least 36x36, got "
                    f"{list(obs_shape)}; use policy.type 'cnn' for small images"
                )
            layers = [nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                      nn.Conv2d(64, 64, 3, stride=1), nn.ReLU()]
        else:
            layers = [nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU()]
        self.convs = nn.Sequential(*layers, nn.Flatten())
        self._scale = _ToUnitFloat()
        with torch.no_grad():
            self.out_dim = int(self.convs(torch.zeros(1, *obs_shape)).shape[1])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.convs(self._scale(obs))


class QNetwork(nn.Module):
    """Q-values for a ``Discrete`` action space: ``obs [B, *obs_shape] -> [B, n_actions]``.

    Column ``k`` is the value of env action ``action_start + k`` (gymnasium's
    ``Discrete(n, start=s)``).
    """

    def __init__(self, encoder: nn.Module, hidden: Sequence[int], n_actions: int, action_start: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = _mlp(encoder.out_dim, hidden, n_actions)
        self.n_actions = n_actions
        self.action_start = action_start

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs))


class GaussianActor(nn.Module):
    """A tanh-squashed Gaussian policy for a 1-D ``Box`` action space.

    ``forward(obs)`` returns ``(mean [B, A], log_std [B, A])`` of the pre-tanh Gaussian,
    ``log_std`` squashed into ``[LOG_STD_MIN, LOG_STD_MAX]``. ``rsample`` and
    ``deterministic`` return actions already rescaled to the box bounds, which is what
    the env receives and the buffer stores. The bounds are non-persistent buffers: they
    come from the action space, not from ``state_dict()``.
    """

    def __init__(self, encoder: nn.Module, hidden: Sequence[int], low: np.ndarray, high: np.ndarray) -> None:
        super().__init__()
        action_dim = int(low.shape[0])
        self.encoder = encoder
        self.trunk = _mlp(encoder.out_dim, hidden, None)
        trunk_dim = hidden[-1] if hidden else encoder.out_dim
        self.mean = nn.Linear(trunk_dim, action_dim)
        self.log_std = nn.Linear(trunk_dim, action_dim)
        self.action_dim = action_dim
        low_t = torch.as_tensor(low, dtype=torch.float32)
        high_t = torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("action_scale", (high_t - low_t) / 2.0, persistent=False)
        self.register_buffer("action_bias", (high_t + low_t) / 2.0, persistent=False)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.trunk(self.encoder(obs)))

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_std)`` from the trunk's features ``h [B, F]``."""
        log_std = torch.tanh(self.log_std.forward(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1.0)
        return self.mean.forward(h), log_std

    def scale(self, unit_action: torch.Tensor) -> torch.Tensor:
        """Map actions in ``[-1, 1]`` to the box bounds."""
        return unit_action * self.action_scale + self.action_bias

    def unscale(self, action: torch.Tensor) -> torch.Tensor:
        """Map actions in the box bounds to ``[-1, 1]``."""
        return (action - self.action_bias) / self.action_scale

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The mode of the policy, ``scale(tanh(mean))``: ``[B, A]`` in the box bounds."""
        mean, _ = self(obs)
        return self.scale(torch.tanh(mean))

    def rsample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised sample and its log-density (for SAC).

        Returns:
            ``(action [B, A] in the box bounds, log_prob [B])``; ``log_prob`` includes the
            tanh and rescaling Jacobians.
        """
        mean, log_std = self(obs)
        std = log_std.exp()
        z = mean + std * torch.randn_like(mean)
        u = torch.tanh(z)
        gauss = -0.5 * ((z - mean) / std).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = gauss - torch.log(self.action_scale * (1 - u.pow(2)) + 1e-6)
        return self.scale(u), log_prob.sum(-1)


def _layers(module: nn.Module) -> list[nn.Module]:
    """The leaf layers of nested ``nn.Sequential``s and encoders, in call order."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _layers(child)]
    if isinstance(module, _ImageEncoder):
        return [module._scale, *_layers(module.convs)]
    return [module]


def _fast_calls(layers: list[nn.Module]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Each layer's computation with the fewest Python frames (about 40% off a small MLP).

    ``Linear`` becomes ``F.linear`` on the layer's parameter tensors, taken once
    (``nn.Module`` attribute lookups cost a microsecond each; ``load_state_dict`` copies
    into these same tensors, so loaded weights apply at once), and a ``ReLU`` after
    another layer becomes an in-place ``relu_`` on that layer's fresh output (never on
    the caller's input); anything else keeps its ``forward``.
    """
    calls: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for i, layer in enumerate(layers):
        if type(layer) is nn.Linear:
            calls.append(lambda x, w=layer.weight, b=layer.bias: F.linear(x, w, b))
        elif type(layer) is nn.ReLU and i > 0 and type(layers[i - 1]) in (nn.Linear, nn.Conv2d):
            calls.append(torch.relu_)
        else:
            calls.append(layer.forward)
    return calls


def acting_forward(module: nn.Module) -> Callable[[torch.Tensor], Any]:
    """``module``'s forward pass with the least Python per call, for choosing actions.

    Runs wherever the policy acts (a collector), usually under ``torch.inference_mode``.
    For a ``QNetwork`` or ``GaussianActor`` from ``build_policy`` the result calls each
    layer's computation in turn (``_fast_calls``), skipping ``nn.Module.__call__`` (so
    forward hooks on the layers do not run); it computes exactly what ``module(obs)`` computes, and weights
    loaded later with ``load_state_dict`` apply at once (not parameters replaced by new
    objects: build it again then). Any other
    module is returned as it is. Thread-safe as far as the module is.
    """
    if isinstance(module, QNetwork) and type(module).forward is QNetwork.forward:
        calls = _fast_calls([*_layers(module.encoder), *_layers(module.head)])

        def q_values(obs: torch.Tensor) -> torch.Tensor:
            for call in calls:
                obs = call(obs)
            return obs

        return q_values
    if isinstance(module, GaussianActor) and type(module).forward is GaussianActor.forward:
        calls = _fast_calls([*_layers(module.encoder), *_layers(module.trunk)])
        heads = module.heads

        def mean_log_std(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            for call in calls:
                obs = call(obs)
            return heads(obs)

        return mean_log_std
    return module


def _encoder(policy: PolicyConfig, space: gymnasium.Space) -> nn.Module:
    shape = getattr(space, "shape", None)
    if not isinstance(space, gymnasium.spaces.Box) or shape is None:
        raise ValueError(
            f"build_policy: observation space {space} is not supported: the policies take a "
            "Box of shape [D] (vector) or [C, H, W] uint8 (image); wrap the env, e.g. with "
            "env.wrappers=['FlattenObservation'] for Dict/Tuple/Discrete observations"
        )
    if len(shape) == 3 and space.dtype == np.uint8:
        if shape[0] > 4 and shape[2] <= 4:
            raise ValueError(
                f"build_policy: image observation shape {shape} looks channels-last [H, W, C]; "
                "the CNN takes [C, H, W]: transpose the observation with a wrapper"
            )
        return _ImageEncoder(tuple(int(d) for d in shape), nature=policy.type == "nature_cnn")
    if policy.type in ("cnn", "nature_cnn"):
        raise ValueError(
            f"build_policy: policy.type {policy.type!r} needs [C, H, W] uint8 image observations, got "
            f"{space}; use policy.type 'mlp' for vector observations"
        )
    if len(shape) == 1:
        return _VectorEncoder(tuple(int(d) for d in shape))
    raise ValueError(
        f"build_policy: observation space {space} is not supported: the policies take a Box of "
        "shape [D] (vector) or [C, H, W] uint8 (image); flatten it with "
        "env.wrappers=['FlattenObservation']"
    )


def build_policy(policy: PolicyConfig, observation_space: gymnasium.Space, action_space: gymnasium.Space) -> nn.Module:
    """Build the policy network for these spaces (runs anywhere: driver, actor, learner).

    Args:
        policy: Network type and hidden widths; a ``"package.module:factory"`` type
            builds the user's own module (``rlfleet.collector.user_policy``).
        observation_space: The single env's observation space.
        action_space: The single env's action space: ``Discrete`` gives a ``QNetwork``,
            a 1-D ``Box`` with finite bounds a ``GaussianActor``.

    Returns:
        A freshly initialised module on the CPU (move it with ``.to(device)``).

    Raises:
        ValueError: A space the policies cannot handle (the message says which wrapper
            or setting fixes it), or a factory whose module does not fit the spaces.
    """
    if is_factory_path(policy.type):
        return build_user_policy(policy.type, policy.kwargs, observation_space, action_space)
    encoder = _encoder(policy, observation_space)
    if isinstance(action_space, gymnasium.spaces.Discrete):
        return QNetwork(encoder, policy.hidden, int(action_space.n), int(action_space.start))
    if isinstance(action_space, gymnasium.spaces.Box):
        if len(action_space.shape) != 1:
            raise ValueError(
                f"build_policy: action space {action_space} is not supported: a Box action "
                "space must be 1-D; flatten it with a wrapper"
            )
        low = np.asarray(action_space.low, dtype=np.float64)
        high = np.asarray(action_space.high, dtype=np.float64)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ValueError(
                f"build_policy: action space {action_space} has infinite bounds; the Gaussian "
                "actor squashes to the bounds, so clip them with "
                "env.wrappers=['ClipAction'] or a RescaleAction wrapper"
            )
        return GaussianActor(encoder, policy.hidden, low, high)
    raise ValueError(
        f"build_policy: action space {action_space} is not supported: use a Discrete or a "
        "1-D Box action space (e.g. wrap MultiDiscrete actions into one Discrete)"
    )


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Check that ``state_dict`` has exactly ``module``'s keys and shapes.

    Values may be tensors or numpy arrays (as they arrive through the object store).

    Raises:
        ValueError: Naming the missing keys, the unexpected keys, and each shape that
            differs, so weights from another config are refused before any is loaded.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: got {tuple(state_dict[k].shape)}, policy has {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes))
        raise ValueError(
            "weights do not match the policy (" + ", ".join(parts) + "); build the learner's "
            "model with build_policy and the same policy config and env spaces"
        )


def resolve_device(device: str) -> torch.device:
    """The ``torch.device`` for ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, checked in this process.

    Raises:
        ValueError: A cuda device without CUDA, or an index past the visible devices.
    """
    if device == "cpu":
        return torch.device("cpu")
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device = {device!r}: must be 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device = {device!r} but CUDA is not available in this process; use device 'cpu', "
            "or give the actor a GPU (collector.num_gpus > 0 on a cluster with GPUs)"
        )
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ValueError(
            f"device = {device!r} but only {count} CUDA device(s) are visible; use an index "
            f"below {count}"
        )
    return torch.device(device)
