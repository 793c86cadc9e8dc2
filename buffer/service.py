"""``ReplayService``: start, find and stop the shard actors of a named replay buffer.

Runs on the driver (or any process attached to the cluster). A service is nothing but
its shard actors, ``rlfleet:<name>:shard-<k>`` in a Ray namespace (``"rlfleet"`` unless
the caller picks another; ``naming``): there is no coordinator actor to lose, and any
process finds a buffer by listing named actors.
Each shard owns ``<path>/shard-<k>`` on the local disk of the node it runs on.

Placement: ``"spread"`` deals shards over the alive nodes round-robin (the launching
node first); ``"pack"`` puts them all on the launching node. Either way each shard is
pinned to its node (hard node affinity), because its data lives on that node's disk: a
restarted shard must come back where its files are, not wherever Ray finds room.

Actors restart without limit (``max_restarts=-1``) and reopen their directory. Calls
that are safe to repeat (sample, stats, update_priority) are retried by Ray across a
restart; ``extend`` is not, since a retry after a commit would insert the rows twice.
Each shard is a threaded actor whose inserts, samples and other calls run in separate
concurrency groups (``remote.py``), so a side the rate limiter holds never starves the
other. A service has at most ``MAX_SHARDS`` (128) shards: every index stores its shard
number in 7 bits (``indices``).

Not thread-safe: launch and shutdown one service from one thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlfleet.buffer.capacity import split_capacity
from rlfleet.buffer.client import BufferClient
from rlfleet.buffer.cluster import DEFAULT_CONNECT_TIMEOUT_S, init_ray
from rlfleet.buffer.errors import ShardUnavailable
from rlfleet.buffer.frames import check_frame_stack
from rlfleet.buffer.indices import MAX_SHARDS
from rlfleet.buffer.naming import (
    DEFAULT_NAMESPACE,
    check_name,
    check_namespace,
    find_shards,
    running_buffers,
    running_shards,
    shard_actor_name,
)
from rlfleet.buffer.rate_limiter import RateLimiterSpec
from rlfleet.buffer.remote import DEFAULT_CONCURRENCY, shard_actor_class

__all__ = ["MAX_SHARDS", "ReplayService"]

log = logging.getLogger(__name__)


def _nodes_for(placement: str, num_shards: int) -> list[str]:
    here = ray.get_runtime_context().get_node_id()
    if placement == "pack":
        return [here] * num_shards
    alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    order = [here] + [n for n in alive if n != here]
    return [order[k % len(order)] for k in range(num_shards)]


class ReplayService:
    """A named, sharded replay buffer served by Ray actors.

    Runs on the driver. ``launch`` starts the shards (or reattaches to running ones);
    ``client()`` returns a ``BufferClient`` for this process; ``shutdown`` stops them.

    Example::

        svc = ReplayService.launch("cartpole", "/data/cartpole", capacity=1_000_000,
                                   num_shards=2, rate_limiter={"min_size_to_sample": 5000})
        client = svc.client()      # or BufferClient.connect("cartpole") anywhere
        ...
        ReplayService.shutdown("cartpole")   # data stays in /data/cartpole/shard-*
    """

    def __init__(self, name: str, num_shards: int, handles: list[Any],
                 namespace: str = DEFAULT_NAMESPACE) -> None:
        self.name = name
        self.namespace = namespace
        self.num_shards = num_shards
        self._handles = handles

    @classmethod
    def launch(
        cls,
        name: str,
        path: str | os.PathLike,
        capacity: int | str,
        num_shards: int = 1,
        *,
        sampler: str | Mapping[str, Any] = "uniform",
        rate_limiter: Mapping[str, Any] | None = None,
        durability: str = "process",
        placement: str = "spread",
        nodes: list[str] | None = None,
        detached: bool = True,
        overcommit: bool = False,
        seed: int | None = None,
        timeout_s: float = 120.0,
        namespace: str = DEFAULT_NAMESPACE,
        frame_stack: str | Mapping[str, Any] | None = None,
    ) -> "ReplayService":
        """Start the shards of buffer ``name``, or reattach to them if they run.

        Runs on the driver. Uses this process's Ray; when Ray is not initialised it
        joins the cluster named by ``RAY_ADDRESS`` (``rlfleet.buffer.init_ray``, the
        same bounded join as ``BufferClient.connect``) and raises ``ClusterConnectError``
        without one: call ``ray.init(address=...)`` first. A directory that already
        holds a shard is reopened with its data (relaunching after ``shutdown`` resumes).

        Args:
            name: the buffer's name (``naming.check_name``'s rule).
            path: the buffer's directory; shard ``k`` uses ``<path>/shard-<k>`` on the
                disk of the node it runs on. Made absolute here.
            capacity: total rows, or a size string ("500GB"), split evenly over shards.
            num_shards: shard actors, 1 to ``MAX_SHARDS`` (128).
            sampler: ``"uniform"``, ``"without_replacement"``, ``"prioritized"``,
                ``"sequence"``, or a mapping such as ``{"type": "prioritized",
                "alpha": 0.6, "beta": 0.4}``.
            rate_limiter: limiter settings (``min_size_to_sample``,
                ``samples_per_insert``, ``error_margin``, ``timeout_s``); None: no
                limits beyond a non-empty shard. With ``samples_per_insert`` and several
                shards the limiter is buffer-wide (kept by shard 0): the ratio and
                ``min_size_to_sample`` hold for the buffer as a whole. Otherwise each
                shard applies ``min_size_to_sample`` to its own rows.
            durability: ``"process"`` or ``"fsync"``.
            placement: ``"spread"`` (over nodes) or ``"pack"`` (all on this node).
            nodes: the node id of each shard (``num_shards`` ids), overriding
                ``placement``; ``rlfleet run`` passes the nodes it reserved.
            detached: shards outlive this process (``lifetime="detached"``).
            overcommit: allow capacity beyond the free disk (sparse files).
            seed: sampler seed; shard ``k`` uses ``seed + k`` (None: from the OS).
            timeout_s: how long to wait for every shard to open its directory.
            namespace: the Ray namespace of the shard actors; clients and ``shutdown``
                name the same one.
            frame_stack: store each frame of stacked observations once
                (``ReplayBuffer.create``'s ``frame_stack``); each client then writes all
                its batches to one shard (``write_plan``).

        Raises:
            ValueError: a bad argument, or running shards that differ from the request.
            ShardUnavailable: a shard did not start within ``timeout_s``.
        """
        check_name(name, argument="buffer name")
        check_namespace(namespace)
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) \
                or not 1 <= num_shards <= MAX_SHARDS:
            raise ValueError(
                f"num_shards={num_shards!r}: must be an int in [1, {MAX_SHARDS}] (every "
                f"index stores its shard number in {MAX_SHARDS.bit_length() - 1} bits); use "
                f"fewer, larger shards"
            )
        if placement not in ("spread", "pack"):
            raise ValueError(f"placement={placement!r}: must be 'spread' or 'pack'")
        if nodes is not None and len(nodes) != num_shards:
            raise ValueError(
                f"nodes: {len(nodes)} node id(s) given for num_shards={num_shards}; "
                f"give one node id per shard, or None to place by placement={placement!r}"
            )
        if durability not in ("process", "fsync"):
            raise ValueError(f"durability={durability!r}: must be 'process' or 'fsync'")
        limiter = RateLimiterSpec.from_mapping(rate_limiter).to_mapping()
        check_frame_stack(frame_stack)
        capacities = split_capacity(capacity, num_shards)
        # Ray not initialised: join RAY_ADDRESS's cluster, bounded, as BufferClient.connect
        # does; with no RAY_ADDRESS this raises, naming ray.init(address=...) as the fix.
        init_ray(None, namespace=namespace, timeout_s=min(timeout_s, DEFAULT_CONNECT_TIMEOUT_S))
        root = Path(path).expanduser().absolute()

        if name in running_shards(namespace):
            return cls._reattach(name, num_shards, namespace, timeout_s)

        actor_class = shard_actor_class()
        handles = []
        for k, node in enumerate(nodes if nodes is not None else _nodes_for(placement, num_shards)):
            options: dict[str, Any] = dict(
                name=shard_actor_name(name, k),
                namespace=namespace,
                max_restarts=-1,
                max_task_retries=-1,
                max_concurrency=DEFAULT_CONCURRENCY,  # the default group; see remote.py
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                get_if_exists=True,
            )
            if detached:
                options["lifetime"] = "detached"
            handles.append(actor_class.options(**options).remote(
                name, k, num_shards, str(root / f"shard-{k}"), capacities[k], sampler,
                limiter, durability, overcommit, None if seed is None else seed + k,
                namespace=namespace, frame_stack=frame_stack,
            ))
        service = cls(name, num_shards, handles, namespace)
        service._wait_ready(timeout_s)
        log.info("replay service %r (namespace %r): %d shard(s) under %s", name, namespace,
                 num_shards, root)
        return service

    @classmethod
    def _reattach(cls, name: str, num_shards: int, namespace: str,
                  timeout_s: float) -> "ReplayService":
        running, handles = find_shards(name, namespace)
        service = cls(name, len(handles), handles, namespace)
        infos = service._wait_ready(timeout_s)
        have = infos[0]["num_shards"]
        if have != num_shards or running != list(range(have)):
            raise ValueError(
                f"buffer {name!r} already runs with {have} shard(s) (found {running}); "
                f"asked for num_shards={num_shards}. Stop it first with "
                f"ReplayService.shutdown({name!r}) or `rlfleet stop {name}`"
            )
        log.info("replay service %r: reattached to %d running shard(s)", name, have)
        return service

    def _wait_ready(self, timeout_s: float) -> list[dict[str, Any]]:
        refs = [h.info.remote() for h in self._handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            missing = [k for k, r in enumerate(refs) if r not in ready]
            raise ShardUnavailable(
                f"buffer {self.name!r}: shard(s) {missing} did not start within "
                f"timeout_s={timeout_s:g}; check `ray status` for free resources and the "
                f"actor logs"
            )
        # a constructor error (bad directory, full disk) surfaces here as its own type
        return ray.get(refs)

    def client(self, *, seed: int | None = None, split: str = "whole") -> BufferClient:
        """A ``BufferClient`` for this process (``BufferClient.connect(name, namespace=...)``;
        ``split`` as there)."""
        return BufferClient.connect(self.name, namespace=self.namespace, seed=seed, split=split)

    @staticmethod
    def running(namespace: str = DEFAULT_NAMESPACE) -> list[str]:
        """Names of the buffers whose shards run in ``namespace`` on the cluster."""
        return running_buffers(check_namespace(namespace))

    @staticmethod
    def shutdown(name: str, *, namespace: str = DEFAULT_NAMESPACE, delete: bool = False,
                 timeout_s: float = 30.0) -> None:
        """Stop the shards of buffer ``name``; delete their directories if ``delete``.

        Each shard flushes and closes its buffer first (or, with ``delete``, removes its
        directory on its own node), then is killed without restart. Runs on any process
        attached to the cluster.

        Raises:
            BufferNotFound: no buffer of that name runs in ``namespace`` (the message
                lists those that do).
        """
        check_name(name, argument="buffer name")
        check_namespace(namespace)
        shards, handles = find_shards(name, namespace)
        refs = [(h.destroy if delete else h.close).remote() for h in handles]
        deadline = time.monotonic() + timeout_s
        for k, ref in zip(shards, refs):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except Exception as e:  # a dead or stuck shard is killed all the same
                log.warning("buffer %r shard %d did not close cleanly: %s", name, k, e)
        for h in handles:
            ray.kill(h, no_restart=True)
        # ray.kill returns before the cluster releases the names; wait for that, so a
        # relaunch under the same name (or `running()`) right after sees the buffer gone
        release_by = max(deadline, time.monotonic() + 10.0)
        while name in running_shards(namespace) and time.monotonic() < release_by:
            time.sleep(0.05)
        if name in running_shards(namespace):
            log.warning("buffer %r: shard names still taken %.0fs after the kill", name, timeout_s)
        log.info("replay service %r stopped%s", name, " and deleted" if delete else "")
