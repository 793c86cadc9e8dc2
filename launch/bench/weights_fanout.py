"""The weight fan-out measure that ``bench learner`` and ``bench remote`` share.

Runs on the driver. ``BenchFleet`` stands in for a ``CollectorFleet`` without envs: the
fleet's registry actor and ``num_workers`` receiver actors (``num_cpus=0``), each holding
one ``WeightReceiver`` as a collector does. ``publish_times`` times ``publish()`` to every
receiver holding the version; ``publish_latencies`` does that for both transports and
adds the bare gloo broadcast + ack between the same processes, the limit
``bench learner``'s docstring describes. Not thread-safe (one measure at a time).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["BenchFleet", "publish_latencies", "publish_times"]


class _ReceiverActor:
    """A stand-in collector process: holds one weight receiver and reports arrival times."""

    def __init__(self, kind: str, kwargs: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        from rlfleet.collector import make_receiver

        self.receiver = make_receiver(kind, **kwargs)

    def await_version(self, version: int, timeout_s: float) -> float:
        """Poll until ``version`` arrived; returns the wall-clock arrival time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.receiver.poll()
            if got is not None and got[1] >= version:
                return time.time()
            time.sleep(0.0005)
        raise TimeoutError(f"weights version {version} did not arrive within {timeout_s}s")

    def bare_broadcast(self, host: str, port: int, rank: int, size: int, nbytes: int, iters: int) -> None:
        """Join a plain gloo group and take part in ``iters + 1`` broadcasts from rank 0,
        each followed by the ack allreduce a ``BroadcastReceiver`` sends."""
        from datetime import timedelta

        import ray
        import torch.distributed as dist

        from rlfleet.collector.weights_broadcast import broadcast_options, gloo_group

        store = dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=60))
        group = gloo_group(store, 0, rank, size, host=ray.util.get_node_ip_address(), timeout_s=60.0)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        for _ in range(iters + 1):
            group.broadcast([buf], broadcast_options()).wait()
            group.allreduce([torch.ones(1, dtype=torch.int64)]).wait()

    def close(self) -> None:
        self.receiver.close()


class BenchFleet:
    """The part of a ``CollectorFleet`` a ``LearnerGroup`` uses, without envs: the
    registry actor and ``num_workers`` receiver actors (object store until a
    ``distributed`` receiver is attached). Runs on the driver."""

    def __init__(self, name: str, namespace: str, num_workers: int) -> None:
        import ray

        from rlfleet.buffer import actor_name
        from rlfleet.collector.registry import FleetRegistry

        self.name, self.namespace, self.num_workers = name, namespace, num_workers
        self._actor_cls = ray.remote(num_cpus=0)(_ReceiverActor)
        self.registry = ray.remote(FleetRegistry).options(
            name=actor_name(name, "collectors"), namespace=namespace, num_cpus=0
        ).remote(name, num_workers)
        ray.get(self.registry.ping.remote(), timeout=120.0)  # started, before anyone looks it up
        self.receivers: list[Any] = []
        self.attach_weight_receiver("object_store")

    def attach_weight_receiver(self, kind: str, **kwargs: Any) -> None:
        self._kill_receivers()
        self.receivers = [
            self._actor_cls.remote(kind, {"fleet": self.name, "namespace": self.namespace, "collector_index": i,
                                          "num_collectors": self.num_workers, **kwargs})
            for i in range(self.num_workers)
        ]

    def _kill_receivers(self) -> None:
        import ray

        for a in self.receivers:
            ray.kill(a)
        self.receivers = []

    def close(self) -> None:
        import ray

        self._kill_receivers()
        ray.kill(self.registry)


def publish_times(actors: list[Any], next_version: Callable[[], int], publish: Callable[[int], Any],
                  repeats: int) -> tuple[list[float], list[float]]:
    """Seconds from ``publish`` to every receiver holding the version, and until it returned."""
    import ray

    to_all, returned = [], []
    for i in range(repeats + 1):
        version = next_version()
        refs = [a.await_version.remote(version, 60.0) for a in actors]
        time.sleep(0.01)  # let every receiver start polling
        t0 = time.time()
        publish(version)
        t1 = time.time()
        arrived = ray.get(refs)
        if i:  # the first publish also pays for connecting
            to_all.append(max(arrived) - t0)
            returned.append(t1 - t0)
    return to_all, returned


def publish_latencies(m: int, repeats: int, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Median seconds (as ms) from ``publish()`` to all ``m`` receiver actors holding the
    version, for both transports, and the bare gloo broadcast + ack between the same
    processes (parts 2 and 3 of ``bench learner``'s docstring). Runs on the driver."""
    from datetime import timedelta

    import ray
    import torch.distributed as dist

    from rlfleet.buffer import DEFAULT_NAMESPACE
    from rlfleet.collector import make_publisher
    from rlfleet.collector.weights_broadcast import broadcast_options, gloo_group, pack_state_dict

    host = ray.util.get_node_ip_address()
    nbytes = int(pack_state_dict(state_dict, 0).numel())

    fleet = BenchFleet("bench-weights", DEFAULT_NAMESPACE, m)
    publisher = make_publisher("distributed", fleet=fleet.name, namespace=fleet.namespace, num_collectors=m)
    try:
        fleet.attach_weight_receiver("distributed", **publisher.receiver_kwargs())
        versions = itertools.count(1)
        distributed, _ = publish_times(fleet.receivers, lambda: next(versions),
                                    lambda v: publisher.publish(state_dict, v), repeats)
        # The limit: the same broadcast and ack allreduce, bare, between the same processes.
        store = dist.TCPStore(host, 0, None, True, timeout=timedelta(seconds=60), wait_for_workers=False)
        refs = [a.bare_broadcast.remote(host, store.port, i + 1, m + 1, nbytes, repeats)
                for i, a in enumerate(fleet.receivers)]
        group = gloo_group(store, 0, 0, m + 1, host=host, timeout_s=60.0)
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        bare = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            group.broadcast([buf], broadcast_options()).wait()
            ack = torch.zeros(1, dtype=torch.int64)
            group.allreduce([ack]).wait()  # returns once every rank holds the bytes
            if i:  # the first round also pays for connecting
                bare.append(time.perf_counter() - t0)
            if int(ack[0]) != m:
                raise RuntimeError(f"bench learner: bare ack from {int(ack[0])} of {m} receivers")
        ray.get(refs)
    finally:
        publisher.close()
        fleet.close()

    fleet = BenchFleet("bench-weights-store", DEFAULT_NAMESPACE, m)
    publisher = make_publisher("object_store", fleet=fleet.name, namespace=fleet.namespace, num_collectors=m)
    try:
        versions = itertools.count(1)
        object_store, _ = publish_times(fleet.receivers, lambda: next(versions),
                                     lambda v: publisher.publish(state_dict, v), repeats)
    finally:
        publisher.close()
        fleet.close()
    return {
        "bytes": nbytes,
        "distributed_p50_ms": 1e3 * statistics.median(distributed),
        "object_store_p50_ms": 1e3 * statistics.median(object_store),
        "bare_gloo_p50_ms": 1e3 * statistics.median(bare),
    }
