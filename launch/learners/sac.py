"""SAC loss: twin Q critics with Polyak targets, a tanh-Gaussian actor, learned temperature.

Read top to bottom, one learner step (``SACLoss.update``) is::

    y = r + gamma * (1 - terminated) * (min Q'(s', a') - alpha * log pi(a'|s'))   a' ~ pi(s')
    critic:  (Q1(s, a) - y)^2 + (Q2(s, a) - y)^2            -> critic optimizer
    actor:   alpha * log pi(a~|s) - min Q(s, a~), a~ ~ pi(s) -> actor optimizer (critics frozen)
    alpha:   -log_alpha * (log pi(a~|s) + target_entropy)   -> temperature optimizer
    Q' <- (1 - tau) Q' + tau Q

The actor is the collectors' policy module (``build_policy`` of a ``Box`` action space:
``[B, *obs] -> (mean [B, A], log_std [B, A])``; an action is ``tanh(N(mean, std))``
rescaled to the box), so its ``state_dict`` loads into collectors as is. The critics see
actions in the tanh range ``[-1, 1]``: stored (box-scaled) actions are mapped back
before they enter a critic. Runs on a learner rank; not thread-safe.

A batch is a TensorDict ``[B]`` in TorchRL's layout (buffer format 2, DESIGN.md
"Data") with ``observation``, ``action`` (box units, ``[B, A]``), ``("next",
"observation")``, ``("next", "reward")`` (``[B, 1]``), ``("next", "terminated")``
(bool ``[B, 1]``), optionally ``weight`` (prioritized replay) and ``("next",
"discount")`` (an n-step sample: ``gamma ** k`` per row, used in place of ``gamma``). Only ``terminated``
stops the bootstrap; truncation does not.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

__all__ = ["SACLoss", "TwinQ"]

# log_std is clamped to this range: narrower explodes log-probs, wider wastes samples.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class TwinQ(nn.Module):
    """Two independent MLP critics ``(obs [B, D], action [B, A]) -> ([B], [B])``."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...] = (256, 256)) -> None:
        super().__init__()
        self.q1 = self._mlp(obs_dim + action_dim, hidden)
        self.q2 = self._mlp(obs_dim + action_dim, hidden)

    @staticmethod
    def _mlp(in_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, 1))
        return nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs.flatten(1).float(), action], dim=1)
        return self.q1(x).squeeze(1), self.q2(x).squeeze(1)


class SACLoss(nn.Module):
    """Soft actor-critic with its own critics, target critics, temperature and optimizers.

    Runs on a learner rank. Not thread-safe.

    Args:
        actor: the policy module ``[B, *obs] -> (mean, log_std)`` (``self.actor``).
        observation_space: a gymnasium ``Box`` with 1-D observations.
        action_space: a gymnasium ``Box``; bounds rescale the actor's tanh output.
        hidden: critic layer widths.
        gamma: discount in ``[0, 1]``.
        tau: Polyak coefficient of the target critics, in ``(0, 1]``.
        lr: Adam learning rate of actor, critics and temperature.
        init_alpha: initial temperature, ``> 0``.
        target_entropy: entropy the temperature steers to; ``None`` = ``-action_dim``.
        grad_clip: max global gradient norm per network; ``0`` disables clipping.
    """

    def __init__(
        self,
        actor: nn.Module,
        observation_space: Any,
        action_space: Any,
        *,
        hidden: tuple[int, ...] = (256, 256),
        gamma: float = 0.99,
        tau: float = 0.005,
        lr: float = 3e-4,
        init_alpha: float = 1.0,
        target_entropy: float | None = None,
        grad_clip: float = 0.0,
    ) -> None:
        super().__init__()
        obs_shape = tuple(observation_space.shape)
        if len(obs_shape) != 1:
            raise ValueError(
                f"SACLoss: observation shape {obs_shape} is not 1-D; SAC here supports flat "
                "observations only (flatten them with an env wrapper)"
            )
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"SACLoss: gamma={gamma} is outside [0, 1]; use e.g. 0.99")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"SACLoss: tau={tau} must be in (0, 1]; use e.g. 0.005")
        if init_alpha <= 0:
            raise ValueError(f"SACLoss: init_alpha={init_alpha} must be > 0; use e.g. 1.0")
        action_dim = int(np.prod(action_space.shape))
        low = torch.as_tensor(np.asarray(action_space.low, dtype=np.float32).reshape(-1))
        high = torch.as_tensor(np.asarray(action_space.high, dtype=np.float32).reshape(-1))
        self.actor = actor
        self.critic = TwinQ(obs_shape[0], action_dim, tuple(hidden))
        self.target_critic = copy.deepcopy(self.critic)
        self.target_critic.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_alpha), dtype=torch.float32))
        self.register_buffer("action_center", (high + low) / 2)
        self.register_buffer("action_half", (high - low) / 2)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.grad_clip = float(grad_clip)
        self.target_entropy = float(-action_dim if target_entropy is None else target_entropy)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=lr)
        # Gradient-carrying forwards go through these (DDP wrappers once distributed);
        # plain attributes, not submodules, so state_dict keys stay those of the nets.
        self.__dict__["_actor_forward"] = self.actor
        self.__dict__["_critic_forward"] = self.critic
        self.__dict__["_process_group"] = None
        self.__dict__["_distributed"] = False

    @property
    def policy(self) -> nn.Module:
        """The module whose weights the collectors run (the actor)."""
        return self.actor

    @property
    def alpha(self) -> torch.Tensor:
        """The current temperature (detached)."""
        return self.log_alpha.detach().exp()

    def distribute(self, device_ids: list[int] | None = None, process_group: Any = None) -> None:
        """Wrap actor and critics in DDP (every rank, after the group is formed).

        DDP copies rank 0's parameters to every rank; the temperature and target critics
        are broadcast from rank 0 here too, so all ranks start identical.
        """
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        self.__dict__["_actor_forward"] = DistributedDataParallel(
            self.actor, device_ids=device_ids, process_group=process_group
        )
        self.__dict__["_critic_forward"] = DistributedDataParallel(
            self.critic, device_ids=device_ids, process_group=process_group
        )
        with torch.no_grad():
            dist.broadcast(self.log_alpha.data, src=0, group=process_group)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.__dict__["_process_group"] = process_group
        self.__dict__["_distributed"] = True

    def _sample_action(self, actor: nn.Module, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised tanh-Gaussian action in ``[-1, 1]`` and its log-probability ``[B]``."""
        mean, log_std = actor(obs)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)
        a = torch.tanh(u)
        # Gaussian log-density of u, minus log|d tanh/du| (written stably as below).
        log_prob = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(1)
        log_prob = log_prob - (2 * (math.log(2.0) - u - F.softplus(-2 * u))).sum(1)
        return a, log_prob

    def _to_unit(self, action: torch.Tensor) -> torch.Tensor:
        action = action.reshape(action.shape[0], -1).float()
        return ((action - self.action_center) / self.action_half).clamp(-1.0, 1.0)

    def forward(self, batch: TensorDict) -> dict[str, torch.Tensor]:
        """Critic loss and TD errors on ``batch`` (no optimizer step).

        Returns a dict with ``critic_loss`` (scalar) and ``td_error`` (``[B]``, detached).
        """
        obs = batch["observation"].float()
        action = self._to_unit(batch["action"])
        reward = batch["next", "reward"].reshape(-1).float()
        not_terminated = (~batch["next", "terminated"].reshape(-1).bool()).float()
        with torch.no_grad():
            next_action, next_log_prob = self._sample_action(self.actor, batch["next", "observation"].float())
            q1_next, q2_next = self.target_critic(batch["next", "observation"], next_action)
            soft_value = torch.min(q1_next, q2_next) - self.alpha * next_log_prob
            # an n-step sample (buffer sampler n_step) carries its own gamma ** k per row
            discount = batch.get(("next", "discount"), None)
            discount = self.gamma if discount is None else discount.reshape(-1).float()
            target = reward + discount * not_terminated * soft_value
        q1, q2 = self._critic_forward(obs, action)
        per_row = F.mse_loss(q1, target, reduction="none") + F.mse_loss(q2, target, reduction="none")
        weight = batch.get("weight", None)
        if weight is not None:
            per_row = per_row * weight.reshape(-1).float()
        td_error = (target - torch.min(q1, q2)).detach()
        return {"critic_loss": per_row.mean(), "td_error": td_error, "q_mean": q1.detach().mean()}

    def update(self, batch: TensorDict, step: int) -> tuple[dict[str, float], torch.Tensor]:
        """One SAC step (critics, actor, temperature, target critics) on ``batch``.

        Returns:
            ``(metrics, td_error)``: scalar metrics and ``[B]`` detached TD errors.
        """
        critic = self(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic["critic_loss"].backward()
        self._clip(self.critic.parameters())
        self.critic_optimizer.step()

        # Critics are frozen for the actor loss: their DDP reducer must not see gradients.
        self.critic.requires_grad_(False)
        obs = batch["observation"].float()
        action, log_prob = self._sample_action(self._actor_forward, obs)
        q1, q2 = self.critic(obs, action)
        actor_loss = (self.alpha * log_prob - torch.min(q1, q2)).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self._clip(self.actor.parameters())
        self.actor_optimizer.step()
        self.critic.requires_grad_(True)

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy).mean())
        self.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        if self._distributed:
            import torch.distributed as dist

            # One scalar: averaging it by hand is simpler than a third DDP wrapper.
            dist.all_reduce(self.log_alpha.grad, group=self._process_group)
            self.log_alpha.grad /= dist.get_world_size(self._process_group)
        self.alpha_optimizer.step()

        with torch.no_grad():
            for p_target, p in zip(self.target_critic.parameters(), self.critic.parameters(), strict=True):
                p_target.lerp_(p, self.tau)
        critic_loss = float(critic["critic_loss"].detach())
        metrics = {
            "loss": critic_loss,
            "critic_loss": critic_loss,
            "actor_loss": float(actor_loss.detach()),
            "alpha": float(self.alpha),
            "entropy": float(-log_prob.detach().mean()),
            "q_mean": float(critic["q_mean"]),
        }
        return metrics, critic["td_error"]

    def _clip(self, params) -> None:
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, self.grad_clip)

    def optimizer_state_dict(self) -> dict:
        """The three optimizers' states, for checkpoints."""
        return {
            "actor": self.actor_optimizer.state_dict(),
            "critic": self.critic_optimizer.state_dict(),
            "alpha": self.alpha_optimizer.state_dict(),
        }

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Restore what :meth:`optimizer_state_dict` returned."""
        self.actor_optimizer.load_state_dict(state["actor"])
        self.critic_optimizer.load_state_dict(state["critic"])
        self.alpha_optimizer.load_state_dict(state["alpha"])
