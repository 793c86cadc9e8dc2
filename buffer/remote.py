"""The Ray actor shell over ``ReplayShard`` (``shard``): concurrency groups, nothing else.

``shard_actor_class`` runs on the driver that launches a service (``service``); the
class it returns runs in each shard's actor process. It wraps the plain ``ReplayShard``
with ``ray.remote`` as a threaded actor whose methods run in three concurrency groups:
``insert`` (``extend`` and the buffer-wide limiter's forwarded insert admissions),
``sample`` (``sample`` and forwarded sample admissions) and the default group for
everything that never blocks (stats, pings, priority updates, the buffer-wide
limiter's size reports and cancels). A side blocked by the rate limiter can take every
thread of its own group, never one that the other side needs to release it.

Thread-safe: building the class is cached; the actor's methods are ``ReplayShard``'s.
"""

from __future__ import annotations

import functools
from typing import Any

import ray

from rlfleet.buffer.shard import ReplayShard

__all__ = ["DEFAULT_CONCURRENCY", "INSERT_CONCURRENCY", "SAMPLE_CONCURRENCY", "shard_actor_class"]

# threads per concurrency group of a shard actor: blocked writers (insert), blocked
# samplers (sample, forwarded ones included on shard 0); the default group's calls never
# block, so a few threads serve them
INSERT_CONCURRENCY = 32
SAMPLE_CONCURRENCY = 32
DEFAULT_CONCURRENCY = 8
_METHOD_GROUPS = {
    "extend": "insert",
    "forwarded_acquire_insert": "insert",
    "sample": "sample",
    "forwarded_acquire_sample": "sample",
}


@functools.cache
def shard_actor_class() -> Any:
    """``ReplayShard`` as a Ray actor class with its concurrency groups (built once).

    ``max_concurrency`` in ``.options`` sizes the default group.
    """

    def in_group(name: str, group: str) -> Any:
        plain = getattr(ReplayShard, name)

        def method(self: ReplayShard, *args: Any, **kwargs: Any) -> Any:
            return plain(self, *args, **kwargs)

        # not functools.wraps: Ray follows __wrapped__ and would lose the group
        method.__name__, method.__qualname__ = name, plain.__qualname__
        method.__doc__ = plain.__doc__
        return ray.method(concurrency_group=group)(method)

    grouped = type("ReplayShard", (ReplayShard,),
                   {name: in_group(name, group) for name, group in _METHOD_GROUPS.items()})
    return ray.remote(concurrency_groups={"insert": INSERT_CONCURRENCY,
                                          "sample": SAMPLE_CONCURRENCY})(grouped)
