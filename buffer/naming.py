"""Names and namespaces: the name rule, rlfleet's Ray actor names, and finding buffers.

Every rlfleet actor is named ``rlfleet:<group>:<component>`` (``actor_name``) in a Ray
namespace, ``DEFAULT_NAMESPACE`` (``"rlfleet"``) unless the caller chooses another: a
buffer's shards are ``rlfleet:<buffer>:shard-<k>``, a fleet's collectors
``rlfleet:<fleet>:collector-<i>``, a run's learners ``rlfleet:<run>:learner-<r>``. A
group name and a namespace follow one rule (``check_name``), because they name Ray
actors and may name directories: 1-64 letters, digits, ``_ . -``, starting with a letter
or digit, no ``..``. So a listing of named actors is enough to find everything rlfleet
runs: ``running_buffers`` and ``find_shards`` do that for replay services.

Runs anywhere; the discovery functions need Ray initialised in this process. Pure
functions, thread-safe.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import ray

from rlfleet.buffer.errors import BufferNotFound

__all__ = [
    "DEFAULT_NAMESPACE",
    "actor_name",
    "check_name",
    "check_namespace",
    "find_shards",
    "not_found_message",
    "parse_actor_name",
    "running_buffers",
    "running_shards",
    "shard_actor_name",
]

DEFAULT_NAMESPACE = "rlfleet"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ACTOR_RE = re.compile(r"rlfleet:(?P<group>[^:]+):(?P<component>[^:]+)")
_SHARD_RE = re.compile(r"shard-(?P<shard>[0-9]+)")


def check_name(value: object, *, argument: str) -> str:
    """Return ``value`` if it is a valid rlfleet name (buffer, fleet, run), else raise.

    Args:
        value: the name to check.
        argument: what the caller calls it, for the message (``"buffer name"``).

    Raises:
        ValueError: not a string of 1-64 letters, digits, ``_ . -`` starting with a
            letter or digit, or one holding ``..``.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{argument} = {value!r}: use 1-64 letters, digits, '_', '.' or '-', starting "
            f"with a letter or digit (it names Ray actors and directories)"
        )
    return value


def check_namespace(value: object, *, argument: str = "namespace") -> str:
    """Return ``value`` if it is a valid Ray namespace for rlfleet (``check_name``'s rule)."""
    return check_name(value, argument=argument)


def actor_name(group: str, component: str) -> str:
    """The Ray actor name of ``component`` of ``group``: ``rlfleet:<group>:<component>``."""
    return f"rlfleet:{group}:{component}"


def parse_actor_name(name: str) -> tuple[str, str] | None:
    """``(group, component)`` of an rlfleet actor name, or None for any other name."""
    match = _ACTOR_RE.fullmatch(name) if isinstance(name, str) else None
    return None if match is None else (match["group"], match["component"])


def shard_actor_name(buffer: str, shard: int) -> str:
    """The Ray actor name of shard ``shard`` of buffer ``buffer``."""
    return actor_name(buffer, f"shard-{shard}")


def running_shards(namespace: str = DEFAULT_NAMESPACE) -> dict[str, list[int]]:
    """Buffers with shard actors in ``namespace``: ``{name: sorted shard numbers}``.

    Needs Ray initialised in this process.
    """
    found: dict[str, list[int]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != namespace:
            continue
        parsed = parse_actor_name(entry.get("name", ""))
        shard = None if parsed is None else _SHARD_RE.fullmatch(parsed[1])
        if shard is not None:
            found.setdefault(parsed[0], []).append(int(shard["shard"]))
    return {k: sorted(v) for k, v in sorted(found.items())}


def running_buffers(namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """Names of the buffers whose shards run in ``namespace``, sorted.

    Needs Ray initialised in this process.
    """
    return list(running_shards(namespace))


def not_found_message(name: str, namespace: str, running: Mapping[str, Any] | list[str]) -> str:
    """The ``BufferNotFound`` message: which buffer, where, and which ones do run."""
    have = ", ".join(repr(n) for n in running) or "none"
    return (
        f"no replay buffer named {name!r} runs on this Ray cluster (namespace "
        f"{namespace!r}); running buffers: {have}. Start one with ReplayService.launch or "
        f"`rlfleet serve CONFIG`"
    )


def find_shards(name: str, namespace: str = DEFAULT_NAMESPACE) -> tuple[list[int], list[Any]]:
    """The shard numbers and Ray handles of the running buffer ``name``.

    Raises:
        BufferNotFound: no buffer of that name runs in ``namespace`` (the message lists
            those that do).
    """
    running = running_shards(namespace)
    if name not in running:
        raise BufferNotFound(not_found_message(name, namespace, running))
    handles = []
    for k in running[name]:
        try:
            handles.append(ray.get_actor(shard_actor_name(name, k), namespace=namespace))
        except ValueError as e:  # stopped between the listing and now
            raise BufferNotFound(not_found_message(name, namespace, running_shards(namespace))) from e
    return running[name], handles
