"""DQN loss: double DQN, a target network, Huber loss, optional n-step returns.

Read top to bottom, one learner step (``DQNLoss.update``) is::

    out = loss(batch)                 # TD targets from the target net, Huber on the online net
    out.loss.backward(); clip; optimizer.step()   # DDP averages gradients across ranks
    loss.after_step(step)             # hard copy every ``target_update_every`` steps (or Polyak)
    # the Learner then writes |td_error| back as priorities (prioritized replay)

The online Q-network is the collectors' policy module (``build_policy`` of a discrete
action space: ``[B, *obs] -> [B, n_actions]``), so its ``state_dict`` loads into a
collector as is. Runs on a learner rank; not thread-safe (one step at a time).

Batches are in TorchRL's layout (buffer format 2, DESIGN.md "Data"):
- ``n_step == 1``: a TensorDict ``[B]`` with ``observation``, ``action`` (int64 ``[B]``),
  ``("next", "observation")``, ``("next", "reward")`` (``[B, 1]``) and
  ``("next", "terminated")`` (bool ``[B, 1]``); optionally ``weight`` (importance
  weights of prioritized replay, already normalised). A sampler with ``n_step`` (the
  buffer rebuilds n-step transitions at sample time, ``rlfleet.buffer.nstep``) adds
  ``("next", "discount")``, ``gamma ** k`` per row, which then replaces ``gamma``: its
  ``next.reward`` is already the discounted sum and its ``next.observation`` is k steps on.
- ``n_step > 1`` (the older form, the loss sums the rewards itself): a TensorDict ``[B, n]`` of ``n`` consecutive rows of one episode (the
  buffer's ``sequence`` sampler with ``length=n``), additionally with
  ``("next", "done")``. The target is ``r_0 + g r_1 + ... + g^(m-1) r_(m-1) + g^m
  max Q'(s_m)`` where ``m`` stops at the first done row; a terminated end does not
  bootstrap, a truncated one does (its ``next.observation`` is the true final
  observation). Weights are read from row 0.

Truncation is never treated as termination: only ``terminated`` cuts the bootstrap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

__all__ = ["DQNLoss", "DQNOutput"]


@dataclass
class DQNOutput:
    """What one DQN loss evaluation returns.

    Attributes:
        loss: scalar to call ``backward`` on (importance-weighted mean Huber loss).
        td_error: ``[B]`` detached TD errors (target minus prediction); new priorities
            are their absolute values.
        metrics: scalar floats for logging (``loss``, ``q_mean``, ``target_mean``).
    """

    loss: torch.Tensor
    td_error: torch.Tensor
    metrics: dict[str, float]


class DQNLoss(nn.Module):
    """Double-DQN TD loss with its own target network.

    Runs on a learner rank. Not thread-safe.

    Args:
        q_network: the online network ``[B, *obs] -> [B, n_actions]``. Owned by this module
            (``self.online``); a frozen deep copy becomes ``self.target``.
        gamma: discount in ``[0, 1]``.
        double_dqn: pick the next action with the online net, value it with the target net.
        n_step: return horizon; ``> 1`` expects ``[B, n]`` batches (see module docstring).
        target_update_every: hard-copy the online weights into the target every this many
            learner steps; ``0`` uses Polyak averaging with ``tau`` every step instead.
        tau: Polyak coefficient in ``(0, 1]`` when ``target_update_every == 0``.
        huber_delta: where the Huber loss turns from quadratic to linear.
        lr: Adam learning rate of the online network.
        grad_clip: max global gradient norm; ``0`` disables clipping.
    """

    def __init__(
        self,
        q_network: nn.Module,
        *,
        gamma: float = 0.99,
        double_dqn: bool = True,
        n_step: int = 1,
        target_update_every: int = 500,
        tau: float = 0.005,
        huber_delta: float = 1.0,
        lr: float = 5e-4,
        grad_clip: float = 10.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"DQNLoss: gamma={gamma} is outside [0, 1]; use e.g. 0.99")
        if n_step < 1:
            raise ValueError(f"DQNLoss: n_step={n_step} must be >= 1; use 1 for one-step TD")
        if target_update_every < 0:
            raise ValueError(
                f"DQNLoss: target_update_every={target_update_every} must be >= 0 "
                "(0 means soft updates with tau)"
            )
        if target_update_every == 0 and not 0.0 < tau <= 1.0:
            raise ValueError(f"DQNLoss: tau={tau} must be in (0, 1] when target_update_every == 0")
        self.online = q_network
        self.target = copy.deepcopy(q_network)
        self.target.requires_grad_(False)
        self.gamma = float(gamma)
        self.double_dqn = bool(double_dqn)
        self.n_step = int(n_step)
        self.target_update_every = int(target_update_every)
        self.tau = float(tau)
        self.huber_delta = float(huber_delta)
        self.grad_clip = float(grad_clip)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=lr)
        # The gradient-carrying forward goes through this (a DDP wrapper once distributed).
        # A plain attribute, not a submodule, so state_dict keys stay those of the nets.
        self.__dict__["_online_forward"] = self.online

    @property
    def policy(self) -> nn.Module:
        """The module whose weights the collectors run (the online Q-network)."""
        return self.online

    def distribute(self, device_ids: list[int] | None = None, process_group: Any = None) -> None:
        """Wrap the online network in DDP (call on every rank, after the group is formed).

        DDP copies rank 0's parameters to all ranks; the target network is then re-synced
        from the online one so every rank starts identical.
        """
        from torch.nn.parallel import DistributedDataParallel

        self.__dict__["_online_forward"] = DistributedDataParallel(
            self.online, device_ids=device_ids, process_group=process_group
        )
        self.target.load_state_dict(self.online.state_dict())

    def update(self, batch: TensorDict, step: int) -> tuple[dict[str, float], torch.Tensor]:
        """One optimizer step on ``batch``; ``step`` is the 1-based number of this step.

        Returns:
            ``(metrics, td_error)``: scalar metrics and ``[B]`` detached TD errors.
        """
        out = self(batch, online=self._online_forward)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(self.online.parameters(), self.grad_clip)
            out.metrics["grad_norm"] = float(norm)
        self.optimizer.step()
        self.after_step(step)
        return out.metrics, out.td_error

    def optimizer_state_dict(self) -> dict:
        """The optimizer's state, for checkpoints."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Restore what :meth:`optimizer_state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])

    def forward(self, batch: TensorDict, online: nn.Module | None = None) -> DQNOutput:
        """Evaluate the loss on one batch.

        Args:
            batch: ``[B]`` (or ``[B, n]`` when ``n_step > 1``) transitions.
            online: the module to run the gradient-carrying forward through, e.g. the DDP
                wrapper of ``self.online``; defaults to ``self.online``. Forwards that
                need no gradient always use ``self.online`` directly, so DDP sees
                exactly one forward per backward.
        """
        online = self.online if online is None else online
        obs, action, weight = self._first_row(batch)
        target = self._target(batch)
        q_all = online(obs)
        q = q_all.gather(1, action.unsqueeze(1)).squeeze(1)
        td_error = target - q
        per_row = F.huber_loss(q, target, reduction="none", delta=self.huber_delta)
        loss = (per_row * weight).mean() if weight is not None else per_row.mean()
        q_detached = q.detach()
        metrics = {
            "loss": float(loss.detach()),
            "q_mean": float(q_detached.mean()),
            "target_mean": float(target.mean()),
        }
        return DQNOutput(loss=loss, td_error=td_error.detach(), metrics=metrics)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Update the target network after optimizer step number ``step`` (1-based)."""
        if self.target_update_every > 0:
            if step % self.target_update_every == 0:
                self.target.load_state_dict(self.online.state_dict())
            return
        for p_target, p in zip(self.target.parameters(), self.online.parameters(), strict=True):
            p_target.lerp_(p, self.tau)

    def _first_row(self, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.n_step > 1 and batch.batch_dims != 2:
            raise ValueError(
                f"DQNLoss: n_step={self.n_step} needs a [B, n] batch from a sequence sampler "
                f"of length {self.n_step}; got batch_size {tuple(batch.batch_size)}"
            )
        row = batch if self.n_step == 1 else batch[:, 0]
        action = row["action"].long()
        if action.dim() > 1:
            action = action.reshape(action.shape[0])
        # Column k of a QNetwork is env action ``action_start + k`` (Discrete(n, start=s)).
        action = action - int(getattr(self.online, "action_start", 0))
        weight = row.get("weight", None)
        if weight is not None:
            weight = weight.reshape(-1).to(torch.float32)
        return row["observation"], action, weight

    @torch.no_grad()
    def _target(self, batch: TensorDict) -> torch.Tensor:
        if self.n_step == 1:
            reward = batch["next", "reward"].reshape(-1).float()
            terminated = batch["next", "terminated"].reshape(-1)
            next_obs = batch["next", "observation"]
            # an n-step sample (buffer sampler n_step) carries its own gamma ** k per row
            discount = batch.get(("next", "discount"), None)
            discount = torch.full_like(reward, self.gamma) if discount is None else discount.reshape(-1).float()
        else:
            reward, terminated, next_obs, discount = self._n_step_parts(batch)
        next_value = self._next_value(next_obs)
        return reward + discount * next_value * (~terminated.bool()).float()

    def _n_step_parts(self, batch: TensorDict):
        B, n = batch.batch_size
        if n != self.n_step:
            raise ValueError(
                f"DQNLoss: batch sequences have length {n}, n_step is {self.n_step}; "
                f"configure the buffer's sequence sampler with length={self.n_step}"
            )
        reward = batch["next", "reward"].reshape(B, n).float()
        done = batch["next", "done"].reshape(B, n).bool()
        # alive[:, k] is True while no done has happened strictly before row k.
        done_before = torch.cumsum(done.long(), dim=1) - done.long()
        alive = done_before == 0
        powers = self.gamma ** torch.arange(n, dtype=torch.float32)
        ret = (reward * alive.float() * powers).sum(dim=1)
        # The last row that counts: the first done row, else row n-1.
        last = torch.where(done.any(dim=1), done.float().argmax(dim=1), torch.full((B,), n - 1))
        rows = torch.arange(B)
        terminated = batch["next", "terminated"].reshape(B, n).bool()[rows, last]
        next_obs = batch["next", "observation"][rows, last]
        discount = self.gamma ** (last.float() + 1.0)
        return ret, terminated, next_obs, discount

    def _next_value(self, next_obs: torch.Tensor) -> torch.Tensor:
        q_target = self.target(next_obs)
        if self.double_dqn:
            next_action = self.online(next_obs).argmax(dim=1, keepdim=True)
        else:
            next_action = q_target.argmax(dim=1, keepdim=True)
        return q_target.gather(1, next_action).squeeze(1)
