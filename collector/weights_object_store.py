"""The object-store weight transport, both ends: ``ObjectStorePublisher`` and ``ObjectStoreReceiver``.

The publisher (learner rank 0, the driver's ``CollectorFleet.set_weights``, or the
broadcast publisher's fallback) ``ray.put``s each new version once, as numpy arrays, and
hands the reference and version to the fleet's registry actor. Each receiver (one per
collector actor) asks the registry for anything newer than what it holds, then fetches
the arrays zero-copy from the object store. A version that is not newer than the last
published moves nothing. It survives collector restarts: a restarted collector's first
poll returns the newest weights.

Both ends find the registry by name, ``registry_name(fleet)`` in the fleet's namespace.
The publisher is thread-safe (a lock: the broadcast publisher calls it from its caller's
thread and its sender thread); a receiver is polled by one thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
import torch

from rlfleet.buffer import DEFAULT_NAMESPACE
from rlfleet.collector.registry import registry_name

__all__ = ["ObjectStorePublisher", "ObjectStoreReceiver", "registry_handle", "state_dict_to_numpy"]

log = logging.getLogger(__name__)


def state_dict_to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """CPU numpy copies of a state dict's tensors (the form weights cross Ray in)."""
    return {k: (v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v))
            for k, v in state_dict.items()}


def _numpy_views(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    # For ray.put, which copies anyway: numpy views of CPU tensors, no copy of our own.
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in state_dict.items()}


def registry_handle(fleet: str, namespace: str) -> Any:
    """The Ray handle of fleet ``fleet``'s registry actor.

    Raises:
        ValueError: No such fleet is running in ``namespace``.
    """
    name = registry_name(fleet)
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError as e:
        raise ValueError(
            f"fleet = {fleet!r}: no collector fleet registry {name!r} in namespace {namespace!r}; "
            "build the CollectorFleet first, with the same name and namespace"
        ) from e


class ObjectStorePublisher:
    """Publishes weights to a fleet through the object store (any process with Ray).

    Args:
        fleet: The fleet's name.
        namespace: The fleet's Ray namespace.
        num_collectors: The fleet's size (every collector reads the same object).
        timeout_s: Longest wait for the registry per publish.

    Raises:
        ValueError: No such fleet is running.
    """

    def __init__(self, *, fleet: str, namespace: str = DEFAULT_NAMESPACE, num_collectors: int = 1,
                 timeout_s: float = 30.0) -> None:
        self.fleet, self.namespace, self.num_collectors = fleet, namespace, int(num_collectors)
        self.timeout_s = float(timeout_s)
        self._registry = registry_handle(fleet, namespace)
        self._lock = threading.Lock()
        self.version = -1
        self.publishes = 0
        self.last_publish_s = 0.0

    def publish(self, state_dict: Mapping[str, Any], version: int) -> bool:
        """Make ``state_dict`` the newest weights if ``version`` is newer than the last
        published; False (and nothing moved) otherwise, or if the registry already
        holds a newer version."""
        version = int(version)
        with self._lock:
            if version <= self.version:
                return False
            start = time.perf_counter()
            ref = ray.put(_numpy_views(state_dict))
            # The reference travels inside a list so that Ray passes it on instead of resolving it.
            newest = ray.get(self._registry.set_weights.remote(version, [ref]), timeout=self.timeout_s)
            self.version = version
            self.publishes += 1
            self.last_publish_s = time.perf_counter() - start
            return newest == version

    def receiver_kwargs(self) -> dict[str, Any]:
        """What ``attach_weight_receiver("object_store", ...)`` needs: nothing."""
        return {}

    def stats(self) -> dict[str, float]:
        """Counters for metrics (``weights/...``)."""
        return {
            "weights/version": float(self.version),
            "weights/publishes": float(self.publishes),
            "weights/last_publish_s": self.last_publish_s,
        }

    def close(self) -> None:
        """Nothing to release: the registry keeps the newest weights for restarted collectors."""


class ObjectStoreReceiver:
    """Polls the fleet registry for newer weights (runs in a collector actor).

    Args:
        fleet: The fleet's name.
        namespace: The fleet's Ray namespace.
        collector_index: This collector's index (unused: every collector gets the same weights).
        num_collectors: Fleet size (unused, accepted for a uniform ``make_receiver``).
        timeout_s: Longest wait for the registry or the object store per poll.
    """

    def __init__(self, *, fleet: str, namespace: str = DEFAULT_NAMESPACE, collector_index: int = 0,
                 num_collectors: int = 1, timeout_s: float = 5.0) -> None:
        self._registry = registry_handle(fleet, namespace)
        self._timeout_s = timeout_s
        self._version = -1

    def poll(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The newest ``(state_dict, version)`` if newer than the last returned, else None."""
        try:
            newest = ray.get(self._registry.newer_weights.remote(self._version), timeout=self._timeout_s)
            if newest is None:
                return None
            version, (ref,) = newest
            arrays = ray.get(ref, timeout=self._timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            # Keep collecting with the weights we have; the next poll tries again. (An
            # object is lost when its publisher, a learner rank, died.)
            log.warning("weights poll failed (%s); keeping version %d", e, self._version)
            return None
        # Object-store arrays are read-only views: copy into tensors the policy may own.
        state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        self._version = version
        return state, version

    def close(self) -> None:
        self._registry = None
