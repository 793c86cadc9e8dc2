"""The replay service on the session's real local Ray cluster: round trips, other
processes, bad input, sharded sampling statistics, priorities, the rate limiter.

Every row carries its id in ``step`` and ``observation[:, 0]`` so tests can say exactly
which rows came back.
"""

from __future__ import annotations

import itertools

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict

from rlfleet.buffer import (
    BufferClient,
    BufferNotFound,
    ReplayService,
    SampleTimeout,
    SchemaMismatch,
    ShardUnavailable,
    StaleIndexError,
)
from rlfleet.buffer.indices import counter_of, shard_of, with_shard


def chi2_999(df: int) -> float:
    """The 0.999 quantile of chi-square with ``df`` degrees (Wilson-Hilferty, ~0.5% off)."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def rows(ids) -> TensorDict:
    """Transition-shaped rows whose id is ``step`` and ``observation[:, 0]``."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    n = len(ids)
    obs = ids.float()[:, None].repeat(1, 4)
    return TensorDict(
        {
            "observation": obs,
            "action": ids % 2,
            "reward": torch.ones(n),
            "terminated": torch.zeros(n, dtype=torch.bool),
            "truncated": torch.zeros(n, dtype=torch.bool),
            "done": torch.zeros(n, dtype=torch.bool),
            "next": {"observation": obs + 0.5},
            "episode_id": ids // 10,
            "step": ids,
        },
        batch_size=[n],
    )


def check_rows(batch: TensorDict, id_of_index: dict[int, int]) -> list[int]:
    """Assert every sampled row is exactly the row its index names; return the ids."""
    ids = batch["step"].tolist()
    for i, index, obs, nxt in zip(ids, batch["index"].tolist(), batch["observation"],
                                  batch["next", "observation"]):
        assert id_of_index[index] == i
        assert obs.tolist() == [float(i)] * 4 and nxt.tolist() == [i + 0.5] * 4
    return ids


@pytest.fixture(scope="module")
def uniform(ray_cluster, tmp_path_factory):
    """2 shards holding ids 0..119: shard 0 has 80 rows, shard 1 has 40."""
    path = tmp_path_factory.mktemp("uniform")
    svc = ReplayService.launch("svc-uniform", path, capacity=1000, num_shards=2, seed=1)
    client = svc.client(seed=2)
    id_of_index = {}
    for ids in (range(0, 40), range(40, 80), range(80, 120)):
        index = client.extend(rows(list(ids)))
        id_of_index.update(zip(index.tolist(), ids))
    yield svc, client, id_of_index, path
    if "svc-uniform" in ReplayService.running():
        ReplayService.shutdown("svc-uniform")


@pytest.fixture(scope="module")
def prioritized(ray_cluster, tmp_path_factory):
    """2 prioritized shards: ids 0..29 on shard 0, 30..39 on shard 1."""
    path = tmp_path_factory.mktemp("prioritized")
    svc = ReplayService.launch(
        "svc-prio", path, capacity=1000, num_shards=2, seed=3,
        sampler={"type": "prioritized", "alpha": 0.6, "beta": 0.5},
    )
    client = svc.client(seed=4)
    id_of_index = {}
    for ids in (range(0, 30), range(30, 40)):
        index = client.extend(rows(list(ids)))
        id_of_index.update(zip(index.tolist(), ids))
    yield svc, client, id_of_index
    ReplayService.shutdown("svc-prio", delete=True)


def test_extend_routes_round_robin_and_sample_returns_the_exact_rows(uniform):
    svc, client, id_of_index, _ = uniform
    shard = {i: int(shard_of(idx)) for idx, i in id_of_index.items()}
    # both shards are on this node; a 40-row batch goes whole to the one that has stored
    # the fewest rows, ties in turn: 0, then 1, then 0
    assert [shard[0], shard[40], shard[80]] == [0, 1, 0]
    assert sorted(int(counter_of(idx)) for idx, i in id_of_index.items() if shard[i] == 0) == list(range(80))
    assert len(client) == 120 and svc.num_shards == 2
    batch = client.sample(64)
    assert batch.batch_size == torch.Size([64])
    assert batch["index"].dtype == torch.int64 and "weight" not in batch.keys()
    check_rows(batch, id_of_index)
    stats = client.stats()
    assert [s["size"] for s in stats["shards"]] == [80, 40]
    assert (stats["total"]["size"], stats["total"]["total_inserted"]) == (120, 120)
    assert stats["total"]["capacity"] == 1000 and stats["total"]["shards_up"] == 2


def test_a_separate_process_connects_by_name_and_samples(uniform, ray_cluster):
    _, _, id_of_index, _ = uniform
    script = (
        "import json, sys\n"
        "from rlfleet.buffer import BufferClient\n"
        "c = BufferClient.connect('svc-uniform')\n"
        "b = c.sample(50)\n"
        "print(json.dumps({'len': len(c), 'index': b['index'].tolist(), 'step': b['step'].tolist()}))\n"
    )
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address_info["address"], RAY_AUTH_MODE="token")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["len"] == 120 and len(got["index"]) == 50
    assert all(id_of_index[i] == s for i, s in zip(got["index"], got["step"]))


def test_a_pickled_client_writes_from_a_ray_task(uniform, tmp_path):
    svc, client, id_of_index, _ = uniform

    @ray.remote(num_cpus=0)
    def write(c: BufferClient, batch: TensorDict) -> list[int]:
        return c.extend(batch).tolist()

    index = ray.get(write.remote(client, rows(range(120, 130))), timeout=120)
    id_of_index.update(zip(index, range(120, 130)))  # the frequency test counts them too
    assert len(client) == 130
    assert sorted(check_rows(client.sample(300), id_of_index)) != []
    assert {id_of_index[i] for i in index} == set(range(120, 130))


def test_sharded_uniform_frequencies_match_one_buffer(uniform):
    # split="rows": every row an independent draw, so the row counts are multinomial
    # (the default "whole" split is tested in test_service_split.py)
    client = BufferClient.connect("svc-uniform", seed=2, split="rows")
    id_of_index = uniform[2]
    n_rows = len(id_of_index)  # 130 after the task test, 120 alone
    counts = np.zeros(n_rows)
    for batch in zip(range(100), client.sampler(500, prefetch=2)):
        ids = check_rows(batch[1], id_of_index)
        np.add.at(counts, ids, 1)
    expected = counts.sum() / n_rows
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # an even split between the shards (80 vs 40 rows) would give chi2 in the thousands
    assert chi2 < chi2_999(n_rows - 1), chi2


def test_sharded_prioritized_frequencies_and_weights_match_one_buffer(prioritized):
    client = BufferClient.connect("svc-prio", seed=4, split="rows")
    id_of_index = prioritized[2]
    index_of_id = {i: idx for idx, i in id_of_index.items()}
    prio = {i: 1.0 + (i % 7) for i in range(40)}
    client.update_priority(torch.tensor([index_of_id[i] for i in range(40)]),
                           torch.tensor([prio[i] for i in range(40)]))
    alpha, beta = 0.6, 0.5
    p = np.array([prio[i] ** alpha for i in range(40)])
    counts = np.zeros(40)
    # single calls, and a prefetching sampler that fetches 3 batches per shard call
    batches = itertools.chain((client.sample(500) for _ in range(40)),
                              itertools.islice(client.sampler(500, prefetch=3), 40))
    for batch in batches:
        assert batch.batch_size == torch.Size([500])
        ids = check_rows(batch, id_of_index)
        np.add.at(counts, ids, 1)
        raw = np.array([(prio[i] ** alpha) ** -beta for i in ids])
        np.testing.assert_allclose(batch["weight"].numpy(), raw / raw.max(), rtol=1e-5)
        assert batch["weight"].dtype == torch.float32
    expected = counts.sum() * p / p.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < chi2_999(39), chi2


def test_update_priority_reaches_the_right_shard(prioritized):
    _, client, id_of_index = prioritized
    index_of_id = {i: idx for idx, i in id_of_index.items()}
    before = [s["priority_mass"] for s in client.stats()["shards"]]
    client.update_priority([index_of_id[35]], [1000.0])  # id 35 lives on shard 1
    after = [s["priority_mass"] for s in client.stats()["shards"]]
    assert after[0] == before[0]
    old = (1.0 + 35 % 7) ** 0.6
    assert after[1] == pytest.approx(before[1] - old + 1000.0 ** 0.6)
    ids = client.sample(400)["step"].tolist()
    assert ids.count(35) > 100


def test_priorities_for_another_buffers_indices_are_refused_and_change_nothing(prioritized, uniform):
    _, client, _ = prioritized
    _, other, _, _ = uniform
    before = [s["priority_mass"] for s in client.stats()["shards"]]
    eight = int(with_shard(np.int64(3), 8))
    with pytest.raises(StaleIndexError, match=rf"index\[0\]={eight} names shard 8, but "
                       r"buffer 'svc-prio' has shards 0..1"):
        client.update_priority([eight, 0], [5.0, 5.0])
    # the uniform buffer's indices carry its shards' tags, not svc-prio's
    foreign = other.sample(50)["index"].tolist()
    with pytest.raises(StaleIndexError, match=r"index\[0\]=\d+ belongs to an earlier buffer deleted "
                       r"and created again under the name 'svc-prio', or to another buffer"):
        client.update_priority(foreign, [7.0] * len(foreign))
    with pytest.raises(ValueError, match=r"priority\[1\]=nan is not a finite number >= 0"):
        client.update_priority([0, 1], [1.0, float("nan")])
    assert [s["priority_mass"] for s in client.stats()["shards"]] == before


@pytest.mark.parametrize("name", ["a/b", "..", "x..y", "", "shard:1", "-lead", "x" * 65, None])
def test_bad_names_are_refused(ray_cluster, name, tmp_path):
    with pytest.raises(ValueError, match=r"buffer name = .*: use 1-64 letters"):
        BufferClient.connect(name)
    with pytest.raises(ValueError, match=r"buffer name = .*: use 1-64 letters"):
        ReplayService.launch(name, tmp_path, capacity=10)
    assert list(tmp_path.iterdir()) == []


def test_unknown_buffer_name_lists_the_running_ones(uniform):
    with pytest.raises(BufferNotFound, match=r"no replay buffer named 'nope' runs on this Ray "
                       r"cluster \(namespace 'rlfleet'\); running buffers: .*'svc-uniform'"):
        BufferClient.connect("nope")
    with pytest.raises(BufferNotFound, match="running buffers"):
        ReplayService.shutdown("nope")


def test_schema_mismatch_through_the_client_stores_nothing(uniform):
    _, client, _, _ = uniform
    size = len(client)
    bad = rows([1000, 1001])
    bad["reward"] = bad["reward"].double()
    with pytest.raises(SchemaMismatch, match=r"extend: key 'reward' has dtype float64, buffer "
                       r"schema says float32"):
        client.extend(bad)
    extra = rows([1000])
    extra["extra"] = torch.zeros(1)
    with pytest.raises(SchemaMismatch, match="batch has key 'extra' that the buffer schema lacks"):
        client.extend(extra)
    # the shard checks too, for writers that bypass the client
    shard = ray.get_actor("rlfleet:svc-uniform:shard-1", namespace="rlfleet")
    arrays = {k if isinstance(k, tuple) else (k,): v.numpy()
              for k, v in bad.items(include_nested=True, leaves_only=True)}
    with pytest.raises(SchemaMismatch, match="key 'reward' has dtype float64"):
        ray.get(shard.extend.remote(arrays))
    assert len(client) == size
    with pytest.raises(ValueError, match=r"sample: n=0 must be a positive int"):
        client.sample(0)


def test_sample_before_min_size_times_out_naming_the_limiter_state(ray_cluster, tmp_path):
    svc = ReplayService.launch("svc-min", tmp_path, capacity=100, num_shards=1,
                               rate_limiter={"min_size_to_sample": 50, "timeout_s": 30.0})
    try:
        client = svc.client()
        client.extend(rows(range(5)))
        with pytest.raises(SampleTimeout, match=r"sample of 3 rows waited 0.3s \(timeout_s\) for the "
                           r"rate limiter: size=5, min_size_to_sample=50, inserted=5, sampled=0"):
            client.sample(3, timeout_s=0.3)
        stats = client.stats()
        assert stats["total"]["size"] == 5 and stats["total"]["samples"] == 0
        assert stats["shards"][0]["rate_limiter"]["sample_timeouts"] == 1
        # relaunching a running service reattaches to it
        again = ReplayService.launch("svc-min", tmp_path, capacity=100, num_shards=1)
        assert len(again.client()) == 5
        with pytest.raises(ValueError, match=r"already runs with 1 shard\(s\).*num_shards=2"):
            ReplayService.launch("svc-min", tmp_path, capacity=100, num_shards=2)
    finally:
        ReplayService.shutdown("svc-min", delete=True)
    assert not (tmp_path / "shard-0").exists()


def test_rate_limiter_holds_the_ratio_under_a_concurrent_writer_and_sampler(ray_cluster, tmp_path):
    spi, margin, min_size = 2.0, 300.0, 100
    svc = ReplayService.launch(
        "svc-ratio", tmp_path, capacity=5000, num_shards=1,
        rate_limiter={"min_size_to_sample": min_size, "samples_per_insert": spi,
                      "error_margin": margin, "timeout_s": 60.0},
    )
    try:
        writer_client, sampler_client = svc.client(), svc.client()
        offsets: list[float] = []
        errors: list[BaseException] = []

        def guard(fn):
            def run():
                try:
                    fn()
                except BaseException as e:  # surfaced by the assertion below
                    errors.append(e)
            return run

        @guard
        def write():
            for k in range(30):
                writer_client.extend(rows(range(50 * k, 50 * k + 50)))

        @guard
        def sample():
            # spi * (1500 - 100) = 2800 rows are owed once the writer is done
            for _ in range(70):
                sampler_client.sample(40)

        threads = [threading.Thread(target=write), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            offsets.append(sampler_client.stats()["shards"][0]["rate_limiter"]["ratio_offset"])
            threads[0].join(0.05)
        for t in threads:
            t.join()
        assert not errors, errors
        state = sampler_client.stats()["shards"][0]["rate_limiter"]
        assert (state["inserts"], state["samples"], state["ratio_offset"]) == (1500, 2800, 0.0)
        assert len(offsets) > 3 and max(abs(o) for o in offsets) <= margin
        assert state["insert_waits"] + state["sample_waits"] > 0
    finally:
        ReplayService.shutdown("svc-ratio", delete=True)


def test_relaunch_over_an_existing_path_reopens_the_data(uniform):
    _, client, id_of_index, path = uniform
    size = len(client)
    ReplayService.shutdown("svc-uniform")
    assert "svc-uniform" not in ReplayService.running()
    assert sorted(p.name for p in path.iterdir()) == ["shard-0", "shard-1"]
    svc = ReplayService.launch("svc-uniform", path, capacity=1000, num_shards=2)
    again = svc.client()
    assert len(again) == size
    check_rows(again.sample(100), id_of_index)
    # the old client's shards are gone: one clear error, then it finds the new ones by name
    with pytest.raises(ShardUnavailable, match=r"buffer 'svc-uniform': len: shard 0 died during the call"):
        len(client)
    assert len(client) == size
    ReplayService.shutdown("svc-uniform", delete=True)
    assert not path.exists() or list(path.iterdir()) == []


def test_sequence_sampler_assembles_slices_from_both_shards(ray_cluster, tmp_path):
    svc = ReplayService.launch("svc-seq", tmp_path, capacity=400, num_shards=2, seed=0,
                               sampler={"type": "sequence", "length": 4})
    try:
        client = svc.client(seed=1, split="rows")  # every batch from both shards
        # ids 0..99 in episodes of 10 rows; step = id % 10 rises by 1 inside an episode
        for first in (0, 50):
            ids = torch.arange(first, first + 50)
            batch = rows(ids)
            batch["episode_id"], batch["step"] = ids // 10, ids % 10
            client.extend(batch)
        got = client.sample(64)
        assert got.batch_size == torch.Size([64, 4])
        ident = got["observation"][..., 0].long()          # [64, 4] row ids
        assert (ident[:, 1:] - ident[:, :-1] == 1).all()   # consecutive rows
        assert (got["episode_id"] == got["episode_id"][:, :1]).all()
        assert (got["step"][:, 1:] - got["step"][:, :-1] == 1).all()
        shards = torch.from_numpy(shard_of(got["index"].numpy()))
        assert (shards == shards[:, :1]).all() and set(shards[:, 0].tolist()) == {0, 1}
        assert ((ident < 50) == (shards == 0)).all()
    finally:
        ReplayService.shutdown("svc-seq", delete=True)
