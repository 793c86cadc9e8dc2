"""Shard deaths on the session's real local Ray cluster: ``ray.kill`` with restart and a
SIGKILL of the shard's process. Committed rows survive; calls in flight retry, or with
``allow_partial`` are served by the other shards; nothing hangs past its timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict

from rlfleet.buffer import BufferClient, ReplayService, SampleTimeout, ShardUnavailable
from rlfleet.buffer.indices import shard_of


def rows(ids) -> TensorDict:
    ids = torch.as_tensor(list(ids), dtype=torch.int64)
    return TensorDict({"observation": ids.float()[:, None].repeat(1, 3), "step": ids},
                      batch_size=[len(ids)])


def shard(name: str, k: int):
    return ray.get_actor(f"rlfleet:{name}:shard-{k}", namespace="rlfleet")


def all_ids(client, n_rows: int) -> set[int]:
    """Every id sampling returns, checking each row's content matches its id."""
    seen: set[int] = set()
    for _ in range(40):
        batch = client.sample(200)
        assert (batch["observation"][:, 0].long() == batch["step"]).all()
        seen.update(batch["step"].tolist())
        if len(seen) == n_rows:
            break
    return seen


@pytest.fixture(scope="module")
def faulty(ray_cluster, tmp_path_factory):
    path = tmp_path_factory.mktemp("faults")
    svc = ReplayService.launch("svc-faults", path, capacity=500, num_shards=2, seed=0,
                               rate_limiter={"min_size_to_sample": 1, "timeout_s": 60.0})
    client = svc.client(seed=1)
    client.extend(rows(range(0, 30)))    # shard 0
    client.extend(rows(range(30, 60)))   # shard 1
    yield client
    ReplayService.shutdown("svc-faults", delete=True)


def test_ray_kill_with_restart_loses_no_committed_row(faulty):
    handle = shard("svc-faults", 0)
    pid = ray.get(handle.ping.remote())
    ray.kill(handle, no_restart=False)
    # served before the kill lands, or retried by Ray on the restarted shard: no error
    assert faulty.sample(100).batch_size == torch.Size([100])
    # ray.kill is asynchronous: wait for the new process before checking the data
    deadline = time.monotonic() + 300
    while ray.get(handle.ping.remote(), timeout=300) == pid:
        assert time.monotonic() < deadline, "the shard was not restarted"
        time.sleep(0.1)
    assert all_ids(faulty, 60) == set(range(60))
    assert len(faulty) == 60


def test_sigkill_of_the_shard_process_loses_no_committed_row(faulty):
    pid = ray.get(shard("svc-faults", 1).ping.remote())
    os.kill(pid, signal.SIGKILL)
    assert all_ids(faulty, 60) == set(range(60))
    assert ray.get(shard("svc-faults", 1).ping.remote()) != pid
    stats = faulty.stats()
    assert [s["size"] for s in stats["shards"]] == [30, 30]
    # writes go on after the restart
    faulty.extend(rows(range(60, 70)))
    assert len(faulty) == 70


@pytest.fixture(scope="module")
def lopsided(ray_cluster, tmp_path_factory):
    """Shard 0 holds 30 rows and serves; shard 1 holds 10, under its min size of 20.

    Each test kills shard 1; it comes back with the same 10 rows.
    """
    svc = ReplayService.launch("svc-partial", tmp_path_factory.mktemp("partial"), capacity=500, num_shards=2, seed=0,
                               rate_limiter={"min_size_to_sample": 20, "timeout_s": 60.0})
    # split="rows": every sample asks both shards, so each test meets shard 1
    client = svc.client(seed=5, split="rows")
    client.extend(rows(range(0, 30)))
    client.extend(rows(range(30, 40)))
    yield client
    ReplayService.shutdown("svc-partial", delete=True)


def _kill_while_blocked(call) -> dict:
    """Run ``call`` in a thread; once shard 1 holds it in its limiter, SIGKILL shard 1."""
    result: dict = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as e:  # checked by the caller
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    handle = shard("svc-partial", 1)
    while ray.get(handle.stats.remote())["rate_limiter"]["samples_waiting"] == 0:
        assert t.is_alive(), result
        time.sleep(0.05)
    os.kill(ray.get(handle.ping.remote()), signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    return result


def test_allow_partial_serves_the_batch_from_the_live_shards(lopsided):
    result = _kill_while_blocked(lambda: lopsided.sample(64, allow_partial=True, timeout_s=60.0))
    assert "error" not in result, result
    batch = result["value"]
    assert batch.batch_size == torch.Size([64])
    assert set(shard_of(batch["index"].numpy()).tolist()) == {0}
    assert set(batch["step"].tolist()) <= set(range(30))


def test_allow_partial_with_the_whole_split_draws_a_dead_shards_request_elsewhere(lopsided):
    """split="whole": the request went to shard 1 alone; it dies, the request is drawn
    again from the live shards, whole."""
    client = BufferClient.connect("svc-partial", seed=6)
    assert client.split == "whole"
    handle = shard("svc-partial", 1)
    for _ in range(100):  # until a request lands on shard 1 (10 of 40 rows: 1 in 4)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(
            value=client.sample(64, allow_partial=True, timeout_s=60.0)))
        t.start()
        while t.is_alive() and ray.get(handle.stats.remote())["rate_limiter"]["samples_waiting"] == 0:
            time.sleep(0.02)
        if t.is_alive():
            break
        t.join()
        assert set(shard_of(result["value"]["index"].numpy()).tolist()) == {0}
    else:
        pytest.fail("no request reached shard 1 in 100 tries")
    os.kill(ray.get(handle.ping.remote()), signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    batch = result["value"]
    assert batch.batch_size == torch.Size([64])
    assert set(shard_of(batch["index"].numpy()).tolist()) == {0}
    assert set(batch["step"].tolist()) <= set(range(30))


def test_without_allow_partial_the_sample_waits_for_the_restarted_shard(lopsided, monkeypatch):
    from rlfleet.buffer import shard_table

    # the client's deadline (timeout_s + grace) must cover the restart on a busy machine
    monkeypatch.setattr(shard_table, "GRACE_S", 300.0)
    # the call is retried on the restarted shard, which still holds 10 < 20 rows
    result = _kill_while_blocked(lambda: lopsided.sample(64, timeout_s=2.0))
    assert isinstance(result.get("error"), SampleTimeout), result
    assert "size=10, min_size_to_sample=20" in str(result["error"])


def test_an_unanswering_shard_raises_shard_unavailable_instead_of_hanging(lopsided, monkeypatch):
    from rlfleet.buffer import shard_table
    from rlfleet.buffer.remote import SAMPLE_CONCURRENCY

    handle = shard("svc-partial", 1)
    # park samples in shard 1's limiter until every one of its threads is taken
    parked = [handle.sample.remote(5, 3600.0) for _ in range(SAMPLE_CONCURRENCY - 1)]
    while ray.get(handle.stats.remote())["rate_limiter"]["samples_waiting"] < len(parked):
        time.sleep(0.05)
    parked.append(handle.sample.remote(5, 3600.0))
    monkeypatch.setattr(shard_table, "GRACE_S", 0.5)
    try:
        with pytest.raises(ShardUnavailable, match=r"shard\(s\) \[1\] did not answer a sample "
                           r"within 1.5s; they may be restarting or overloaded"):
            lopsided.sample(64, timeout_s=1.0)
        # blocked samplers hold every thread of the sample group, none of the insert
        # group: a write still lands (5 rows: 15 < 20, so the samplers stay parked)
        out = ray.get(handle.extend.remote({("observation",): np.zeros((5, 3), np.float32),
                                            ("step",): np.arange(40, 45)}), timeout=60)
        assert out["state"]["size"] == 15
    finally:
        ray.kill(handle, no_restart=False)  # frees the parked threads
        del parked
