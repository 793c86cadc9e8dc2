"""How a sharded service spreads a sample over its shards (``sample_fanout``), on the
session's real Ray cluster, with shards of unequal sizes and priority masses.

``split="whole"`` draws each request (a ``sample`` call, a ``sampler`` group) from one
shard chosen by size or mass, so rows are not independent draws: a chi-square over row
counts alone does not apply. The exact marginal P(row) = P(shard) * P(row | shard) is
tested in its two factors, each a multinomial with a known law: the shard of each request
against size_k / N (or mass_k / M), and the rows within each shard against 1 / size_k (or
p^a / mass_k). The statistics are independent and add up to a chi-square with N - 1
degrees of freedom. ``split="rows"`` draws every row independently, so the row counts
themselves are tested.

Shards are filled unevenly by writing their directories with the local ``ReplayBuffer``
and then launching the service over them (a launch reopens what it finds).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import BufferClient, ReplayBuffer, ReplayService
from rlfleet.buffer.indices import shard_of
from rlfleet.buffer.sample_fanout import check_split, pick_shard

SIZES = (30, 90, 180)  # rows per shard: ids 0..29 on shard 0, 30..119 on 1, 120..299 on 2
ALPHA, BETA = 0.6, 0.5


def chi2_999(df: int) -> float:
    """The 0.999 quantile of chi-square with ``df`` degrees (Wilson-Hilferty, ~0.5% off)."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def chi2(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = counts.sum() * probabilities / probabilities.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def priority_of(i: int) -> float:
    # unequal masses per shard, and not in proportion to the sizes
    return 1.0 + (i % 7) + (20.0 if i < SIZES[0] else 0.0)


def rows(ids: list[int]) -> TensorDict:
    """Rows whose id is ``step`` and ``observation[:, 0]``."""
    ids_t = torch.as_tensor(ids, dtype=torch.int64)
    obs = ids_t.float()[:, None].repeat(1, 4)
    n = len(ids)
    return TensorDict({
        "observation": obs, "action": ids_t % 2,
        "next": {"observation": obs + 0.5, "reward": torch.ones(n, 1),
                 "done": torch.zeros(n, 1, dtype=torch.bool),
                 "terminated": torch.zeros(n, 1, dtype=torch.bool),
                 "truncated": torch.zeros(n, 1, dtype=torch.bool)},
        "episode_id": ids_t // 10, "step": ids_t,
    }, batch_size=[n])


def launch_uneven(name: str, path, sampler) -> ReplayService:
    """A 3-shard service whose shards hold ``SIZES`` rows (prioritized: ``priority_of``)."""
    first = 0
    for k, size in enumerate(SIZES):
        rb = ReplayBuffer.create(path / f"shard-{k}", capacity=1000, sampler=sampler)
        index = rb.extend(rows(list(range(first, first + size))))
        if rb.sampler_type == "prioritized":
            rb.update_priority(index, torch.tensor([priority_of(i) for i in range(first, first + size)]))
        rb.close()
        first += size
    return ReplayService.launch(name, path, capacity=3000, num_shards=3, sampler=sampler, seed=1)


@pytest.fixture(scope="module")
def uniform(ray_cluster, tmp_path_factory):
    svc = launch_uneven("split-uniform", tmp_path_factory.mktemp("split-uniform"), "uniform")
    yield svc
    ReplayService.shutdown("split-uniform", delete=True)


@pytest.fixture(scope="module")
def prioritized(ray_cluster, tmp_path_factory):
    sampler = {"type": "prioritized", "alpha": ALPHA, "beta": BETA}
    svc = launch_uneven("split-prio", tmp_path_factory.mktemp("split-prio"), sampler)
    yield svc
    ReplayService.shutdown("split-prio", delete=True)


def row_probabilities(prioritized: bool) -> np.ndarray:
    n = sum(SIZES)
    return np.array([priority_of(i) ** ALPHA for i in range(n)]) if prioritized else np.ones(n)


def check_batch(batch: TensorDict, prioritized: bool) -> tuple[int, list[int]]:
    """The one shard a whole-split batch came from, and its ids; every row is the row its
    index names, and (prioritized) the weights are one buffer's, by the batch max."""
    ids = batch["step"].tolist()
    assert batch["observation"][:, 0].tolist() == [float(i) for i in ids]
    shards = set(shard_of(batch["index"].numpy()).tolist())
    assert len(shards) == 1, shards
    shard = shards.pop()
    bounds = np.cumsum((0, *SIZES))
    assert all(bounds[shard] <= i < bounds[shard + 1] for i in ids)
    if prioritized:
        raw = np.array([(priority_of(i) ** ALPHA) ** -BETA for i in ids])
        np.testing.assert_allclose(batch["weight"].numpy(), raw / raw.max(), rtol=1e-5)
    return shard, ids


def two_factor_chi2(requests: np.ndarray, counts: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """The whole-split statistic: shard of each request against each shard's share of
    ``p``, plus the rows within each shard against ``p`` there. Also returns the
    statistic of the first factor under an even split, which the test must reject."""
    bounds = np.cumsum((0, *SIZES))
    shard_p = np.array([p[lo:hi].sum() for lo, hi in zip(bounds, bounds[1:])])
    stat = chi2(requests, shard_p)
    for lo, hi in zip(bounds, bounds[1:]):
        stat += chi2(counts[lo:hi], p[lo:hi])
    return stat, chi2(requests, np.ones(len(SIZES)))


@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_whole_split_gives_every_row_its_one_buffer_probability(kind, request):
    svc = request.getfixturevalue(kind)
    prioritized = kind == "prioritized"
    client = svc.client(seed=11)
    assert client.split == "whole"
    p = row_probabilities(prioritized)
    requests = np.zeros(len(SIZES))
    counts = np.zeros(len(p))
    # single calls (a request is one batch) and a sampler (a request is a group of 2)
    for _ in range(300):
        shard, ids = check_batch(client.sample(64), prioritized)
        requests[shard] += 1
        np.add.at(counts, ids, 1)
    stream = client.sampler(64, prefetch=2)
    for _ in range(300):
        first, second = next(stream), next(stream)  # a group arrives whole, in order
        shard, ids = check_batch(first, prioritized)
        assert check_batch(second, prioritized)[0] == shard
        requests[shard] += 1
        np.add.at(counts, ids, 1)
        np.add.at(counts, second["step"].numpy(), 1)
    stream.close()
    stat, even = two_factor_chi2(requests, counts, p)
    assert stat < chi2_999(len(p) - 1), stat
    # the shard factor has the power to see an even split (sizes 30/90/180, or masses)
    assert even > 3 * chi2_999(len(SIZES) - 1), even


@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_rows_split_mixes_every_batch_over_the_shards_as_one_buffer(kind, request):
    svc = request.getfixturevalue(kind)
    prioritized = kind == "prioritized"
    client = BufferClient.connect(svc.name, seed=12, split="rows")
    p = row_probabilities(prioritized)
    counts = np.zeros(len(p))
    batches = itertools.chain((client.sample(500) for _ in range(20)),
                              itertools.islice(client.sampler(500, prefetch=3), 40))
    for batch in batches:
        ids = batch["step"].tolist()
        assert batch["observation"][:, 0].tolist() == [float(i) for i in ids]
        assert set(shard_of(batch["index"].numpy()).tolist()) == {0, 1, 2}
        if prioritized:
            raw = np.array([(priority_of(i) ** ALPHA) ** -BETA for i in ids])
            np.testing.assert_allclose(batch["weight"].numpy(), raw / raw.max(), rtol=1e-5)
        np.add.at(counts, ids, 1)
    assert chi2(counts, p) < chi2_999(len(p) - 1)


def test_a_stopped_shard_does_not_stall_the_sampler(uniform):
    """A shard process frozen with SIGSTOP (a GC pause, a stalled disk): the sampler keeps
    handing out groups from the other shards, and the frozen shard's group arrives once it
    runs again, without an error."""
    client = BufferClient.connect(uniform.name, seed=5)
    pids = [s["pid"] for s in client.stats()["shards"]]
    stream = client.sampler(32, prefetch=1)
    next(stream)
    os.kill(pids[2], signal.SIGSTOP)  # the largest shard: 60% of the requests
    try:
        seen: list[int] = []
        start = time.monotonic()
        while time.monotonic() - start < 3.0:
            seen.append(int(shard_of(next(stream)["index"][:1].numpy())[0]))
        during = [k for k in seen[2:]]  # two groups may have been on their way already
    finally:
        os.kill(pids[2], signal.SIGCONT)
    assert len(during) >= 30 and set(during) <= {0, 1}, (len(during), set(during))
    # once it runs again, its delayed groups come out, then everything flows again
    after = [int(shard_of(next(stream)["index"][:1].numpy())[0]) for _ in range(200)]
    assert 2 in after
    stream.close()


def test_pick_shard_sends_the_whole_request_to_one_shard_by_weight():
    rng = np.random.default_rng(0)
    segments = [(0, 64), (1, 64), (2, 64)]
    weights = np.array([0.1, 0.3, 0.6])
    chosen = []
    for _ in range(3000):
        per_shard = pick_shard(rng, segments, weights)
        assert [len(s) for s in per_shard].count(3) == 1
        assert sum(per_shard, []) == segments
        chosen.append(next(k for k, s in enumerate(per_shard) if s))
    counts = np.bincount(chosen, minlength=3)
    assert chi2(counts, weights) < chi2_999(2)


@pytest.mark.parametrize("split", ["all", "", None, "Whole"])
def test_an_unknown_split_is_refused_naming_the_choices(split, ray_cluster):
    message = (f"split={split!r} is not one of ['whole', 'rows']: 'whole' draws each request "
               f"from one shard (cost independent of the shard count), 'rows' splits every "
               f"batch over all shards")
    with pytest.raises(ValueError) as raised:
        check_split(split)
    assert str(raised.value) == message
    with pytest.raises(ValueError) as raised:
        BufferClient("some-buffer", split=split)
    assert str(raised.value) == message


def test_a_pickled_client_keeps_its_split(uniform):
    import pickle

    client = BufferClient.connect(uniform.name, split="rows")
    again = pickle.loads(pickle.dumps(client))
    assert again.split == "rows"
    assert set(shard_of(again.sample(300)["index"].numpy()).tolist()) == {0, 1, 2}
    thread_out: list[int] = []
    t = threading.Thread(target=lambda: thread_out.append(len(again.sample(10))))
    t.start()
    t.join()
    assert thread_out == [10]


# -- these two change the module's services: they run last ------------------------------


def test_whole_split_priority_updates_reach_the_one_shard_and_move_its_share(prioritized):
    client = prioritized.client(seed=3)
    batch = next(b for b in (client.sample(16) for _ in range(200))
                 if shard_of(b["index"][:1].numpy())[0] == 0)
    before = [s["priority_mass"] for s in client.stats()["shards"]]
    assert client.update_priority(batch["index"], torch.full((16,), 1e5)) == 0
    after = [s["priority_mass"] for s in client.stats()["shards"]]
    assert [a == b for a, b in zip(after, before)] == [False, True, True]
    # the update's answer carried shard 0's new mass: the next draws follow it
    share = after[0] / sum(after)
    assert share > 0.9
    drawn = [int(shard_of(client.sample(8)["index"][:1].numpy())[0]) for _ in range(400)]
    hits = drawn.count(0)
    assert abs(hits - 400 * share) < 4 * (400 * share * (1 - share)) ** 0.5 + 1, (hits, share)


def test_a_whole_split_client_learns_other_writers_rows_from_its_poll(uniform):
    """A learner's client never writes: the sizes that weigh its draw come from the
    background state poll, so rows another client adds are drawn in proportion."""
    reader = uniform.client(seed=8)
    reader.sample(8)
    writer = uniform.client(seed=9)  # writes go to the local shard with the fewest rows: 0
    index = writer.extend(rows(list(range(1000, 1600))))
    assert set(shard_of(index.numpy()).tolist()) == {0}
    time.sleep(0.6)  # one poll period (shard_table.POLL_S)
    reader.sample(8)  # starts the poll
    time.sleep(0.2)
    drawn = [int(shard_of(reader.sample(8)["index"][:1].numpy())[0]) for _ in range(300)]
    share = 630 / 900
    hits = drawn.count(0)
    assert abs(hits - 300 * share) < 4 * (300 * share * (1 - share)) ** 0.5, (hits, share)
