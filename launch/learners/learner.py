"""One learner rank: sample, update, write priorities back. No Ray in here.

Runs on a learner rank (a ``LearnerActor``) or in a test process. The loop that
drives it::

    learner = Learner(build_algorithm(learner_cfg, policy_cfg, obs_space, act_space),
                      client, batch_size=256, prefetch=2)
    learner.distribute()                    # DDP, once torch.distributed is initialised
    while running:
        metrics = learner.step(50)          # 50 optimizer steps
        version = learner.mark_published()  # rank 0 then publishes policy_state_dict()

``source`` is anything with ``sample(n) -> TensorDict`` and
``update_priority(index, priority) -> int``: a local ``ReplayBuffer`` in tests, a
``BufferClient`` in a run. A source that also has ``sampler(n, prefetch=k)`` (the
``BufferClient``) is read through it, so ``prefetch`` batches per group are on their way
while the optimizer works; a local buffer is sampled inline (its ``sample`` is a copy
in this process, nothing to overlap). ``learner/sample_wait_s`` reports how long a
step call waited for batches.
Batches are in TorchRL's layout (buffer format 2, DESIGN.md "Data").

Priorities (prioritized samplers only): after each step the learner writes
``|td_error| + PRIORITY_EPS`` back for the rows it sampled. The buffer stores those of
live rows and skips, and returns the count of, rows overwritten since they were
sampled; the learner counts both (``learner/priority_updates_skipped``,
``learner/priority_stored_fraction``). A ``StaleIndexError`` now means an index the
buffer never issued (another buffer, a row never written): a bug, so it propagates.

Policy version: the learner's version is its optimizer step count at the last
publish; rows carry the ``policy_version`` of the weights that collected them, so
``learner/policy_lag`` (version minus the mean version of the sampled rows) is in
learner steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import gymnasium
import torch
from tensordict import TensorDict
from torch import nn

from rlfleet.collector.config import PolicyConfig
from rlfleet.collector.policies import build_policy
from rlfleet.launch.config import LearnerConfig
from rlfleet.launch.learners.dqn import DQNLoss
from rlfleet.launch.learners.sac import SACLoss

__all__ = ["Algorithm", "Learner", "PrefetchingSource", "SampleSource", "build_algorithm"]

logger = logging.getLogger(__name__)

# Added to |td error| so no row's priority reaches zero (it could never be sampled again).
PRIORITY_EPS = 1e-6


class SampleSource(Protocol):
    """Where a learner gets its batches (a ``ReplayBuffer`` or a ``BufferClient``).

    A source that is also a ``PrefetchingSource`` is read through its ``sampler``.
    """

    def sample(self, n: int) -> TensorDict: ...

    def update_priority(self, index: Any, priority: Any) -> int:
        """Store priorities of live rows; returns how many were skipped (overwritten rows)."""
        ...


class PrefetchingSource(Protocol):
    """A source that fetches ahead itself (``BufferClient.sampler``); a source whose
    ``sampler`` is a method counts as one."""

    def sampler(self, n: int, *, prefetch: int = 2) -> Iterator[TensorDict]: ...


class Algorithm(Protocol):
    """What ``DQNLoss`` and ``SACLoss`` provide to the learner (an ``nn.Module``)."""

    policy: nn.Module

    def distribute(self, device_ids: list[int] | None = None, process_group: Any = None) -> None: ...

    def update(self, batch: TensorDict, step: int) -> tuple[dict[str, float], torch.Tensor | None]: ...

    def optimizer_state_dict(self) -> dict: ...

    def load_optimizer_state_dict(self, state: dict) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


def build_algorithm(
    learner: LearnerConfig,
    policy: PolicyConfig,
    observation_space: gymnasium.Space,
    action_space: gymnasium.Space,
) -> Algorithm:
    """Build the loss module named by ``learner.algorithm`` around the collectors' policy.

    Runs on a learner rank. The online network (DQN) or actor (SAC) is
    ``build_policy(policy, observation_space, action_space)``, the same module the
    collectors run, so published state dicts load there unchanged.
    """
    net = build_policy(policy, observation_space, action_space)
    if learner.algorithm == "dqn":
        return DQNLoss(
            net,
            gamma=learner.gamma,
            double_dqn=learner.double_dqn,
            n_step=learner.n_step,
            target_update_every=learner.target_update_every,
            tau=learner.tau,
            lr=learner.lr,
            grad_clip=learner.grad_clip,
        )
    if learner.algorithm == "sac":
        return SACLoss(
            net,
            observation_space,
            action_space,
            hidden=tuple(policy.hidden),
            gamma=learner.gamma,
            tau=learner.tau,
            lr=learner.lr,
            init_alpha=learner.init_alpha,
            target_entropy=learner.target_entropy,
            grad_clip=learner.grad_clip,
        )
    raise ValueError(
        f"learner.algorithm = {learner.algorithm!r} is not known; use 'dqn' (discrete actions) or 'sac' (continuous)"
    )


class Learner:
    """One rank of the learner group. Runs on a learner actor (or in a test process).

    Not thread-safe: one caller drives ``step`` (and ``close``); no threads of its own.

    Args:
        algorithm: a loss module (``DQNLoss`` / ``SACLoss``).
        source: where batches come from (see ``SampleSource``).
        batch_size: rows per optimizer step on this rank.
        prefetch: batches per group requested ahead through ``source.sampler`` (a
            ``BufferClient`` keeps two such groups in flight); ``0`` samples each batch
            when it is wanted. A source without ``sampler`` is always sampled inline.
        device: torch device of the model; batches are moved there.
        rank: this rank in the learner group (0 publishes).
        world_size: ranks in the group.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        source: SampleSource,
        *,
        batch_size: int = 256,
        prefetch: int = 2,
        device: str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Learner: batch_size={batch_size} must be >= 1")
        if prefetch < 0:
            raise ValueError(f"Learner: prefetch={prefetch} must be >= 0 (0 samples inline)")
        self.algorithm = algorithm
        self.source = source
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.steps = 0
        self.policy_version = 0
        self.algorithm.to(self.device)  # type: ignore[attr-defined]
        self.prefetch = int(prefetch)
        # (A ReplayBuffer's ``sampler`` is its sampler's settings, not a method.)
        self._prefetching = callable(getattr(source, "sampler", None))
        self._batches: Iterator[TensorDict] | None = None
        self._writes_priorities: bool | None = None
        # Priority updates since this rank started (not carried over by checkpoints).
        self.priority_updates = 0
        self.priority_updates_skipped = 0
        self._distributed = False

    def distribute(self, process_group: Any = None) -> None:
        """Wrap the algorithm's networks in DDP; every rank calls this, in the same order."""
        if self.world_size <= 1:
            return
        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        self.algorithm.distribute(device_ids=device_ids, process_group=process_group)
        self._distributed = True

    def _next_batch(self) -> TensorDict:
        if not self._prefetching:
            return self.source.sample(self.batch_size)
        if self._batches is None:
            self._batches = self.source.sampler(  # type: ignore[attr-defined]
                self.batch_size, prefetch=self.prefetch)
        try:
            return next(self._batches)
        except BaseException:
            # A failed generator is finished: the next call starts a fresh one.
            self._close_batches()
            raise

    def step(self, num_steps: int = 1, after_step: Callable[[int], None] | None = None) -> dict[str, float]:
        """Run ``num_steps`` optimizer steps; returns metrics averaged over them.

        Keys: ``learner/steps``, ``learner/loss``, ``learner/steps_per_s``,
        ``learner/sample_wait_s`` (total seconds waiting for batches in this call),
        ``learner/policy_version``, ``learner/policy_lag``, and the algorithm's own
        metrics under ``learner/``. Once this rank writes priorities (a prioritized
        sampler) also ``learner/priority_updates_skipped`` (rows whose priority the
        buffer skipped because they were overwritten since they were sampled) and
        ``learner/priority_stored_fraction`` (rows stored / rows sent); both are
        cumulative since this rank started, not per call. With DDP every rank must
        call this with the same ``num_steps``.

        Raises:
            StaleIndexError: the buffer refused a priority update's index as one it never
                issued (a batch from another buffer): a bug, never an overwritten row.
        """
        if num_steps < 1:
            raise ValueError(f"Learner.step: num_steps={num_steps} must be >= 1")
        start = time.perf_counter()
        wait_s = 0.0
        sums: dict[str, float] = {}
        lag_sum, lag_n = 0.0, 0
        for _ in range(num_steps):
            t0 = time.perf_counter()
            batch = self._next_batch()
            wait_s += time.perf_counter() - t0
            batch = batch.to(self.device)
            self.steps += 1
            metrics, td_error = self.algorithm.update(batch, self.steps)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            if "policy_version" in batch.keys():
                lag_sum += self.policy_version - float(batch["policy_version"].float().mean())
                lag_n += 1
            if td_error is not None:
                self._write_priorities(batch, td_error)
            if after_step is not None:
                after_step(self.steps)
        elapsed = time.perf_counter() - start
        out = {f"learner/{k}": v / num_steps for k, v in sums.items()}
        out.update(
            {
                "learner/steps": float(self.steps),
                "learner/steps_per_s": num_steps / elapsed if elapsed > 0 else float("inf"),
                "learner/sample_wait_s": wait_s,
                "learner/policy_version": float(self.policy_version),
                "learner/policy_lag": lag_sum / lag_n if lag_n else 0.0,
            }
        )
        out.setdefault("learner/loss", 0.0)
        if self.priority_updates:
            stored = self.priority_updates - self.priority_updates_skipped
            out["learner/priority_updates_skipped"] = float(self.priority_updates_skipped)
            out["learner/priority_stored_fraction"] = stored / self.priority_updates
        return out

    def _write_priorities(self, batch: TensorDict, td_error: torch.Tensor) -> None:
        # Only prioritized samplers hand out importance weights; others ignore priorities.
        if self._writes_priorities is None:
            self._writes_priorities = "weight" in batch.keys()
        if not self._writes_priorities:
            return
        index = batch["index"]
        if index.dim() > 1:  # sequences: the priority belongs to the slice's first row
            index = index[:, 0]
        priority = td_error.abs().reshape(-1).to("cpu", torch.float64) + PRIORITY_EPS
        # Overwritten rows are skipped and counted by the buffer; any other bad index
        # raises StaleIndexError, which is left to propagate.
        skipped = int(self.source.update_priority(index.cpu(), priority))
        self.priority_updates += int(priority.numel())
        self.priority_updates_skipped += skipped

    def mark_published(self) -> int:
        """Record that the current weights were published; returns the new version."""
        self.policy_version = self.steps
        return self.policy_version

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the policy's weights (what collectors load)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.algorithm.policy.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs: networks, optimizers, counters (tensors and plain types)."""
        return {
            "algorithm": self.algorithm.state_dict(),
            "optimizers": self.algorithm.optimizer_state_dict(),
            "steps": self.steps,
            "policy_version": self.policy_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on every rank, before training)."""
        self.algorithm.load_state_dict(state["algorithm"])
        self.algorithm.load_optimizer_state_dict(state["optimizers"])
        self.steps = int(state["steps"])
        self.policy_version = int(state["policy_version"])

    def close(self) -> None:
        """Drop the batches requested ahead (waits for the calls still in flight)."""
        self._close_batches()

    def _close_batches(self) -> None:
        batches, self._batches = self._batches, None
        if batches is not None:
            batches.close()  # type: ignore[attr-defined]
