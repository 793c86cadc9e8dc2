"""Weight transports: the gloo broadcast group (publisher + receivers, real gloo, in threads
and across Ray actors, a receiver killed and replaced), the object store delivering the
same bytes, the broadcast publisher falling back to the object store by itself, and a
version that has not changed moving nothing."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import pytest
import torch

from rlfleet.buffer import DEFAULT_NAMESPACE as NAMESPACE
from rlfleet.collector.weights import KINDS, make_publisher
from rlfleet.collector.weights_broadcast import (
    BroadcastPublisher,
    BroadcastReceiver,
    pack_state_dict,
    unpack_state_dict,
)
from rlfleet.collector.weights_object_store import ObjectStorePublisher, ObjectStoreReceiver


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(16, 4, generator=g),
        "encoder.bias": torch.randn(16, generator=g),
        "head.weight": torch.randn(2, 16, generator=g).to(torch.float64),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for key in a:
        x, y = (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for v in (a[key], b[key]))
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), key


def poll_until(receiver, version: int, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    latest = None
    while time.monotonic() < deadline:
        got = receiver.poll()
        if got is not None:
            latest = got
            if got[1] >= version:
                return got
        time.sleep(0.02)
    raise AssertionError(f"version {version} not received within {timeout_s}s (last: {latest and latest[1]})")


def test_pack_round_trip() -> None:
    state = weights(3)
    got, version = unpack_state_dict(pack_state_dict(state, 42), [[k, str(v.dtype)[6:], list(v.shape)] for k, v in state.items()])
    assert version == 42
    assert_same(got, state)


def test_broadcast_reaches_every_receiver_in_order() -> None:
    # fleet=None: the group on its own, no object-store fallback (no Ray here)
    publisher = BroadcastPublisher(fleet=None, num_collectors=2, host="127.0.0.1", op_timeout_s=5.0,
                                   form_timeout_s=10.0)
    receivers = [BroadcastReceiver(collector_index=i, num_collectors=2, **publisher.receiver_kwargs()) for i in range(2)]
    try:
        for version in (0, 50, 100):
            assert publisher.publish(weights(version), version)
            assert publisher.wait_delivered(version, timeout_s=30.0)
            assert not publisher.publish(weights(version), version)  # not newer: nothing moves
            for r in receivers:
                state, got = poll_until(r, version)
                assert got == version
                assert_same(state, weights(version))
                assert r.poll() is None  # nothing newer
        stats = publisher.stats()
        assert stats["weights/generations"] == 1.0
        assert stats["weights/broadcasts"] == 3.0
        assert stats["weights/failures"] == 0.0
        assert [r.generations_joined for r in receivers] == [1, 1]
    finally:
        for r in receivers:
            r.close()
        publisher.close()


def test_receiver_index_checked() -> None:
    with pytest.raises(ValueError, match=r"collector_index=2 is outside \[0, num_collectors=2\)"):
        BroadcastReceiver(collector_index=2, num_collectors=2, host="127.0.0.1", port=1)


def test_unreachable_store_is_a_connection_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(ConnectionError, match=rf"cannot reach the weight publisher's store at 127.0.0.1:{port}"):
        BroadcastReceiver(collector_index=0, num_collectors=1, host="127.0.0.1", port=port, connect_timeout_s=1.0)


# ---------------------------------------------------------------- across Ray actors


@pytest.fixture
def receiver_host(ray_cluster):
    """A Ray actor class holding one receiver, as a collector actor does.

    Defined here, not at module level, so Ray pickles it by value (workers cannot
    import test modules).
    """
    import ray

    class ReceiverHost:
        def __init__(self, **kwargs: Any) -> None:
            self.receiver = BroadcastReceiver(**kwargs)

        def wait_for(self, version: int, timeout_s: float) -> tuple[dict[str, np.ndarray], int]:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                got = self.receiver.poll()
                if got is not None and got[1] >= version:
                    return {k: v.numpy() for k, v in got[0].items()}, got[1]
                time.sleep(0.02)
            raise TimeoutError(f"version {version} not received within {timeout_s}s")

    return ray.remote(num_cpus=0)(ReceiverHost)


@pytest.fixture
def registry(ray_cluster):
    """A fleet's registry actor on its own (no collectors): ``(fleet name, handle)``."""
    import ray

    from rlfleet.collector.registry import registry_name
    from rlfleet.collector.remote import RegistryActor

    fleet = f"wt-{uuid.uuid4().hex[:8]}"
    handle = ray.remote(RegistryActor).options(name=registry_name(fleet), namespace=NAMESPACE, num_cpus=0).remote(fleet, 2)
    ray.get(handle.ping.remote(), timeout=60)
    yield fleet, handle
    ray.kill(handle)


def registry_version(handle) -> int:
    import ray

    return ray.get(handle.weights_version.remote(), timeout=30)


def owned_objects() -> set[bytes]:
    """The objects this driver owns (what a ``ray.put`` adds to): Ray's reference table,
    read through its core worker as no public call lists it without the dashboard."""
    import ray

    return set(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


def test_killed_receiver_rejoins_a_new_generation(ray_cluster, receiver_host, registry) -> None:
    import ray

    fleet, handle = registry
    host = ray.util.get_node_ip_address()
    publisher = BroadcastPublisher(fleet=fleet, namespace=NAMESPACE, num_collectors=2, host=host, op_timeout_s=3.0,
                                   form_timeout_s=5.0, retry_s=1.0)
    kwargs = publisher.receiver_kwargs()
    actors = [receiver_host.remote(collector_index=i, num_collectors=2, **kwargs) for i in range(2)]
    try:
        publisher.publish(weights(1), 1)
        for state, version in ray.get([a.wait_for.remote(1, 60.0) for a in actors]):
            assert version == 1
            assert_same(state, weights(1))

        ray.kill(actors[1])
        with pytest.raises(ray.exceptions.RayActorError):  # ray.kill is asynchronous
            ray.get(actors[1].wait_for.remote(1, 1.0), timeout=60.0)
        # Keep publishing, as a learner does: the process may outlive its death in Ray's
        # eyes for a moment, and a broadcast into that moment still succeeds.
        version = 1
        deadline = time.monotonic() + 60.0
        while publisher.stats()["weights/failures"] < 1 and time.monotonic() < deadline:
            version += 1
            publisher.publish(weights(version), version)
            time.sleep(0.5)
        assert publisher.stats()["weights/failures"] >= 1
        assert not publisher.group_ready
        # With the group down, the publisher itself put the newest version in the object store.
        _wait(lambda: registry_version(handle) == version, 30.0, f"version {version} in the object store")
        assert publisher.stats()["weights/object_store_version"] == version

        actors[1] = receiver_host.remote(collector_index=1, num_collectors=2, **kwargs)  # the restart
        version += 1
        publisher.publish(weights(version), version)
        assert publisher.wait_delivered(version, timeout_s=60.0)
        for state, got in ray.get([a.wait_for.remote(version, 60.0) for a in actors]):
            assert got == version
            assert_same(state, weights(version))
        assert publisher.stats()["weights/generations"] == 2.0
    finally:
        for a in actors:
            ray.kill(a)
        publisher.close()


def test_object_store_and_broadcast_deliver_the_same_weights(ray_cluster, receiver_host, registry) -> None:
    import ray

    fleet, handle = registry
    publisher = BroadcastPublisher(fleet=fleet, namespace=NAMESPACE, num_collectors=1,
                                   host=ray.util.get_node_ip_address(), op_timeout_s=5.0, form_timeout_s=10.0)
    actor = None
    try:
        # No receiver yet, so no group: version 4 goes through the object store, from the
        # publisher itself (no driver relays it).
        assert publisher.publish(weights(4), 4)
        assert registry_version(handle) == 4 and not publisher.group_ready
        # fleet=: the receiver also reads the fleet's object-store weights.
        actor = receiver_host.remote(collector_index=0, num_collectors=1, fleet=fleet, namespace=NAMESPACE,
                                     **publisher.receiver_kwargs())
        by_object_store, version = ray.get(actor.wait_for.remote(4, 60.0))
        assert version == 4
        assert_same(by_object_store, weights(4))
        # Once the group stands, a new version is broadcast and the object store is left alone.
        assert publisher.wait_delivered(4, timeout_s=60.0) and publisher.group_ready
        assert publisher.publish(weights(5), 5)
        by_broadcast, version = ray.get(actor.wait_for.remote(5, 60.0))
        assert version == 5
        assert_same(by_broadcast, weights(5))
        assert publisher.wait_delivered(5, timeout_s=60.0)
        assert registry_version(handle) == 4
        assert publisher.stats()["weights/object_store_version"] == 4.0
        # The two transports carry the same bytes.
        store = ObjectStorePublisher(fleet=fleet, namespace=NAMESPACE, num_collectors=1)
        assert store.publish(weights(5), 5)
        got, version = ObjectStoreReceiver(fleet=fleet, namespace=NAMESPACE).poll()
        assert version == 5
        assert_same(by_broadcast, got)
    finally:
        if actor is not None:
            ray.kill(actor)
        publisher.close()


@pytest.mark.parametrize("kind", KINDS)
def test_an_unchanged_version_moves_nothing(ray_cluster, registry, kind) -> None:
    """Publishing a version that is not newer returns False and moves nothing: the
    registry keeps its version and reference, and no object is put."""
    import ray

    fleet, handle = registry
    # (the broadcast publisher has no receivers, so its versions go through the object store)
    publisher = make_publisher(kind, fleet=fleet, namespace=NAMESPACE, num_collectors=2)
    try:
        assert publisher.version == -1
        assert publisher.publish(weights(3), 3)
        assert publisher.version == 3 and registry_version(handle) == 3
        before_ref = ray.get(handle.newer_weights.remote(-1))[1][0]
        before = owned_objects()
        stats = publisher.stats()
        for version in (3, 2, -1):
            assert not publisher.publish(weights(version + 10), version)
        assert publisher.version == 3 and registry_version(handle) == 3
        assert ray.get(handle.newer_weights.remote(-1))[1][0] == before_ref
        assert owned_objects() == before
        assert publisher.stats() == stats
        assert publisher.publish(weights(4), 4)  # a newer one moves
        assert registry_version(handle) == 4 and owned_objects() != before
    finally:
        publisher.close()


def test_publishers_need_a_running_fleet(ray_cluster) -> None:
    for kind in KINDS:
        with pytest.raises(ValueError, match=r"fleet = 'no-such-fleet': no collector fleet registry "
                           r"'rlfleet:no-such-fleet:collectors' in namespace 'rlfleet'"):
            make_publisher(kind, fleet="no-such-fleet", namespace=NAMESPACE, num_collectors=1)
    with pytest.raises(ValueError, match=r"weight transport kind = 'pigeon': must be one of \['object_store', 'distributed'\]"):
        make_publisher("pigeon", fleet="x", namespace=NAMESPACE, num_collectors=1)


# ---------------------------------------------------------------- a whole fleet


def _wait(predicate, timeout_s: float, what: str, tick=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.mark.slow
def test_killed_collector_rejoins_the_weight_group(ray_cluster, tmp_path) -> None:
    """A collector actor killed mid-run is restarted by Ray, rejoins a new broadcast
    generation, and stamps newer versions on its rows than before it died."""
    import ray

    from rlfleet.buffer import ReplayService
    from rlfleet.collector import CollectorFleet
    from rlfleet.collector.config import CollectorConfig, EnvConfig, PolicyConfig
    from rlfleet.collector.registry import collector_name
    from rlfleet.launch.config import LearnerConfig
    from rlfleet.launch.learners import LearnerGroup

    name = "wt-fleet-kill"
    policy = PolicyConfig(hidden=(16,))
    learner = LearnerConfig(batch_size=32, publish_every=5, checkpoint_every=10**6, prefetch=1)
    service = ReplayService.launch(name, tmp_path / "buffer", capacity=10_000, detached=False, seed=0)
    fleet = CollectorFleet(name, service.client(), env=EnvConfig(num_envs=2), policy=policy,
                           collector=CollectorConfig(num_workers=2, frames_per_batch=64, init_random_frames=0))
    group = None
    try:
        group = LearnerGroup(learner, policy, run_name=name, buffer=name, observation_space=fleet.observation_space,
                             action_space=fleet.action_space, run_dir=tmp_path / "run", fleet=fleet)
        group.publish()
        fleet.start()
        client = service.client()
        _wait(lambda: len(client) >= 256, 120.0, "256 rows in the buffer")

        def status() -> dict:
            return ray.get(group.actors[0].weight_status.remote())

        _wait(lambda: status()["weights/generations"] >= 1 and status()["weights/delivered_version"] >= 10,
              120.0, "a broadcast of version >= 10", tick=lambda: group.step(5))
        ray.kill(ray.get_actor(collector_name(name, 1), namespace=NAMESPACE), no_restart=False)
        _wait(lambda: status()["weights/generations"] >= 2, 180.0, "a second broadcast generation",
              tick=lambda: (group.step(5), fleet.health_check()))
        target = int(group.step(5)["learner/policy_version"])
        _wait(lambda: status()["weights/delivered_version"] >= target and status()["weights/group_ready"],
              120.0, f"version {target} broadcast to both collectors", tick=lambda: group.step(5))
        # Both collectors, the restarted one included, now stamp the newer version.
        _wait(lambda: fleet.stats()["policy_version"] >= target, 120.0, f"collectors at version >= {target}")
    finally:
        if group is not None:
            group.shutdown()
        fleet.stop()
        ReplayService.shutdown(name)
