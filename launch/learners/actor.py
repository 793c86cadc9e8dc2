"""``LearnerActor``: the thin Ray shell around one ``Learner`` rank.

Everything that learns lives in ``rlfleet.launch.learners.learner`` (testable without
Ray), and both ends of each weight transport in ``rlfleet.collector`` (built with
``make_publisher``). This module only forms the torch.distributed group, connects to the
buffer, runs steps, hands rank 0's weights to its publisher, exports
``ray.util.metrics`` and writes checkpoints. ``LearnerGroup`` (driver) creates and
drives these actors; one method call at a time per actor (Ray's default), so nothing
here needs locks.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch

from rlfleet.buffer import DEFAULT_NAMESPACE, BufferClient, actor_name
from rlfleet.collector import WeightPublisher, make_publisher
from rlfleet.collector.config import PolicyConfig
from rlfleet.collector.weights_object_store import state_dict_to_numpy
from rlfleet.launch.config import LearnerConfig
from rlfleet.launch.learners.learner import Learner, build_algorithm

__all__ = ["LearnerActor", "learner_actor_name"]

logger = logging.getLogger(__name__)


def learner_actor_name(run_name: str, rank: int) -> str:
    """Ray actor name of learner ``rank`` of run ``run_name`` (in the run's namespace)."""
    return actor_name(run_name, f"learner-{rank}")


class LearnerActor:
    """One learner rank inside a Ray actor (wrap with ``ray.remote`` to use).

    Call order (driver): ``address`` on rank 0, then ``setup`` on every rank at once,
    then ``start_publisher`` on rank 0 (when a fleet listens), then ``step`` on every
    rank at once, as often as wanted.

    Args:
        learner: the learner section of the config (algorithm, device, batch size, ...).
        policy: the collectors' policy config; the learners build the same module.
        observation_space: one env's observation space.
        action_space: one env's action space.
        run_name: the run's actor name prefix (metrics tag this rank with it).
        buffer: name of the replay service to sample from.
        namespace: Ray namespace of the buffer (and of this actor).
        seed: the run's seed; rank ``r`` seeds torch, numpy and its client with
            ``seed * 1000 + r``.
        rank: this rank in the group.
        world_size: ranks in the group.
        num_threads: torch threads of this process.
    """

    def __init__(
        self,
        learner: LearnerConfig,
        policy: PolicyConfig,
        observation_space: gymnasium.Space,
        action_space: gymnasium.Space,
        *,
        run_name: str,
        buffer: str,
        namespace: str = DEFAULT_NAMESPACE,
        seed: int = 0,
        rank: int,
        world_size: int,
        num_threads: int = 1,
    ) -> None:
        torch.set_num_threads(num_threads)
        self.config = learner
        self.policy = policy
        self.observation_space = observation_space
        self.action_space = action_space
        self.run_name = run_name
        self.buffer_name = buffer
        self.namespace = namespace
        self.rank = int(rank)
        self.world_size = int(world_size)
        # A seed per rank: ranks share initial weights through DDP, not through the RNG.
        self.seed = int(seed) * 1000 + self.rank
        self.learner: Learner | None = None
        self.publisher: WeightPublisher | None = None
        self._metrics: dict[str, Any] | None = None
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it (rank 0: the group's rendezvous point)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, int(s.getsockname()[1])

    def setup(self, master_host: str, master_port: int, timeout_s: float, checkpoint: str | None = None) -> None:
        """Join the learner group, build the learner, load ``checkpoint``, wrap in DDP."""
        cfg = self.config
        device = cfg.device if cfg.device != "cuda" else "cuda:0"
        if self.world_size > 1:
            import torch.distributed as dist

            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(
                backend,
                init_method=f"tcp://{master_host}:{master_port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        # Ranks must draw different batches: each client is seeded by rank.
        client = BufferClient.connect(self.buffer_name, namespace=self.namespace, seed=self.seed,
                                      split=cfg.sample_split)
        algorithm = build_algorithm(cfg, self.policy, self.observation_space, self.action_space)
        self.learner = Learner(
            algorithm,
            client,
            batch_size=cfg.batch_size,
            prefetch=cfg.prefetch,
            device=device,
            rank=self.rank,
            world_size=self.world_size,
        )
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            self.learner.load_state_dict(state)
        self.learner.distribute()
        self._init_metrics()

    def start_publisher(self, fleet: str, namespace: str, num_collectors: int) -> dict[str, Any]:
        """Rank 0: build the weight publisher of fleet ``fleet`` and publish the current
        weights; returns what the fleet's receivers need (``receiver_kwargs``)."""
        if self.rank != 0:
            raise RuntimeError(f"LearnerActor: start_publisher on rank {self.rank}; only rank 0 publishes")
        self.publisher = make_publisher(
            self.config.weight_transport, fleet=fleet, namespace=namespace, num_collectors=num_collectors
        )
        self.publish()
        return self.publisher.receiver_kwargs()

    def _learner(self) -> Learner:
        if self.learner is None:
            raise RuntimeError("LearnerActor: call setup() before stepping or publishing")
        return self.learner

    def _init_metrics(self) -> None:
        try:
            from ray.util import metrics
        except ImportError:  # ray without metrics support: the returned dicts still carry them
            return
        tags = ("learner",)
        self._metrics = {
            "learner/steps": metrics.Gauge("rlfleet_learner_steps", "optimizer steps of this rank", tag_keys=tags),
            "learner/loss": metrics.Gauge("rlfleet_learner_loss", "mean loss of the last step call", tag_keys=tags),
            "learner/sample_wait_s": metrics.Gauge(
                "rlfleet_learner_sample_wait_s", "seconds waiting for batches in the last step call", tag_keys=tags
            ),
            "learner/policy_version": metrics.Gauge(
                "rlfleet_policy_version", "version of the last published weights", tag_keys=tags
            ),
            "learner/policy_lag": metrics.Gauge(
                "rlfleet_policy_lag", "learner version minus version of sampled rows", tag_keys=tags
            ),
        }
        self._metric_tags = {"learner": learner_actor_name(self.run_name, self.rank)}

    def _on_step(self, steps: int) -> None:
        if steps % self.config.publish_every == 0:
            self.publish()

    def publish(self) -> int:
        """Mark the current weights published (every rank); rank 0 hands them to its
        publisher. A version the publisher already holds moves nothing."""
        learner = self._learner()
        version = learner.mark_published()
        if self.publisher is not None and version > self.publisher.version:
            self.publisher.publish(learner.policy_state_dict(), version)
        return version

    def step(self, num_steps: int) -> dict[str, float]:
        """``num_steps`` optimizer steps; publishes every ``publish_every`` steps."""
        out = self._learner().step(num_steps, after_step=self._on_step)
        if self.publisher is not None:
            out.update(self.publisher.stats())
        if self._metrics is not None:
            for key, gauge in self._metrics.items():
                gauge.set(out[key], tags=self._metric_tags)
        return out

    def policy_state_dict(self) -> dict[str, np.ndarray]:
        """The policy weights as numpy (for export and tests; never the collectors' path)."""
        return state_dict_to_numpy(self._learner().policy_state_dict())

    def full_state_dict(self) -> dict[str, np.ndarray]:
        """Every network parameter and buffer, flat, as numpy (tests compare ranks with it)."""
        return state_dict_to_numpy(self._learner().algorithm.state_dict())

    def weight_status(self) -> dict[str, float]:
        """Publisher counters (rank 0 with a fleet), else ``{}``."""
        return {} if self.publisher is None else self.publisher.stats()

    def save_checkpoint(self, path: str) -> str:
        """Write this rank's learner state to ``path`` (written to a temporary name, then renamed)."""
        learner = self._learner()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        torch.save(learner.state_dict(), tmp)
        os.replace(tmp, target)
        return str(target)

    def shutdown(self) -> None:
        """Stop the publisher and the batches in flight, leave the process group."""
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        if self.learner is not None:
            self.learner.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
