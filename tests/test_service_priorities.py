"""Priority updates through the service on the session's real local Ray cluster: a bad
call changes nothing on any shard, overwritten rows are skipped and counted, and indices
of an earlier buffer under the same name (or of another buffer) are refused."""

from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict

from rlfleet.buffer import BufferNotFound, ReplayService, StaleIndexError
from rlfleet.buffer.indices import (
    MAX_TAG,
    TAG_SHIFT,
    clear_shard,
    shard_of,
    tag_of,
    with_shard,
)


def rows(ids) -> TensorDict:
    ids = torch.as_tensor(list(ids), dtype=torch.int64)
    return TensorDict({"observation": ids.float()[:, None].repeat(1, 3), "step": ids},
                      batch_size=[len(ids)])


def arrays(ids) -> dict[tuple[str, ...], np.ndarray]:
    ids = np.asarray(list(ids), dtype=np.int64)
    return {("observation",): np.repeat(ids.astype(np.float32)[:, None], 3, axis=1), ("step",): ids}


def shard(name: str, k: int):
    return ray.get_actor(f"rlfleet:{name}:shard-{k}", namespace="rlfleet")


@pytest.fixture(scope="module")
def prio(ray_cluster, tmp_path_factory):
    """Two prioritized shards of 100 rows each: ids 0..99 on shard 0, 100..199 on shard 1.

    ``early`` connected before any row was written, so it knows no shard's rows.
    """
    svc = ReplayService.launch("svc-prio2", tmp_path_factory.mktemp("prio2"), capacity=200,
                               num_shards=2, seed=0,
                               sampler={"type": "prioritized", "alpha": 1.0, "beta": 1.0})
    early = svc.client(seed=1)
    client = svc.client(seed=2)
    index = torch.cat([client.extend(rows(range(0, 100))), client.extend(rows(range(100, 200)))])
    assert sorted(set(shard_of(index.numpy()).tolist())) == [0, 1]
    yield client, early, index
    ReplayService.shutdown("svc-prio2", delete=True)


def masses_and_counts(client) -> list[tuple[float, int, int]]:
    return [(s["priority_mass"], s["priority_updates"], s["priority_updates_skipped"])
            for s in client.stats()["shards"]]


def other_tag(i: int) -> int:
    """Index ``i`` with another tag: what an earlier or another buffer's index looks like."""
    return i ^ (int((tag_of(np.int64(i)) + 1) % MAX_TAG ^ tag_of(np.int64(i))) << TAG_SHIFT)


# (name, how to spoil the third entry, priorities, error, message)
BAD = [
    ("nan", lambda i: i, [2.0, 3.0, float("nan")], ValueError,
     r"priority\[2\]=nan is not a finite number >= 0"),
    ("negative-priority", lambda i: i, [2.0, 3.0, -1.0], ValueError,
     r"priority\[2\]=-1.0 is not a finite number >= 0"),
    ("negative-index", lambda i: -1, [2.0, 3.0, 4.0], StaleIndexError,
     r"index\[2\]=-1 is negative"),
    ("no-such-shard", lambda i: int(with_shard(clear_shard(np.int64(i)), 5)), [2.0, 3.0, 4.0],
     StaleIndexError, r"index\[2\]=\d+ names shard 5, but buffer 'svc-prio2' has shards 0..1"),
    ("another-tag", other_tag, [2.0, 3.0, 4.0], StaleIndexError,
     r"index\[2\]=\d+ belongs to an earlier buffer deleted and created again under the name "
     r"'svc-prio2', or to another buffer"),
    ("never-written", lambda i: i + 150, [2.0, 3.0, 4.0], StaleIndexError,
     r"index\[2\]=\d+ names row 150 of shard 1, which has written rows 0..99: it was never written"),
    ("too-large", lambda i: i, [2.0, 3.0, 1e306], ValueError,
     r"priority\[2\]=1e\+306 is above \d\.\d+e\+305, the largest shard 1 of buffer 'svc-prio2' accepts"),
]


@pytest.mark.parametrize("spoil, priority, error, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
@pytest.mark.parametrize("who", ["client", "early"])
def test_one_bad_entry_among_good_ones_for_two_shards_changes_no_priority(prio, who, spoil, priority,
                                                                         error, message):
    client, early, index = prio
    caller = client if who == "client" else early
    # a live row of shard 0, one of shard 1, then shard 1's first row, spoilt
    idx = [int(index[5]), int(index[150]), spoil(int(index[100]))]
    before = masses_and_counts(client)
    with pytest.raises(error, match=message):
        caller.update_priority(torch.tensor(idx), torch.tensor(priority, dtype=torch.float64))
    assert masses_and_counts(client) == before


def test_a_client_that_never_heard_of_the_rows_asks_their_shards_once_and_updates(prio):
    client, early, index = prio
    # early's table says both shards hold nothing: the indices reach past it, so it asks
    before = masses_and_counts(client)
    assert early.update_priority(index[[10, 110]], torch.tensor([5.0, 7.0])) == 0
    after = masses_and_counts(client)
    assert after[0][0] == pytest.approx(before[0][0] - 1.0 + 5.0)
    assert after[1][0] == pytest.approx(before[1][0] - 1.0 + 7.0)
    assert (after[0][1] - before[0][1], after[1][1] - before[1][1]) == (1, 1)


def test_overwritten_rows_are_skipped_and_counted_over_both_shards(prio):
    client, _, index = prio
    before = client.stats()["total"]
    # 40 more rows straight into each shard overwrite the oldest 40 of each
    ray.get([shard("svc-prio2", k).extend.remote(arrays(range(1000 + 40 * k, 1040 + 40 * k)))
             for k in (0, 1)])
    pick = torch.cat([index[30:50], index[130:150]])  # 10 + 10 of them overwritten
    assert client.update_priority(pick, torch.full((40,), 2.0)) == 20
    total = client.stats()["total"]
    assert total["priority_updates"] - before["priority_updates"] == 20
    assert total["priority_updates_skipped"] - before["priority_updates_skipped"] == 20
    shards = client.stats()["shards"]
    assert [s["priority_updates_skipped"] for s in shards] == [10, 10]


def test_indices_of_an_earlier_buffer_under_the_same_name_and_path_are_refused(prio, ray_cluster, tmp_path):
    name = "svc-relaunch"
    svc = ReplayService.launch(name, tmp_path, capacity=400, num_shards=2, seed=0,
                               sampler={"type": "prioritized", "alpha": 0.6, "beta": 0.4})
    old_client = svc.client(seed=0, split="rows")  # indices from both shards in one batch
    old_client.extend(rows(range(100)))
    old_client.extend(rows(range(100, 200)))
    old = old_client.sample(300)["index"]
    assert set(shard_of(old.numpy()).tolist()) == {0, 1}
    old_tags = [ray.get(shard(name, k).info.remote())["index_tag"] for k in (0, 1)]
    ReplayService.shutdown(name, delete=True)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
    svc = ReplayService.launch(name, tmp_path, capacity=400, num_shards=2, seed=0,
                               sampler={"type": "prioritized", "alpha": 0.6, "beta": 0.4})
    try:
        new_client = svc.client(seed=1)
        # as many rows again: every old counter names a live row of the new buffer
        new_client.extend(rows(range(100)))
        new_client.extend(rows(range(100, 200)))
        before = masses_and_counts(new_client)
        earlier = (r"index\[\d+\]=\d+ belongs to an earlier buffer deleted and created again "
                   r"under the name 'svc-relaunch', or to another buffer")
        # the old client meets dead shards, finds the new ones by name, and checks again
        with pytest.raises(StaleIndexError, match=earlier):
            old_client.update_priority(old, torch.ones(300))
        with pytest.raises(StaleIndexError, match=earlier):
            new_client.update_priority(old, torch.ones(300))
        # a shard itself refuses them too, and Ray hands its error over as the same type
        new_tags = [ray.get(shard(name, k).info.remote())["index_tag"] for k in (0, 1)]
        k = next(k for k in (0, 1) if new_tags[k] != old_tags[k])
        mine = clear_shard(old.numpy()[shard_of(old.numpy()) == k])
        with pytest.raises(StaleIndexError, match=r"belongs to another buffer or to an earlier "
                           r"buffer created at .*shard-" + str(k)):
            ray.get(shard(name, k).update_priority.remote(mine, np.ones(len(mine))))
        # and so are the indices of another running buffer
        _, _, other = prio
        with pytest.raises(StaleIndexError, match=r"belongs to an earlier buffer deleted and created "
                           r"again under the name 'svc-relaunch', or to another buffer"):
            new_client.update_priority(other[:10], torch.ones(10))
        assert masses_and_counts(new_client) == before
        # the new buffer's own indices go through
        fresh = new_client.sample(50)["index"]
        assert new_client.update_priority(fresh, torch.full((50,), 3.0)) == 0
    finally:
        ReplayService.shutdown(name, delete=True)
    # indices the client's table accepts, of a buffer now gone: it meets dead shards,
    # looks the name up again, and says the buffer is gone
    with pytest.raises(BufferNotFound, match=r"no replay buffer named 'svc-relaunch'"):
        new_client.update_priority(fresh, torch.ones(50))


def test_a_shard_whose_directory_was_replaced_refuses_its_part_and_the_error_names_what_was_stored(
        ray_cluster, tmp_path):
    # the one race the client cannot see: shard 1's directory is deleted under the running
    # service and the restarted shard creates a new buffer there (another tag)
    name = "svc-replaced"
    svc = ReplayService.launch(name, tmp_path, capacity=400, num_shards=2, seed=0,
                               sampler={"type": "prioritized", "alpha": 0.6, "beta": 0.4})
    try:
        client = svc.client(seed=0)
        index = torch.cat([client.extend(rows(range(100))), client.extend(rows(range(100, 200)))])
        pid = ray.get(shard(name, 1).ping.remote())
        shutil.rmtree(tmp_path / "shard-1")
        os.kill(pid, signal.SIGKILL)
        while True:  # the restarted shard 1 answers from a new, empty directory
            try:
                if ray.get(shard(name, 1).ping.remote(), timeout=60) != pid:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        ray.get(shard(name, 1).extend.remote(arrays(range(500, 600))))

        def masses() -> list[float]:  # asked of the shards, not through the client
            return [ray.get(shard(name, k).stats.remote())["priority_mass"] for k in (0, 1)]

        before = masses()
        # the client has not heard from shard 1 since: its check passes, shard 1 refuses
        with pytest.raises(StaleIndexError, match=r"belongs to another buffer or to an earlier buffer "
                           r"created at .*shard-1.* \[stored before the error: shard\(s\) \[0\] stored "
                           r"their part of this update\]"):
            client.update_priority(index[[3, 103]], torch.tensor([9.0, 9.0]))
        after = masses()
        assert after[0] == pytest.approx(before[0] - 1.0 + 9.0 ** 0.6) and after[1] == before[1]
        # any answer of shard 1 carries its new tag: from then on the client refuses first
        assert len(client) == 200
        with pytest.raises(StaleIndexError, match=r"index\[1\]=\d+ belongs to an earlier buffer deleted "
                           r"and created again under the name 'svc-replaced'"):
            client.update_priority(index[[4, 104]], torch.tensor([9.0, 9.0]))
        assert masses() == after
        fresh = client.sample(50)["index"]
        assert client.update_priority(fresh, torch.ones(50)) == 0
    finally:
        ReplayService.shutdown(name, delete=True)
