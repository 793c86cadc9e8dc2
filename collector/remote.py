"""The Ray actors of a collector fleet: thin shells over plain classes.

- ``CollectorActor`` (actor ``collector_name(fleet, i)``): builds one
  ``CollectorWorker`` (``worker.py``, where the loop, pause, budget and sender thread
  live) with the fleet's registry behind a ``RegistryClient``, the buffer as its sink,
  the weight receivers of ``weights.py`` and Ray metrics; then forwards control calls.
  Runs with ``max_concurrency > 1`` so that control calls are served while the worker
  collects; every method is thread-safe (the worker's are).
- ``RegistryActor`` (actor ``registry_name(fleet)``): ``FleetRegistry``
  (``registry.py``) as an actor; calls run one at a time.

Restarts: a collector actor registers as it is constructed, also when Ray reconstructs
it after a crash (``max_restarts``), and then resumes by itself (see ``worker.py``). The
frames it resumes from come from its last report, so after a kill they can lag the rows
it had sent by up to one report interval (exact with ``report_interval_s=0``).
"""

from __future__ import annotations

import sys
from typing import Any

import ray
import torch

from rlfleet.buffer import BufferClient
from rlfleet.collector.config import CollectorConfig, EnvConfig, PolicyConfig
from rlfleet.collector.metrics import CollectorMetrics
from rlfleet.collector.registry import FleetRegistry, registry_name
from rlfleet.collector.weights import WeightReceiver, make_receiver
from rlfleet.collector.worker import CollectorWorker

__all__ = ["CollectorActor", "REGISTRY_TIMEOUT_S", "RegistryActor", "RegistryClient"]

REGISTRY_TIMEOUT_S = 30.0
# The sender thread needs the GIL for a few short stretches per batch; with Python's
# default 5 ms switch interval each one waited for the stepping loop to yield, and the
# loop then waited for the send (1 actor x 32 envs: 0.43 -> 0.52 of the ceiling).
SWITCH_INTERVAL_S = 0.0005


class RegistryActor(FleetRegistry):
    """``FleetRegistry`` as a Ray actor (wrap with ``ray.remote``); nothing added."""


class RegistryClient:
    """The worker's ``Registry`` calls on a registry actor's handle.

    ``register`` and ``grant`` wait for the answer (at most ``timeout_s``); ``report``
    is fire-and-forget (the registry keeps only the latest). Thread-safe.
    """

    def __init__(self, handle: Any, timeout_s: float = REGISTRY_TIMEOUT_S) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def register(self, index: int) -> dict[str, Any]:
        return ray.get(self.handle.register.remote(index), timeout=self.timeout_s)

    def report(self, index: int, stats: dict[str, Any]) -> None:
        self.handle.report.remote(index, stats)

    def grant(self, index: int, batches: int, batch_frames: int) -> int:
        return ray.get(self.handle.grant.remote(index, batches, batch_frames), timeout=self.timeout_s)


class CollectorActor:
    """Collector ``index`` of fleet ``fleet``; see the module docstring.

    Args:
        fleet: The fleet's name.
        namespace: The fleet's Ray namespace (its registry's, and the buffer's if
            ``buffer`` is a name).
        index: This collector's index.
        num_collectors: The fleet's size.
        seed: The run's seed.
        env, collector, policy: What the collector runs.
        buffer: A ``BufferClient`` or the buffer's name.
    """

    def __init__(self, fleet: str, namespace: str, index: int, num_collectors: int, seed: int, env: EnvConfig,
                 collector: CollectorConfig, policy: PolicyConfig, buffer: BufferClient | str) -> None:
        # One intra-op thread: a collector's forward pass is small, and actors share cores.
        torch.set_num_threads(1)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.index = index
        registry = RegistryClient(ray.get_actor(registry_name(fleet), namespace=namespace))
        sink = BufferClient.connect(buffer, namespace=namespace) if isinstance(buffer, str) else buffer

        def build_receiver(kind: str, kwargs: dict[str, Any]) -> WeightReceiver:
            return make_receiver(kind, fleet=fleet, namespace=namespace, collector_index=index,
                                 num_collectors=num_collectors, **kwargs)

        self.worker = CollectorWorker(
            fleet=fleet, index=index, seed=seed, env=env, collector=collector, policy=policy, sink=sink,
            registry=registry, build_receiver=build_receiver, metrics=CollectorMetrics(f"{fleet}:{index}"),
            num_threads=1,
        )

    def ping(self) -> int:
        return self.index

    def start(self) -> None:
        self.worker.start()

    def pause(self, timeout_s: float = 60.0) -> bool:
        return self.worker.pause(timeout_s)

    def resume(self) -> None:
        self.worker.resume()

    def stop(self, timeout_s: float = 60.0) -> bool:
        return self.worker.stop(timeout_s)

    def attach_receiver(self, kind: str, kwargs: dict[str, Any]) -> None:
        self.worker.attach_receiver(kind, kwargs)

    def status(self) -> dict[str, Any]:
        return self.worker.status()
