"""Getting new policy weights into collector actors.

A collector actor owns one ``WeightReceiver`` and polls it between batches::

    got = receiver.poll()          # never blocks long
    if got is not None:
        state_dict, version = got
        collector.set_weights(state_dict, version)

Two kinds, built with ``make_receiver(kind, collector_index=i, num_collectors=M, **kwargs)``:

- ``"object_store"`` (here): the driver ``ray.put``s the state dict once, as numpy
  arrays, and hands the reference and version to the fleet's registry actor
  (``publish_weights``); receivers ask the registry for anything newer than what they
  hold, then fetch the arrays zero-copy from the object store. It survives collector
  restarts: a restarted actor's first poll returns the newest weights.
- ``"distributed"``: a torch.distributed broadcast from learner rank 0, in
  ``rlfleet.collector.weights_dist`` (imported only when asked for).

Receivers run inside a collector actor, one thread at a time (not thread-safe).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["ObjectStoreReceiver", "WeightReceiver", "make_receiver", "publish_weights", "state_dict_to_numpy"]

log = logging.getLogger(__name__)

NAMESPACE = "rlfleet"
KINDS = ("object_store", "distributed")


def registry_name(fleet: str) -> str:
    """The registry actor of fleet ``fleet`` (namespace ``rlfleet``)."""
    return f"rlfleet:{fleet}:collectors"


class WeightReceiver(Protocol):
    """Receives versioned policy weights inside a collector actor."""

    def poll(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The newest ``(state_dict, version)`` if newer than the last returned, else None."""
        ...

    def close(self) -> None:
        """Release what the receiver holds (connections, groups)."""
        ...


def state_dict_to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """CPU numpy copies of a state dict's tensors (what crosses Ray cheaply)."""
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in state_dict.items()}


def publish_weights(registry: Any, state_dict: Mapping[str, Any], version: int, *, timeout_s: float = 30.0) -> None:
    """Put ``state_dict`` in the object store once and make it the newest weights.

    Runs on the driver or a learner process. The arrays go to the object store once;
    every receiver fetches the same object.
    """
    import ray

    ref = ray.put(state_dict_to_numpy(state_dict))
    # The reference travels inside a list so that Ray passes it on instead of resolving it.
    ray.get(registry.set_weights.remote(int(version), [ref]), timeout=timeout_s)


class ObjectStoreReceiver:
    """Polls the fleet registry for newer weights (runs in a collector actor).

    Args:
        fleet: The fleet's name (its registry is ``rlfleet:<fleet>:collectors``).
        collector_index: This collector's index (unused: every collector gets the same weights).
        num_collectors: Fleet size (unused, accepted for a uniform ``make_receiver``).
        timeout_s: Longest wait for the registry or the object store per poll.
    """

    def __init__(self, *, fleet: str, collector_index: int = 0, num_collectors: int = 1,
                 timeout_s: float = 5.0) -> None:
        import ray

        self._registry = ray.get_actor(registry_name(fleet), namespace=NAMESPACE)
        self._timeout_s = timeout_s
        self._version = -1

    def poll(self) -> tuple[dict[str, torch.Tensor], int] | None:
        import ray

        try:
            newest = ray.get(self._registry.newer_weights.remote(self._version), timeout=self._timeout_s)
            if newest is None:
                return None
            version, (ref,) = newest
            arrays = ray.get(ref, timeout=self._timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            # Keep collecting with the weights we have; the next poll tries again.
            log.warning("weights poll failed (%s); keeping version %d", e, self._version)
            return None
        # Object-store arrays are read-only views: copy into tensors the policy may own.
        state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        self._version = version
        return state, version

    def close(self) -> None:
        self._registry = None


def make_receiver(kind: str, **kwargs: Any) -> WeightReceiver:
    """Build a receiver of ``kind`` (``"object_store"`` or ``"distributed"``) in this actor.

    Raises:
        ValueError: An unknown kind.
    """
    if kind == "object_store":
        return ObjectStoreReceiver(**kwargs)
    if kind == "distributed":
        from rlfleet.collector.weights_dist import DistributedReceiver

        return DistributedReceiver(**kwargs)
    raise ValueError(f"weight receiver kind {kind!r}: must be one of {list(KINDS)}")
