"""``CollectorFleet``: M collector actors streaming into one replay service (driver side).

The loop that drives it (``rlfleet run`` does this)::

    fleet = CollectorFleet("cartpole-run", "cartpole", env=env, collector=collector,
                           policy=policy)                # checks everything, starts the registry
    fleet.start()                                        # M actors collect from now on
    while training:
        fleet.set_weights(learner.policy_state_dict(), version)   # or a learner rank's publisher
        fleet.health_check()                             # restarts dead actors
        print(fleet.stats()["frames"])
    fleet.stop()

Construction checks the config on the driver before any collector exists: the env is
built once (an unknown id lists close matches), the policy is built from its spaces (an
observation space it cannot handle is refused), the exploration must fit the action
space, and a cuda device needs GPUs in the cluster and a ``num_gpus`` share. Then it
starts the fleet's registry actor (``registry.py``), where weight publishers find it.

Actors (``rlfleet:<name>:collector-<i>`` and the registry ``rlfleet:<name>:collectors``,
all in the fleet's ``namespace``). Collectors take one CPU each (and
``collector.num_gpus``), are spread over the nodes (or run in the bundles of a placement
group passed in), and restart up to ``MAX_RESTARTS`` times by Ray; a restarted one
resumes collecting by itself (see ``worker.py``), and ``health_check`` re-creates one
that Ray gave up on. Every call to an actor has a timeout and tolerates dead actors, so
a run never hangs on one. Statistics come from the registry, not from the collectors.

Not thread-safe: drive a fleet from one thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlfleet.buffer import DEFAULT_NAMESPACE, BufferClient, check_name, check_namespace
from rlfleet.collector.collector import INCARNATION_BITS
from rlfleet.collector.config import CollectorConfig, EnvConfig, PolicyConfig
from rlfleet.collector.envs import make_env
from rlfleet.collector.errors import CollectorError
from rlfleet.collector.exploration import Explorer
from rlfleet.collector.policies import build_policy, check_state_dict
from rlfleet.collector.registry import collector_name, registry_name
from rlfleet.collector.remote import CollectorActor, RegistryActor
from rlfleet.collector.weights import check_kind
from rlfleet.collector.weights_object_store import ObjectStorePublisher

__all__ = ["CollectorFleet"]

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 60.0
RECENT_EPISODES = 100


class CollectorFleet:
    """M collector actors feeding a replay service; see the module docstring.

    Args:
        name: The fleet's name: its actors are ``rlfleet:<name>:...``.
        buffer: The replay service's ``BufferClient``, or its name (looked up in
            ``namespace``).
        env: The env each collector runs (``num_envs`` copies).
        collector: The collectors' config (``num_workers`` is M).
        policy: The policy each collector acts with.
        seed: The run's seed; collectors derive their own from it.
        namespace: The Ray namespace of every actor of the fleet.
        first_incarnation: Where collector incarnations (episode id bits) start.
        max_frames: The fleet's frame budget: its collectors collect only batches the
            fleet's registry granted, and it grants whole batches until they cover this
            many frames; then each collector stops (state ``done``). The fleet ends
            with ``max_frames`` rounded up to a whole batch (fewer if it is stopped
            first; a killed collector can add up to one report interval of frames). It
            holds without the driver's help: a busy driver cannot let the fleet overrun
            a run's ``total_frames``. None: no budget.
        placement_group: A Ray placement group with one bundle per collector
            (collector ``i`` runs in bundle ``i``, also when restarted); None: the
            actors are spread over the nodes without a reservation.

    Raises:
        ValueError: A bad name, env, space, exploration or device (no actor started).
        RuntimeError: Ray is not initialised in this process.
    """

    def __init__(
        self, name: str, buffer: BufferClient | str, *, env: EnvConfig, collector: CollectorConfig,
        policy: PolicyConfig, seed: int = 0, namespace: str = DEFAULT_NAMESPACE, first_incarnation: int = 0,
        placement_group: Any | None = None, max_frames: int | None = None,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("CollectorFleet needs Ray: call ray.init() first (rlfleet run does)")
        check_name(name, argument="name")
        check_namespace(namespace)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed = {seed!r}: must be an integer >= 0")
        for field, value, cls in (("env", env, EnvConfig), ("collector", collector, CollectorConfig),
                                  ("policy", policy, PolicyConfig)):
            if not isinstance(value, cls):
                raise ValueError(f"{field} must be of type {cls.__name__}, got {type(value).__name__}")
        if isinstance(first_incarnation, bool) or not isinstance(first_incarnation, int) or not (
            0 <= first_incarnation < 2**INCARNATION_BITS
        ):
            raise ValueError(
                f"first_incarnation = {first_incarnation!r}: must be an int in [0, {2**INCARNATION_BITS}); "
                "pass the previous session's stats()['next_incarnation'] when resuming a run"
            )
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames = {max_frames!r}: must be an int >= 1 (frames the whole fleet may "
                             "collect), or None for no budget")
        if placement_group is not None and placement_group.bundle_count != collector.num_workers:
            raise ValueError(f"placement_group has {placement_group.bundle_count} bundle(s) but "
                             f"collector.num_workers = {collector.num_workers}; give one bundle per collector")
        self._placement_group = placement_group
        buffer_name = buffer if isinstance(buffer, str) else getattr(buffer, "name", None)
        if not isinstance(buffer_name, str):
            raise ValueError(f"buffer = {buffer!r}: pass a BufferClient or a buffer name")
        self.name, self.namespace, self.seed = name, namespace, seed
        self.env, self.collector, self.policy = env, collector, policy
        self.num_workers = collector.num_workers
        self._buffer = buffer
        probe = make_env(env, seed=seed)
        try:
            self.observation_space = probe.observation_space
            self.action_space = probe.action_space
        finally:
            probe.close()
        self._template = build_policy(policy, self.observation_space, self.action_space)
        Explorer(collector.exploration, self.action_space, num_envs=1,
                 init_random_frames=collector.init_random_frames, seed=0)
        self._check_device()
        try:
            ray.get_actor(registry_name(name), namespace=namespace)
        except ValueError:
            pass
        else:
            raise ValueError(f"name = {name!r}: a collector fleet of that name is running in namespace "
                             f"{namespace!r}; stop it or pick another name")
        self._registry = ray.remote(RegistryActor).options(
            name=registry_name(name), namespace=namespace, num_cpus=0, max_concurrency=1,
        ).remote(name, self.num_workers, first_incarnation, max_frames)
        self._actors: list[Any] = []
        self._stopped = False
        try:
            # Up before this returns: publishers (a learner rank) find it by name.
            ray.get(self._registry.ping.remote(), timeout=START_TIMEOUT_S)
            self._publisher = ObjectStorePublisher(fleet=name, namespace=namespace,
                                                   num_collectors=self.num_workers, timeout_s=CALL_TIMEOUT_S)
        except Exception:
            self._teardown()
            raise
        self.first_incarnation = first_incarnation
        self.max_frames = max_frames
        self._restarts_seen = 0
        self._final_snapshot: dict[str, Any] | None = None

    def _check_device(self) -> None:
        c = self.collector
        if c.device == "cpu":
            return
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus == 0:
            raise ValueError(
                f"collector.device = {c.device!r} but the Ray cluster has no GPU (CUDA is "
                f"{'available' if torch.cuda.is_available() else 'not available'} on this driver); "
                "use collector.device 'cpu' or add GPU nodes"
            )
        if c.num_gpus == 0:
            raise ValueError(
                f"collector.device = {c.device!r} needs collector.num_gpus > 0 (e.g. 0.25) so "
                "Ray gives each collector actor a GPU"
            )
        if c.num_gpus * c.num_workers > gpus:
            raise ValueError(
                f"collector.num_gpus = {c.num_gpus} x collector.num_workers = {c.num_workers} "
                f"needs {c.num_gpus * c.num_workers} GPUs, the cluster has {gpus}; lower either"
            )

    # -- lifecycle ---------------------------------------------------------------------

    def _spawn(self, index: int) -> Any:
        c = self.collector
        strategy: Any = "SPREAD"
        if self._placement_group is not None:
            strategy = PlacementGroupSchedulingStrategy(self._placement_group, placement_group_bundle_index=index)
        return ray.remote(CollectorActor).options(
            name=collector_name(self.name, index), namespace=self.namespace, num_cpus=1,
            num_gpus=c.num_gpus, max_restarts=MAX_RESTARTS, max_concurrency=4,
            scheduling_strategy=strategy,
        ).remote(self.name, self.namespace, index, self.num_workers, self.seed, self.env, c, self.policy,
                 self._buffer)

    def start(self, *, paused: bool = False) -> None:
        """Start the M actors and wait until each is collecting (or resume a paused fleet).

        Args:
            paused: start the actors paused (they collect nothing until ``resume``).

        Raises:
            CollectorError: An actor failed to construct (its error is in the message) or
                was not scheduled in time; every actor of the fleet is stopped first.
        """
        if self._stopped:
            raise CollectorError(f"collector fleet {self.name!r} was stopped; build a new one")
        if self._actors:
            self.resume()
            return
        # Actors read the state as they start: paused ones collect nothing until resumed.
        ray.get(self._registry.set_state.remote("paused" if paused else "running"), timeout=START_TIMEOUT_S)
        self._actors = [self._spawn(i) for i in range(self.num_workers)]
        refs = [a.ping.remote() for a in self._actors]
        try:
            ray.get(refs, timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as e:
            self._teardown()
            raise CollectorError(
                f"collector fleet {self.name!r}: {self.num_workers} actor(s) needing 1 CPU and "
                f"{self.collector.num_gpus} GPU each were not all up within {START_TIMEOUT_S:.0f} s; "
                f"the cluster has {ray.cluster_resources()}; lower collector.num_workers"
            ) from e
        except Exception as e:
            self._teardown()
            # Ray's text holds the remote traceback; its last line is the actor's own error.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            cause = lines[-1] if lines else repr(e)
            log.error("collector fleet %r: an actor failed to start:\n%s", self.name, e)
            raise CollectorError(f"collector fleet {self.name!r}: an actor failed to start: {cause}") from e
        log.info("collector fleet %r: %d actors collecting into %r", self.name, self.num_workers, self._buffer)

    def _call_all(self, method: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        """Call ``method`` on every actor; an actor that fails or times out gives its exception."""
        refs = [getattr(a, method).remote(*args) for a in self._actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ready_set = set(ready)
        out: list[Any] = []
        for i, ref in enumerate(refs):
            if ref not in ready_set:
                out.append(ray.exceptions.GetTimeoutError(f"collector {i}: {method} timed out"))
                continue
            try:
                out.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - returned to the caller per actor
                out.append(e)
        return out

    def pause(self, timeout_s: float = 60.0) -> None:
        """Return once no actor has a batch in flight (dead actors are skipped)."""
        ray.get(self._registry.set_state.remote("paused"), timeout=CALL_TIMEOUT_S)
        for i, result in enumerate(self._call_all("pause", timeout_s, timeout_s=timeout_s + 5)):
            if result is not True:
                log.warning("collector fleet %r: collector %d did not pause: %s", self.name, i, result)

    def resume(self) -> None:
        ray.get(self._registry.set_state.remote("running"), timeout=CALL_TIMEOUT_S)
        self._call_all("resume")

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop collecting, close the envs and end every actor. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            ray.get(self._registry.set_state.remote("stopped"), timeout=CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - stopping goes on regardless
            log.warning("collector fleet %r: registry unreachable while stopping: %s", self.name, e)
        if self._actors:
            self._call_all("stop", timeout_s, timeout_s=timeout_s + 5)
        try:
            # stats() keeps answering from the last snapshot once the registry is gone.
            self._final_snapshot = ray.get(self._registry.snapshot.remote(), timeout=CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - stopping goes on regardless
            log.warning("collector fleet %r: no final statistics: %s", self.name, e)
        self._teardown()

    def _teardown(self) -> None:
        for a in [*self._actors, self._registry]:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:  # noqa: BLE001 - already gone
                log.debug("kill: %s", e)
        self._actors = []
        self._stopped = True

    # -- weights -----------------------------------------------------------------------

    def set_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> bool:
        """Make ``state_dict`` the newest weights (object store); collectors apply them
        between batches and stamp ``version`` on the rows they then produce.

        Returns:
            False, and nothing moved, if ``version`` is not newer than the last set.

        Raises:
            ValueError: Keys or shapes differ from the policy (nothing is published).
        """
        check_state_dict(self._template, state_dict)
        return self._publisher.publish(state_dict, version)

    def attach_weight_receiver(self, kind: str, **kwargs: Any) -> None:
        """Make every actor, and every restarted one, receive weights through ``kind``.

        Each builds ``make_receiver(kind, fleet=name, namespace=namespace,
        collector_index=i, num_collectors=M, **kwargs)`` in the background and switches to
        it once built; this call does not wait for that. ``kwargs`` are a publisher's
        ``receiver_kwargs()``.

        Raises:
            ValueError: An unknown kind, or ``fleet``/``namespace`` in ``kwargs`` naming
                another fleet.
        """
        check_kind(kind)
        for key, mine in (("fleet", self.name), ("namespace", self.namespace)):
            theirs = kwargs.pop(key, mine)
            if theirs != mine:
                raise ValueError(
                    f"attach_weight_receiver: {key} = {theirs!r}, but this fleet's {key} is {mine!r}; "
                    f"leave {key} out (the fleet passes its own)"
                )
        ray.get(self._registry.set_receiver.remote(kind, kwargs), timeout=CALL_TIMEOUT_S)
        if self._actors:
            for i, result in enumerate(self._call_all("attach_receiver", kind, kwargs)):
                if isinstance(result, Exception):
                    log.warning("collector %d: attach_receiver failed (%s); it gets the receiver "
                                "from the registry when it restarts", i, result)

    # -- health and stats --------------------------------------------------------------

    def health_check(self) -> int:
        """Re-create actors Ray gave up on; returns restarts since the last check.

        Counts both Ray's restarts of crashed actors (they resume by themselves) and the
        re-creations done here.

        Raises:
            CollectorError: An actor's loop raised (a bug or bad data, not a crash):
                restarting would repeat it, so the error is passed on.
        """
        for i, result in enumerate(self._call_all("status", timeout_s=10.0)):
            if isinstance(result, ray.exceptions.ActorUnavailableError):
                continue  # restarting; it comes back by itself
            if isinstance(result, ray.exceptions.RayActorError):
                try:
                    self._actors[i] = self._spawn(i)
                except ValueError:
                    # The name is still taken: Ray is restarting this actor after all.
                    log.info("collector fleet %r: collector %d is restarting", self.name, i)
                else:
                    log.warning("collector fleet %r: collector %d was dead; re-created it", self.name, i)
                continue
            if isinstance(result, Exception):
                log.warning("collector fleet %r: collector %d did not answer: %s", self.name, i, result)
                continue
            if result["state"] == "failed":
                raise CollectorError(f"collector {i} of fleet {self.name!r} failed: {result['error']}")
        snap = ray.get(self._registry.snapshot.remote(), timeout=CALL_TIMEOUT_S)
        total = sum(max(0, n - 1) for n in snap["registrations"])
        new, self._restarts_seen = total - self._restarts_seen, total
        return new

    def stats(self) -> dict[str, Any]:
        """Fleet counters from the registry (never waits on a collector); after ``stop``,
        the counters as they were when the fleet stopped.

        Returns:
            ``frames``, ``frames_per_s`` (sum of the actors' last batches), ``episodes``,
            ``recent_returns`` / ``recent_lengths`` (up to 100 recent episodes, an equal
            share from each actor), ``policy_version`` (lowest among actors),
            ``restarts``, ``max_frames`` (the budget, or None), and ``collectors`` (each
            actor's latest report, or None).
        """
        if self._stopped and self._final_snapshot is not None:
            snap = self._final_snapshot
        else:
            snap = ray.get(self._registry.snapshot.remote(), timeout=CALL_TIMEOUT_S)
        reports = snap["reports"]
        live = [r for r in reports if r is not None]
        share = math.ceil(RECENT_EPISODES / max(1, self.num_workers))
        returns = [x for r in live for x in r["recent_returns"][-share:]][-RECENT_EPISODES:]
        lengths = [x for r in live for x in r["recent_lengths"][-share:]][-RECENT_EPISODES:]
        return {
            "frames": sum(r["frames"] for r in live),
            "frames_per_s": sum(r["frames_per_s"] for r in live),
            "episodes": sum(snap["carried_episodes"]) + sum(r["episodes"] for r in live),
            "recent_returns": returns,
            "recent_lengths": lengths,
            "policy_version": min((r["policy_version"] for r in live), default=0),
            "restarts": sum(max(0, n - 1) for n in snap["registrations"]),
            # the first_incarnation a later fleet writing into the same buffer must use
            "next_incarnation": self.first_incarnation + max(snap["registrations"], default=0),
            "max_frames": self.max_frames,
            "collectors": reports,
        }
