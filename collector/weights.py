"""Getting new policy weights from learner rank 0 into the collector actors.

Two kinds of transport, each in its own module holding both ends:

- ``"object_store"`` (``weights_object_store.py``): each new version is ``ray.put`` once
  and its reference handed to the fleet's registry; collectors fetch it from there.
- ``"distributed"`` (``weights_broadcast.py``): a gloo broadcast group from rank 0 to
  every collector, falling back to the object store while the group is not standing.

Rank 0 (or any process with Ray) publishes::

    publisher = make_publisher(kind, fleet=fleet.name, namespace=fleet.namespace,
                               num_collectors=fleet.num_workers)
    fleet.attach_weight_receiver(kind, **publisher.receiver_kwargs())   # on the driver
    publisher.publish(state_dict, version)    # False, nothing moved, if not newer
    metrics.update(publisher.stats())         # "weights/..." counters
    publisher.close()

and each collector actor polls its receiver between batches (``CollectorWorker``)::

    got = receiver.poll()          # never blocks long
    if got is not None:
        state_dict, version = got
        collector.set_weights(state_dict, version)

This module only names the protocols and builds ends by kind; it holds no state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from rlfleet.collector.weights_broadcast import BroadcastPublisher, BroadcastReceiver
from rlfleet.collector.weights_object_store import ObjectStorePublisher, ObjectStoreReceiver

__all__ = ["KINDS", "WeightPublisher", "WeightReceiver", "check_kind", "make_publisher", "make_receiver"]

KINDS = ("object_store", "distributed")


class WeightPublisher(Protocol):
    """Publishes versioned policy weights to a fleet (runs on learner rank 0, or any process with Ray)."""

    version: int
    """The last version published, -1 before the first."""

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> bool:
        """Make these the newest weights; False, and nothing moved, if ``version <= self.version``."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for metrics, keyed ``weights/...``."""
        ...

    def receiver_kwargs(self) -> dict[str, Any]:
        """What ``CollectorFleet.attach_weight_receiver(kind, **kwargs)`` needs to reach this publisher."""
        ...

    def close(self) -> None:
        """Release what the publisher holds (threads, stores)."""
        ...


class WeightReceiver(Protocol):
    """Receives versioned policy weights inside a collector actor (one thread polls it)."""

    def poll(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The newest ``(state_dict, version)`` if newer than the last returned, else None."""
        ...

    def close(self) -> None:
        """Release what the receiver holds (connections, groups)."""
        ...


def check_kind(kind: object) -> str:
    """``kind`` if it names a transport.

    Raises:
        ValueError: An unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"weight transport kind = {kind!r}: must be one of {list(KINDS)}")
    return str(kind)


def make_publisher(kind: str, *, fleet: str, namespace: str, num_collectors: int, **kwargs: Any) -> WeightPublisher:
    """The publishing end of transport ``kind`` for fleet ``fleet`` (which must be running).

    ``kwargs`` go to ``ObjectStorePublisher`` (``timeout_s``) or ``BroadcastPublisher``
    (``host``, ``port``, ``op_timeout_s``, ``form_timeout_s``, ``retry_s``).

    Raises:
        ValueError: An unknown kind, or no such fleet in ``namespace``.
    """
    if check_kind(kind) == "object_store":
        return ObjectStorePublisher(fleet=fleet, namespace=namespace, num_collectors=num_collectors, **kwargs)
    return BroadcastPublisher(fleet=fleet, namespace=namespace, num_collectors=num_collectors, **kwargs)


def make_receiver(kind: str, *, fleet: str, namespace: str, collector_index: int, num_collectors: int,
                  **kwargs: Any) -> WeightReceiver:
    """The receiving end of transport ``kind`` for collector ``collector_index`` (in its actor).

    ``kwargs`` are the publisher's ``receiver_kwargs()`` (and, for either kind, ``timeout_s``
    or ``connect_timeout_s`` where the receiver takes them).

    Raises:
        ValueError: An unknown kind.
        ConnectionError: A broadcast receiver cannot reach the publisher.
    """
    if check_kind(kind) == "object_store":
        return ObjectStoreReceiver(fleet=fleet, namespace=namespace, collector_index=collector_index,
                                   num_collectors=num_collectors, **kwargs)
    return BroadcastReceiver(fleet=fleet, namespace=namespace, collector_index=collector_index,
                             num_collectors=num_collectors, **kwargs)
