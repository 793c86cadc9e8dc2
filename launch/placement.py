"""Where a run's actors go: one placement plan, reserved up front, so a run fits or says why.

Runs on the driver. ``rlfleet run`` does::

    plan = plan_placement(config, name, cluster_nodes(), driver_node)   # pure
    placement = reserve(plan, timeout_s=config.ray.placement_timeout_s)
    ReplayService.launch(..., nodes=list(placement.shard_nodes))
    CollectorFleet(..., placement_group=placement.group("collector"))
    LearnerGroup(..., placement_group=placement.group("learner"))
    ...
    placement.remove()                                                   # at run end

The plan has three placement groups, one per role, because each role wants its own
strategy:

- shards: one bundle per node that holds shards. The plan picks the nodes (the driver's
  node first, then the others by id; only nodes offering ``buffer.node_resource`` when
  the config names one) and ties each bundle to its node with a ``ray.io/node-id`` label
  selector. The shard actors themselves stay outside the group, pinned to their node
  by node affinity: a bundle moves when its node dies, and a shard must never reopen
  on a node that does not hold its files. The bundle is the reservation: the run fails
  before anything starts if the node is gone or lacks the resource. A shard takes no
  CPU, and a bundle must hold some resource, so it holds a little memory (which a shard
  does use, for its sampler and page cache).
- collectors: one bundle per collector (1 CPU plus ``collector.num_gpus``, fractional
  allowed), ``SPREAD`` over the nodes.
- learners: one bundle per rank (1 CPU, plus 1 GPU when ``learner.device`` is cuda, so
  they land on GPU nodes), ``PACK`` (a DDP group talks most within a node).

Before reserving, the plan is fitted (first fit) against each node's total resources,
so a run that can never fit fails at once; one that fits but finds the resources taken
waits up to ``timeout_s``. Either way the error names the bundles that do not fit and
lists every node's resources.

Not thread-safe: one driver thread plans, reserves and removes. The module runs a little
past 400 lines on purpose: the plan, its fit check and the reservation share one bundle
type and one error message, and split apart each would read half a story.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from rlfleet.buffer import actor_name
from rlfleet.launch.preflight import CPUS_PER_COLLECTOR, CPUS_PER_LEARNER

__all__ = [
    "Bundle",
    "NodeInfo",
    "Placement",
    "PlacementError",
    "PlacementPlan",
    "cluster_nodes",
    "fit",
    "plan_placement",
    "reserve",
]

logger = logging.getLogger(__name__)

ROLES = ("shard", "collector", "learner")
STRATEGIES = {"shard": "PACK", "collector": "SPREAD", "learner": "PACK"}
NODE_ID_LABEL = "ray.io/node-id"
# What a shard bundle holds: a shard asks for no CPU (it mostly waits on I/O).
SHARD_MEMORY_BYTES = 64 * 2**20
# Share of buffer.node_resource a shard bundle holds: enough to require the resource,
# small enough that several runs can keep shards on the same node.
NODE_RESOURCE_SHARE = 0.001
_EPS = 1e-9


class PlacementError(ValueError):
    """The run's actors do not fit the cluster (the message says which and why)."""


@dataclass(frozen=True)
class Bundle:
    """One bundle of a placement group: the resources of one actor (or one node's shards).

    Attributes:
        role: ``shard``, ``collector`` or ``learner``.
        index: position in its group (shard bundles: the k-th node holding shards).
        resources: what the bundle reserves, e.g. ``{"CPU": 1.0, "GPU": 0.25}``.
        node_id: the node a shard bundle must land on (None: anywhere).
        shards: the shard numbers a shard bundle stands for.
    """

    role: str
    index: int
    resources: dict[str, float]
    node_id: str | None = None
    shards: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass(frozen=True)
class NodeInfo:
    """An alive Ray node and its resources (total, or free, as the caller took them)."""

    node_id: str
    ip: str
    resources: dict[str, float]

    @property
    def short(self) -> str:
        return self.node_id[:8]


@dataclass(frozen=True)
class PlacementPlan:
    """What a run reserves. Built by :func:`plan_placement`; reserve it with :func:`reserve`.

    Attributes:
        name: the run's service name (names the groups ``rlfleet:<name>:<role>s``).
        shard_nodes: the node id of each shard, ``[num_shards]`` (empty when no node
            can hold shards: the plan then fails to fit, naming the resource).
        bundles: role -> its bundles, in actor order.
        hints: role -> the settings that change what that role needs.
    """

    name: str
    shard_nodes: tuple[str, ...]
    bundles: dict[str, tuple[Bundle, ...]]
    hints: dict[str, str] = field(default_factory=dict)

    def all_bundles(self) -> list[Bundle]:
        return [b for role in ROLES for b in self.bundles.get(role, ())]


def cluster_nodes() -> list[NodeInfo]:
    """Alive nodes with their total resources. Needs Ray initialised in this process."""
    import ray

    return [
        NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})))
        for n in ray.nodes() if n.get("Alive")
    ]


def _free_nodes(removed: list[Any] | None = None) -> list[NodeInfo]:
    """Alive nodes with their free resources now (totals where Ray does not say).

    ``removed``: placement groups just removed; waits (a few seconds at most) until
    their reservations no longer show, since removal is asynchronous.
    """
    import time

    ids = [g.id.hex() for g in removed or []]
    deadline = time.monotonic() + 5.0
    while True:
        try:
            # Per-node free resources have no public API; the GCS accessor behind
            # ray.available_resources() has them.
            from ray._private.state import available_resources_per_node

            free = available_resources_per_node()
        except Exception:  # an older or newer Ray without it: totals still say a lot
            logger.debug("per-node free resources unavailable", exc_info=True)
            free = {}
        held = any(i in key for i in ids for res in free.values() for key in res)
        if not held or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return [NodeInfo(n.node_id, n.ip, dict(free.get(n.node_id, n.resources))) for n in cluster_nodes()]


def plan_placement(config: Any, name: str, nodes: list[NodeInfo], driver_node: str | None = None) -> PlacementPlan:
    """The bundles of a run on these nodes. Pure: tested without Ray.

    Args:
        config: the ``RunConfig`` (reads ``buffer``, ``collector``, ``learner``).
        name: the run's service name.
        nodes: alive nodes with their total resources (:func:`cluster_nodes`).
        driver_node: the driver's node id; it takes the first shard when it may.

    Returns:
        A :class:`PlacementPlan`.
    """
    buffer, collector, learner = config.buffer, config.collector, config.learner
    resource = buffer.node_resource
    eligible = sorted(n.node_id for n in nodes if resource is None or n.resources.get(resource, 0.0) > 0)
    if driver_node in eligible:
        eligible.remove(driver_node)
        eligible.insert(0, driver_node)
    if eligible:
        order = eligible[:1] if buffer.placement == "pack" else eligible
        shard_nodes = tuple(order[k % len(order)] for k in range(buffer.num_shards))
    else:
        shard_nodes = ()
    shard_resources: dict[str, float] = {"memory": float(SHARD_MEMORY_BYTES)}
    if resource is not None:
        shard_resources[resource] = NODE_RESOURCE_SHARE
    if shard_nodes:
        used = list(dict.fromkeys(shard_nodes))
        shards = tuple(
            Bundle("shard", i, dict(shard_resources), node,
                   tuple(k for k, n in enumerate(shard_nodes) if n == node))
            for i, node in enumerate(used)
        )
    else:  # no node may hold a shard: one bundle that fits nowhere says so
        shards = (Bundle("shard", 0, dict(shard_resources), None, tuple(range(buffer.num_shards))),)

    collector_resources = {"CPU": CPUS_PER_COLLECTOR}
    if collector.num_gpus:
        collector_resources["GPU"] = float(collector.num_gpus)
    learner_resources = {"CPU": CPUS_PER_LEARNER}
    if learner.device.startswith("cuda"):
        learner_resources["GPU"] = 1.0
    bundles = {
        "shard": shards,
        "collector": tuple(Bundle("collector", i, dict(collector_resources)) for i in range(collector.num_workers)),
        "learner": tuple(Bundle("learner", r, dict(learner_resources)) for r in range(learner.num_learners)),
    }
    hints = {
        "shard": (
            f"shards go to nodes offering {resource!r}: start nodes with --resources='{{\"{resource}\": 1}}' "
            "or unset buffer.node_resource" if resource else
            f"a shard bundle holds {SHARD_MEMORY_BYTES // 2**20} MiB of Ray memory on its node"
        ),
        "collector": (
            f"collector.num_workers={collector.num_workers} x {_fmt(collector_resources)}; lower "
            "collector.num_workers or collector.num_gpus, or add nodes"
        ),
        "learner": (
            f"learner.num_learners={learner.num_learners} x {_fmt(learner_resources)}; lower "
            "learner.num_learners" + (", use learner.device=cpu, or add GPU nodes"
                                      if "GPU" in learner_resources else ", or add nodes")
        ),
    }
    return PlacementPlan(name, shard_nodes, bundles, hints)


def fit(bundles: list[Bundle], nodes: list[NodeInfo]) -> list[Bundle]:
    """The bundles that do not fit these nodes' resources, by first fit. Pure.

    Shard bundles go to their node (none: they fit nowhere); the rest, largest GPU then CPU need
    first, to the first node with room. Ray's own placement may do better on a crowded
    cluster; this is what the error message explains, not a scheduler.
    """
    room = {n.node_id: dict(n.resources) for n in nodes}

    def take(node_id: str, need: dict[str, float]) -> bool:
        have = room.get(node_id)
        if have is None or any(have.get(r, 0.0) + _EPS < v for r, v in need.items()):
            return False
        for r, v in need.items():
            have[r] = have.get(r, 0.0) - v
        return True

    unplaced = []
    pinned = [b for b in bundles if b.role == "shard"]
    free = sorted((b for b in bundles if b.role != "shard"),
                  key=lambda b: (-b.resources.get("GPU", 0.0), -b.resources.get("CPU", 0.0)))
    for b in pinned:
        if b.node_id is None or not take(b.node_id, b.resources):
            unplaced.append(b)
    for b in free:
        if not any(take(n.node_id, b.resources) for n in nodes):
            unplaced.append(b)
    return sorted(unplaced, key=lambda b: (ROLES.index(b.role), b.index))


class Placement:
    """A reserved plan: its placement groups, one per role. Runs on the driver.

    Use :meth:`group` to schedule actors into bundles and :meth:`remove` at run end.
    """

    def __init__(self, plan: PlacementPlan, groups: dict[str, Any]) -> None:
        self.plan = plan
        self.groups = groups

    @property
    def shard_nodes(self) -> tuple[str, ...]:
        return self.plan.shard_nodes

    def group(self, role: str) -> Any | None:
        """The placement group of ``role`` (``collector``, ``learner``), or None."""
        return self.groups.get(role)

    def lost_shard_nodes(self) -> dict[str, list[int]]:
        """Shard nodes no longer alive: ``{node_id: [shard, ...]}`` (empty: all up)."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        lost: dict[str, list[int]] = {}
        for k, node in enumerate(self.plan.shard_nodes):
            if node not in alive:
                lost.setdefault(node, []).append(k)
        return lost

    def lost_shards_message(self, buffer: str, path: Any) -> str | None:
        """A message naming the lost nodes and their shards, or None when all are up."""
        import ray

        lost = self.lost_shard_nodes()
        if not lost:
            return None
        ips = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
        parts = [
            f"node {node[:8]} ({ips.get(node, '?')}) left the cluster with replay shard(s) "
            f"{', '.join(str(k) for k in shards)} of buffer {buffer!r}"
            for node, shards in lost.items()
        ]
        lost_dirs = ", ".join(f"{path}/shard-{k}" for shards in lost.values() for k in shards)
        return (
            f"{'; '.join(parts)}. The run stopped: sampling without those shards would change "
            f"what the learners see. Their rows stay on that node's disk ({lost_dirs}); the "
            f"other shards are intact. Bring the node back and continue with "
            f"`rlfleet run --resume RUN_DIR`"
        )

    def remove(self) -> None:
        """Remove every placement group (actors still in them are killed by Ray)."""
        from ray.util.placement_group import remove_placement_group

        for role, group in self.groups.items():
            try:
                remove_placement_group(group)
            except Exception as e:  # already gone with the cluster
                logger.warning("placement group of %ss: removal failed: %s", role, e)
        self.groups = {}


def reserve(plan: PlacementPlan, *, timeout_s: float = 60.0) -> Placement:
    """Reserve ``plan`` with one placement group per role and wait until all are placed.

    Runs on the driver with Ray initialised.

    Raises:
        PlacementError: a bundle cannot fit any node (at once), or the groups were not
            placed within ``timeout_s`` (every group is removed first). The message
            names the bundles that do not fit and lists each node's resources.
    """
    import ray
    from ray.util.placement_group import placement_group

    nodes = cluster_nodes()
    unplaced = fit(plan.all_bundles(), nodes)
    if unplaced:
        raise PlacementError(_message(plan, unplaced, nodes, "cannot fit", "total resources"))
    groups: dict[str, Any] = {}
    placement = Placement(plan, groups)
    try:
        for role in ROLES:
            bundles = plan.bundles.get(role, ())
            if not bundles:
                continue
            selectors = [{NODE_ID_LABEL: b.node_id} if b.node_id else {} for b in bundles]
            groups[role] = placement_group(
                [b.resources for b in bundles],
                strategy=STRATEGIES[role],
                name=actor_name(plan.name, f"{role}s"),
                bundle_label_selector=selectors if any(selectors) else None,
            )
        refs = {role: g.ready() for role, g in groups.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        pending = [role for role, ref in refs.items() if ref not in ready]
    except BaseException:
        placement.remove()
        raise
    if pending:
        removed = list(groups.values())
        placement.remove()
        free = _free_nodes(removed)
        # Every group is removed, so the whole plan must fit what is free at once.
        unplaced = fit(plan.all_bundles(), free) or [b for role in pending for b in plan.bundles[role]]
        raise PlacementError(_message(
            plan, unplaced, free, f"were not placed within timeout_s={timeout_s:g}",
            "free resources now; other jobs hold the rest, see `ray status`; or raise "
            "ray.placement_timeout_s",
        ))
    logger.info("placement for %r reserved: %s", plan.name,
                ", ".join(f"{len(plan.bundles[r])} {r} bundle(s)" for r in groups))
    return placement


def _message(plan: PlacementPlan, unplaced: list[Bundle], nodes: list[NodeInfo], what: str, which: str) -> str:
    total = len(plan.all_bundles())
    lines = [f"placement of run {plan.name!r}: {len(unplaced)} of {total} bundle(s) {what}:"]
    for role in ROLES:
        mine = [b for b in unplaced if b.role == role]
        if not mine:
            continue
        for b in mine:
            where = f" on node {b.node_id[:8]}" if b.node_id else ""
            shards = f" (shards {', '.join(map(str, b.shards))})" if b.shards else ""
            lines.append(f"  {b.label}{shards} needs {_fmt(b.resources)}{where}")
        lines.append(f"  -> {plan.hints.get(role, '')}")
    lines.append(f"The cluster has {len(nodes)} alive node(s) ({which}):")
    for n in nodes:
        lines.append(f"  {n.short} {n.ip}: {_fmt(n.resources, always=('CPU', 'GPU'))}")
    return "\n".join(lines)


def _fmt(resources: dict[str, float], always: tuple[str, ...] = ()) -> str:
    """``CPU 2, GPU 0.5, memory 1.5 GiB, rlfleet_buffer 1``: what a person needs to read.

    Ray's bookkeeping resources (``node:<ip>``, accelerator types, the object store)
    are left out; ``always`` lists resources shown even when absent (as 0).
    """
    values = {k: 0.0 for k in always}
    values.update(resources)
    shown = []
    for key in sorted(values, key=lambda k: (k not in ("CPU", "GPU", "memory"), k)):
        if key.startswith(("node:", "accelerator_type")) or key == "object_store_memory" or "_group_" in key:
            continue  # Ray's bookkeeping, and the per-placement-group copies of resources
        value = values[key]
        if key == "memory":
            text = f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"
        else:
            text = f"{value:g}"
        shown.append(f"{key} {text}")
    return ", ".join(shown) or "nothing"
