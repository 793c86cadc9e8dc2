"""A replay service in a Ray namespace of its own: launched, found, sampled, pickled and
stopped there, and invisible from the default namespace (on the session's local Ray,
whose driver runs in the default namespace ``rlfleet``)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict

from rlfleet.buffer import DEFAULT_NAMESPACE, BufferClient, BufferNotFound, ReplayService, running_buffers
from rlfleet.buffer.indices import shard_of

NS = "rlfleet-ns-test"
NAME = "svc-ns"


def rows(ids) -> TensorDict:
    ids = torch.as_tensor(list(ids), dtype=torch.int64)
    return TensorDict({"observation": ids.float()[:, None].repeat(1, 3), "step": ids}, batch_size=[len(ids)])


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    # two shards with the buffer-wide limiter: shard 1 finds shard 0 in this namespace
    svc = ReplayService.launch(
        NAME, tmp_path_factory.mktemp("ns"), capacity=1000, num_shards=2, seed=0, namespace=NS,
        rate_limiter={"samples_per_insert": 1.0, "error_margin": 1e6, "timeout_s": 30.0},
    )
    yield svc
    if NAME in ReplayService.running(namespace=NS):
        ReplayService.shutdown(NAME, namespace=NS, delete=True)


def test_the_service_lives_in_its_namespace_only(service):
    assert (service.name, service.namespace, service.num_shards) == (NAME, NS, 2)
    assert ReplayService.running(namespace=NS) == [NAME] == running_buffers(NS)
    assert NAME not in ReplayService.running() and NAME not in running_buffers(DEFAULT_NAMESPACE)
    for k in range(2):
        ray.get_actor(f"rlfleet:{NAME}:shard-{k}", namespace=NS)
        with pytest.raises(ValueError):
            ray.get_actor(f"rlfleet:{NAME}:shard-{k}", namespace=DEFAULT_NAMESPACE)
    with pytest.raises(BufferNotFound, match=rf"no replay buffer named '{NAME}' runs on this Ray "
                       rf"cluster \(namespace 'rlfleet'\)"):
        BufferClient.connect(NAME)
    with pytest.raises(BufferNotFound, match=r"\(namespace 'rlfleet'\)"):
        ReplayService.shutdown(NAME)


def test_a_client_of_the_default_namespace_process_writes_and_samples_there(service):
    client = BufferClient.connect(NAME, namespace=NS, seed=1, split="rows")  # a batch from both shards
    assert client.namespace == NS and client.num_shards == 2
    assert repr(client) == f"BufferClient({NAME!r}, namespace={NS!r}, shards=2, split='rows')"
    for first in range(0, 120, 40):  # 40-row batches go to the emptier shard: both get rows
        client.extend(rows(range(first, first + 40)))
    assert len(client) == 120
    assert sorted(s["size"] for s in client.stats()["shards"]) == [40, 80]
    batch = client.sample(200)
    assert batch.batch_size == torch.Size([200])
    assert set(shard_of(batch["index"].numpy()).tolist()) == {0, 1}
    np.testing.assert_array_equal(batch["observation"][:, 0].long().numpy(), batch["step"].numpy())
    assert service.client().namespace == NS


def test_a_pickled_client_reconnects_in_its_namespace(service):
    client = BufferClient.connect(NAME, namespace=NS)
    before = len(client)

    @ray.remote(num_cpus=0)
    def use(c: BufferClient, batch: TensorDict) -> tuple[str, int, int]:
        index = c.extend(batch)
        return c.namespace, len(index), len(c.sample(16))

    namespace, written, sampled = ray.get(use.remote(client, rows(range(500, 510))), timeout=120)
    assert (namespace, written, sampled) == (NS, 10, 16)
    assert len(client) == before + 10


def test_the_same_name_in_two_namespaces_is_two_services(service, tmp_path):
    other = ReplayService.launch(NAME, tmp_path, capacity=10, num_shards=1)
    try:
        assert other.namespace == DEFAULT_NAMESPACE and NAME in ReplayService.running()
        mine = BufferClient.connect(NAME)
        mine.extend(rows(range(3)))
        assert len(mine) == 3
        assert len(BufferClient.connect(NAME, namespace=NS)) >= 120
    finally:
        ReplayService.shutdown(NAME, delete=True)
    assert NAME not in ReplayService.running() and ReplayService.running(namespace=NS) == [NAME]


def test_shutdown_in_the_namespace_stops_it(service):
    ReplayService.shutdown(NAME, namespace=NS)
    assert ReplayService.running(namespace=NS) == []
    with pytest.raises(BufferNotFound, match=rf"\(namespace '{NS}'\); running buffers: none"):
        BufferClient.connect(NAME, namespace=NS)


def test_a_bad_namespace_is_refused_before_ray_is_asked(ray_cluster, tmp_path):
    with pytest.raises(ValueError, match=r"^namespace = 'a/b': use 1-64 letters"):
        ReplayService.launch("svc-x", tmp_path, capacity=10, namespace="a/b")
    with pytest.raises(ValueError, match=r"^namespace = '': use 1-64 letters"):
        BufferClient.connect("svc-x", namespace="")
    assert list(tmp_path.iterdir()) == []
