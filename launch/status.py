"""The live state of rlfleet's actors and nodes: what ``rlfleet status`` shows beside the
buffer figures.

Runs in any process attached to the cluster (the ``rlfleet status`` command, a notebook).
rlfleet's actors carry readable names, ``rlfleet:<group>:<component>``
(``rlfleet.buffer.actor_name``) in one Ray namespace (``ray.namespace`` of a run,
``rlfleet`` unless set), where the group is a run (or a buffer started by ``rlfleet
serve``) and the component is ``shard-<k>``, ``collector-<i>``, ``collectors`` (the fleet's registry) or
``learner-<r>``. Ray's actor states map to four words::

    DEPENDENCIES_UNREADY, PENDING_CREATION -> starting
    ALIVE -> running        RESTARTING -> restarting        DEAD -> stopped

The actor table is read from the cluster's GCS, the store behind ``ray.nodes()``, not
through Ray's state API (``ray.util.state.list_actors``): that API asks the dashboard's
HTTP server, which a cluster started without a dashboard lacks (small configs and the
test cluster turn it off), and then falls back to 127.0.0.1:8265, which on a shared
machine may be another cluster. Stopped actors are listed only in groups that still
have a live one, so finished runs do not pile up.

Thread-safe: every call reads the cluster afresh and keeps no state.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from rlfleet.buffer import DEFAULT_NAMESPACE, parse_actor_name

__all__ = [
    "STATES",
    "Component",
    "NodeRow",
    "components_table",
    "list_components",
    "list_nodes",
    "nodes_table",
]

STATES = {
    "DEPENDENCIES_UNREADY": "starting",
    "PENDING_CREATION": "starting",
    "ALIVE": "running",
    "RESTARTING": "restarting",
    "DEAD": "stopped",
}
_NIL_NODE = re.compile(r"^(0+|f+)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Component:
    """One rlfleet actor as ``rlfleet status`` shows it.

    Attributes:
        group: the run or buffer it belongs to.
        component: ``shard-0``, ``collector-1``, ``collectors``, ``learner-0``...
        actor_name: its Ray actor name (as on the Ray dashboard).
        state: ``starting``, ``running``, ``restarting`` or ``stopped``.
        ray_state: Ray's own word for it.
        node_id: the node it runs (or last ran) on; None while not placed.
        node_ip: that node's address.
        restarts: how often Ray restarted it.
        pid: its worker process id (None while not running).
    """

    group: str
    component: str
    actor_name: str
    state: str
    ray_state: str
    node_id: str | None
    node_ip: str | None
    restarts: int
    pid: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NodeRow:
    """One Ray node: its id, address, whether it is alive and its total CPU / GPU."""

    node_id: str
    ip: str
    alive: bool
    cpus: float
    gpus: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _actor_table() -> list[dict[str, Any]]:
    # Why the GCS and not ray.util.state: see the module docstring.
    from ray._private import state

    return list(state.actors().values())


def _live_names(namespace: str) -> set[str]:
    import ray

    return {
        entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry.get("namespace") == namespace
    }


def list_components(group: str | None = None, *, namespace: str = DEFAULT_NAMESPACE) -> list[Component]:
    """rlfleet's actors on the cluster, sorted by group then component.

    Args:
        group: only this run or buffer (None: all).
        namespace: the Ray namespace the actors were named in (``ray.namespace``).

    Needs Ray initialised in this process. A stopped actor is listed by name only
    (Ray's table of dead actors keeps no namespace), in groups that still have a live
    actor in ``namespace``.
    """
    import ray

    ips = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()}
    live = _live_names(namespace)
    latest: dict[str, dict[str, Any]] = {}
    for entry in _actor_table():
        name = entry.get("Name") or ""
        parsed = parse_actor_name(name)
        if parsed is None or (group is not None and parsed[0] != group):
            continue
        if entry.get("State") != "DEAD" and name not in live:
            continue  # same name in another namespace
        # A name may have several records (an actor re-created after it died): keep
        # the live one, else the last to die.
        held = latest.get(name)
        if held is None or _rank(entry) > _rank(held):
            latest[name] = entry
    live_groups = {parse_actor_name(n)[0] for n, e in latest.items() if e.get("State") != "DEAD"}
    out = []
    for name, entry in latest.items():
        group_name, component = parse_actor_name(name)
        if group_name not in live_groups:
            continue
        node = (entry.get("Address") or {}).get("NodeID") or ""
        node_id = None if _NIL_NODE.match(node) else node
        running = entry.get("State") == "ALIVE"
        out.append(Component(
            group=group_name, component=component, actor_name=name,
            state=STATES.get(entry.get("State", ""), "unknown"), ray_state=entry.get("State", "?"),
            node_id=node_id, node_ip=ips.get(node_id) if node_id else None,
            restarts=int(entry.get("NumRestarts") or 0),
            pid=int(entry["Pid"]) if running and entry.get("Pid") else None,
        ))
    return sorted(out, key=lambda c: (c.group, _component_order(c.component)))


def _rank(entry: dict[str, Any]) -> tuple[int, float]:
    return (entry.get("State") != "DEAD", float(entry.get("EndTime") or entry.get("StartTime") or 0))


def _component_order(component: str) -> tuple[int, str, int]:
    kind, _, number = component.rpartition("-")
    order = {"shard": 0, "collector": 2, "learner": 3}
    if not number.isdigit():
        kind, number = component, "0"
    return (order.get(kind, 1), kind, int(number))


def list_nodes(components: list[Component] | None = None) -> list[NodeRow]:
    """Alive nodes, and dead ones that some listed component ran on. Needs Ray."""
    import ray

    used = {c.node_id for c in components or []}
    rows = []
    for n in ray.nodes():
        if not n.get("Alive") and n["NodeID"] not in used:
            continue
        resources = n.get("Resources") or {}
        rows.append(NodeRow(n["NodeID"], n.get("NodeManagerAddress", "?"), bool(n.get("Alive")),
                            float(resources.get("CPU", 0)), float(resources.get("GPU", 0))))
    return sorted(rows, key=lambda r: (not r.alive, r.ip, r.node_id))


def components_table(components: list[Component]) -> str:
    """The components as an aligned text table (one line per actor)."""
    rows = [["component", "state", "node", "restarts", "pid"]]
    for c in components:
        node = f"{c.node_ip} {c.node_id[:8]}" if c.node_id else "-"
        rows.append([c.actor_name, c.state, node, str(c.restarts), str(c.pid or "-")])
    return _align(rows)


def nodes_table(nodes: list[NodeRow], components: list[Component]) -> str:
    """The nodes as an aligned text table, with how many components run on each."""
    rows = [["node", "ip", "state", "CPU", "GPU", "components"]]
    for n in nodes:
        mine = [c for c in components if c.node_id == n.node_id and c.state != "stopped"]
        rows.append([n.node_id[:8], n.ip, "alive" if n.alive else "dead", f"{n.cpus:g}", f"{n.gpus:g}",
                     str(len(mine))])
    return _align(rows)


def _align(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
