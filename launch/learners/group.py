"""``LearnerGroup``: L learner actors in one torch.distributed group (driver side).

The run loop drives it like this::

    group = LearnerGroup(config.learner, config.policy, run_name=run_name, buffer=run_name,
                         observation_space=obs_space, action_space=act_space,
                         run_dir=run_dir, seed=config.seed, namespace=namespace, fleet=fleet)
    group.publish()                            # the first weights, before collecting
    while not done:
        metrics = group.step(config.run.steps_per_iteration)   # every rank, in lockstep
    group.save_checkpoint(); group.shutdown()

Forming the group: rank 0 reports its node IP and a free port; every rank then calls
``init_process_group`` (gloo on CPU, nccl on CUDA) at that address at once, bounded by
``rendezvous_timeout_s``. DDP makes all ranks start from rank 0's weights.

Weights: with a fleet, rank 0 holds the publisher of ``learner.weight_transport``
(``rlfleet.collector.make_publisher``) and publishes every ``publish_every`` steps
(version = its step count) straight to the collectors: through the fleet's registry
and the object store, or by broadcast (which itself falls back to the object store
while its group is not standing). The driver never holds the weights on their way; it
only tells the fleet once, at setup, how to reach the broadcast group
(``fleet.attach_weight_receiver``). A version already published moves nothing.

Checkpoints: ``<run_dir>/checkpoints/learner-<steps>.pt`` (rank 0's state, state dicts
only) plus ``latest.pt``; ``resume=True`` loads ``latest.pt`` into every rank.

Not thread-safe: one driver thread calls it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlfleet.buffer import DEFAULT_NAMESPACE
from rlfleet.collector import CollectorFleet
from rlfleet.collector.config import PolicyConfig
from rlfleet.launch.config import LearnerConfig
from rlfleet.launch.learners.actor import LearnerActor, learner_actor_name

__all__ = ["LearnerGroup", "LearnerGroupError"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.pt"


class LearnerGroupError(RuntimeError):
    """The learner group could not be placed, formed, or lost a rank."""


def _check_resources(num_learners: int, device: str) -> None:
    total = ray.cluster_resources()
    need_gpu = device.startswith("cuda")
    resource, need = ("GPU", float(num_learners)) if need_gpu else ("CPU", float(num_learners))
    have = float(total.get(resource, 0.0))
    if have < need:
        raise LearnerGroupError(
            f"learner.num_learners={num_learners} needs {need:g} {resource} (one per learner on "
            f"device {device!r}) but the cluster has {have:g} {resource} in all; lower "
            f"learner.num_learners, use learner.device=cpu, or add {resource} nodes"
        )


class LearnerGroup:
    """L ``LearnerActor`` ranks forming one DDP group. Runs on the driver.

    Args:
        learner: the learner section of the config (ranks, algorithm, publish and
            checkpoint periods, weight transport).
        policy: the collectors' policy config; the learners build the same module.
        run_name: the run's actor name prefix: rank ``r`` is the actor
            ``actor_name(run_name, f"learner-{r}")`` in ``namespace``.
        buffer: name of the replay service the learners sample from (in ``namespace``).
        observation_space: one env's observation space.
        action_space: one env's action space.
        run_dir: checkpoints go to ``run_dir/checkpoints``.
        seed: the run's seed (rank ``r`` uses ``seed * 1000 + r``).
        namespace: Ray namespace of the learner actors and of the buffer.
        fleet: the ``CollectorFleet`` to publish weights to (None: nobody listens, no
            publisher is built).
        resume: load ``run_dir/checkpoints/latest.pt`` into every rank first.
        rendezvous_timeout_s: bound on forming the group and on each collective.
        num_threads: torch threads per learner actor.
        placement_group: a Ray placement group with one bundle per rank (rank ``r``
            runs in bundle ``r``); None: Ray places the ranks where it finds room.
    """

    def __init__(
        self,
        learner: LearnerConfig,
        policy: PolicyConfig,
        *,
        run_name: str,
        buffer: str,
        observation_space: gymnasium.Space,
        action_space: gymnasium.Space,
        run_dir: Path,
        seed: int = 0,
        namespace: str = DEFAULT_NAMESPACE,
        fleet: CollectorFleet | None = None,
        resume: bool = False,
        rendezvous_timeout_s: float = 120.0,
        num_threads: int = 1,
        placement_group: Any | None = None,
    ) -> None:
        self.learner = learner
        self.run_name = run_name
        self.namespace = namespace
        self.run_dir = Path(run_dir)
        self.fleet = fleet
        self.num_learners = int(learner.num_learners)
        self.checkpoint_every = int(learner.checkpoint_every)
        self.steps = 0
        self._last_checkpoint_step = 0
        _check_resources(self.num_learners, learner.device)
        if placement_group is not None and placement_group.bundle_count != self.num_learners:
            raise ValueError(
                f"placement_group has {placement_group.bundle_count} bundle(s) but "
                f"learner.num_learners={self.num_learners}; give one bundle per rank"
            )

        checkpoint: str | None = None
        if resume:
            latest = self.run_dir / CHECKPOINT_DIR / LATEST
            if not latest.is_file():
                raise FileNotFoundError(
                    f"LearnerGroup: resume=True but {latest} does not exist; the run saved no "
                    "learner checkpoint (start it fresh instead)"
                )
            checkpoint = str(latest)

        gpus = 1 if learner.device.startswith("cuda") else 0
        actor_cls = ray.remote(LearnerActor)
        self.actors = [
            actor_cls.options(
                name=learner_actor_name(run_name, rank),
                namespace=namespace,
                num_cpus=1,
                num_gpus=gpus,
                max_restarts=0,
                scheduling_strategy=None if placement_group is None else PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=rank),
            ).remote(
                learner,
                policy,
                observation_space,
                action_space,
                run_name=run_name,
                buffer=buffer,
                namespace=namespace,
                seed=seed,
                rank=rank,
                world_size=self.num_learners,
                num_threads=num_threads,
            )
            for rank in range(self.num_learners)
        ]
        try:
            host, port = ray.get(self.actors[0].address.remote(), timeout=rendezvous_timeout_s)
            ray.get(
                [a.setup.remote(host, port, rendezvous_timeout_s, checkpoint) for a in self.actors],
                timeout=rendezvous_timeout_s + 30.0,
            )
        except Exception as e:
            self._kill()
            raise LearnerGroupError(
                f"LearnerGroup: {self.num_learners} learner(s) did not form a group at "
                f"rendezvous within {rendezvous_timeout_s}s: {e}"
            ) from e
        if resume:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.steps = int(state["steps"])
            self._last_checkpoint_step = self.steps
        if fleet is not None:
            # Rank 0 builds the publisher and publishes the current weights; only the
            # broadcast's address comes back to the driver, never the weights.
            kwargs = ray.get(
                self.actors[0].start_publisher.remote(fleet.name, fleet.namespace, fleet.num_workers),
                timeout=rendezvous_timeout_s,
            )
            if learner.weight_transport == "distributed":
                fleet.attach_weight_receiver("distributed", **kwargs)

    # ------------------------------------------------------------------ steps

    def step(self, num_steps: int) -> dict[str, float]:
        """Every rank does ``num_steps`` optimizer steps; returns rank 0's metrics.

        Keys: ``learner/steps``, ``learner/loss``, ``learner/steps_per_s``,
        ``learner/sample_wait_s``, ``learner/policy_version``, ``learner/policy_lag``
        (and algorithm and ``weights/`` extras). Publishes every ``publish_every`` steps
        and checkpoints every ``checkpoint_every`` steps.
        """
        if num_steps < 1:
            raise ValueError(f"LearnerGroup.step: num_steps={num_steps} must be >= 1")
        refs = [a.step.remote(num_steps) for a in self.actors]
        try:
            results = ray.get(refs)
        except ray.exceptions.RayError as e:
            dead = self._dead_ranks(refs)
            if not dead and not isinstance(e, ray.exceptions.RayActorError):
                raise  # a rank's own error (a sample timeout, bad data): its type says it
            raise LearnerGroupError(self._lost_rank_message(dead or {-1: e})) from e
        self.steps = int(results[0]["learner/steps"])
        if self.steps - self._last_checkpoint_step >= self.checkpoint_every:
            self.save_checkpoint()
        return results[0]

    def _dead_ranks(self, refs: list[Any]) -> dict[int, Exception]:
        # The surviving ranks fail too (their collectives lose a peer), usually within
        # moments: wait briefly for every answer so the rank that died is the one named.
        ray.wait(refs, num_returns=len(refs), timeout=10.0)
        dead: dict[int, Exception] = {}
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as e:
                dead[rank] = e
            except Exception:  # a survivor's own failure, or still blocked: not dead
                pass
        return dead

    def _lost_rank_message(self, dead: dict[int, Exception]) -> str:
        ranks = [r for r in dead if r >= 0]
        names = ", ".join(learner_actor_name(self.run_name, r) for r in ranks) or "unknown"
        error = next(iter(dead.values()))
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return (
            f"learner rank(s) {ranks or '?'} ({names}) died after step {self.steps} "
            f"({type(error).__name__}: {cause}); every rank takes part in each DDP step, so "
            f"the run stops. The buffer on disk and the last checkpoint "
            f"({self.run_dir / CHECKPOINT_DIR / LATEST}) are kept: continue with "
            f"`rlfleet run --resume {self.run_dir}`"
        )

    def publish(self) -> int:
        """Publish the current weights now (rank 0 sends them); returns the version.

        Every rank marks the version; rank 0's publisher moves the weights only if the
        version is newer than the last it published.
        """
        versions = ray.get([a.publish.remote() for a in self.actors])
        return int(versions[0])

    # ------------------------------------------------------------------ state

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """Rank 0's policy weights, as CPU tensors (what collectors load; what export uses)."""
        state: dict[str, np.ndarray] = ray.get(self.actors[0].policy_state_dict.remote())
        return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}

    def rank_state_dicts(self) -> list[dict[str, np.ndarray]]:
        """Every rank's full network state (tests check that ranks agree)."""
        return ray.get([a.full_state_dict.remote() for a in self.actors])

    def save_checkpoint(self) -> Path:
        """Write rank 0's learner state to ``run_dir/checkpoints``; returns the file."""
        directory = self.run_dir / CHECKPOINT_DIR
        path = directory / f"learner-{self.steps:09d}.pt"
        ray.get(self.actors[0].save_checkpoint.remote(str(path)))
        latest = directory / LATEST
        tmp = directory / (LATEST + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(latest)
        self._last_checkpoint_step = self.steps
        return path

    def shutdown(self) -> None:
        """Stop every rank (publisher, batches in flight, process group) and kill the actors."""
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30.0)
        except Exception as e:  # a dead or stuck rank: killing it below is all that is left
            logger.warning("learner shutdown did not complete cleanly: %s", e)
        self._kill()

    def _kill(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
