"""Priority updates on real buffers: live rows stored, overwritten rows skipped and
counted, bad input refused whole; indices of another buffer or of an earlier buffer at
the same path refused; the compiled update follows ``priorities.split_update``'s rules."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from rlfleet.buffer import ReplayBuffer, StaleIndexError
from rlfleet.buffer.indices import MAX_COUNTER, counter_of, with_shard, with_tag
from rlfleet.buffer.priorities import split_update
from rlfleet.buffer.sumtree import SumTree

ALPHA = 0.6


def rows(first: int, n: int) -> dict[tuple[str, ...], np.ndarray]:
    x = np.arange(first, first + n)
    return {("x",): x, ("obs",): np.repeat(x[:, None], 2, axis=1).astype(np.float32)}


def stored_priorities(rb: ReplayBuffer) -> np.ndarray:
    """``priorities.bin`` as the file holds it (the map is shared: no flush needed)."""
    prio = np.fromfile(rb.path / "priorities.bin", dtype=np.float64)
    assert prio.shape == (rb.capacity,)
    return prio


def test_full_ring_updates_store_every_live_row_and_skip_the_overwritten(tmp_path):
    capacity, rounds = 10_000, 40
    rng = np.random.default_rng(0)
    sampler = {"type": "prioritized", "alpha": ALPHA, "beta": 0.4}
    with ReplayBuffer.create(tmp_path / "b", capacity=capacity, sampler=sampler, seed=1) as rb:
        rb.extend_arrays(rows(0, 2048))
        stored = skipped_total = 0
        for r in range(rounds):
            index = rb.sample_arrays(128)[("index",)]
            max_before = rb.stats()["max_priority"]
            rb.extend_arrays(rows(rb.total_inserted, 1024))
            new = rng.uniform(0.1, 5.0, size=128)
            start = rb.total_inserted - len(rb)
            counters = counter_of(index)
            expected_skips = int(np.count_nonzero(counters < start))
            assert rb.update_priority(index, new) == expected_skips
            stored += 128 - expected_skips
            skipped_total += expected_skips
            prio = stored_priorities(rb)
            last = {}  # a row sampled twice keeps its last priority
            for c, p in zip(counters, new):
                last[int(c)] = p
            live = {c: p for c, p in last.items() if c >= start}
            got = prio[np.fromiter(live, dtype=np.int64) % capacity]
            assert np.array_equal(got, np.fromiter(live.values(), dtype=np.float64))  # all of them
            gone = np.array([c for c in last if c < start], dtype=np.int64)
            # an overwritten row's slot holds the new row, which entered at the max priority
            assert (prio[gone % capacity] == max_before).all()
        assert skipped_total > 200 and stored > 4000  # the ring wrapped often enough to matter
        stats = rb.stats()
        assert (stats["priority_updates"], stats["priority_updates_skipped"]) == (stored, skipped_total)
        live_prio = stored_priorities(rb)[np.arange(rb.total_inserted - len(rb), rb.total_inserted) % capacity]
        mass = float(np.sum(live_prio ** ALPHA))
        assert rb.priority_mass == pytest.approx(mass, rel=1e-9)
    with ReplayBuffer.open(tmp_path / "b") as rb:  # the tree rebuilt from the file agrees
        assert rb.priority_mass == pytest.approx(mass, rel=1e-9)


def _bad_cases(tag: int) -> dict[str, tuple]:
    """name: (row counters or raw indices, priorities, error, exact message). The buffer:
    capacity 10, rows 0..12 inserted (live 3..12), prioritized with alpha 1."""
    t = lambda *c: with_tag(np.array(c, dtype=np.int64), tag)  # noqa: E731
    other = (tag + 1) % 4096
    foreign = int(with_tag(np.array([5]), other)[0])
    sharded = int(with_shard(t(5), 3)[0])
    tail = (", this buffer's indices carry tag {tag} and shard 0{hint}; pass only indices that "
            "this buffer returned, and drop those kept from before it was created")
    return {
        "negative priority": (t(3, 4), [1.0, -0.5], ValueError,
                              "update_priority: priority[1]=-0.5 is not a finite number >= 0; "
                              "priorities must be finite and non-negative"),
        "nan": (t(3, 4), [float("nan"), 1.0], ValueError, "priority[0]=nan is not a finite number >= 0"),
        "inf": (t(3), [float("inf")], ValueError, "priority[0]=inf is not a finite number >= 0"),
        "-inf": (t(3), [float("-inf")], ValueError, "priority[0]=-inf is not a finite number >= 0"),
        "too large": (t(3, 4), [1.0, 1e308], ValueError,
                      "update_priority: priority[1]=1e+308 is above 4.494e+306, the largest whose "
                      "p**alpha (alpha=1) summed over capacity=10 rows stays finite; scale the "
                      "priorities down"),
        "wrong length": (t(3, 4, 5), [1.0, 2.0], ValueError,
                         "update_priority: 2 priorities (shape [2]) for 3 indices (shape [3]); pass "
                         "one priority per index"),
        "2-d": (t(3, 4)[:, None], [[1.0], [2.0]], ValueError, "pass one priority per index"),
        "float index": (np.array([3.5]), [1.0], ValueError,
                        "update_priority: index has dtype float64; pass integer indices"),
        "negative index": (np.array([int(t(3)[0]), -1]), [1.0, 1.0], StaleIndexError,
                           "update_priority: index[1]=-1 is negative; pass the int64 indices that "
                           "this buffer's extend or sample returned, unchanged"),
        "never written": (t(12, 13), [1.0, 1.0], StaleIndexError,
                          f"update_priority: index[1]={int(t(13)[0])} names row 13, which was never "
                          f"written (this buffer has written rows 0..12); pass only indices that "
                          f"its extend or sample returned"),
        "far past the end": (t(3, MAX_COUNTER - 1), [1.0, 1.0], StaleIndexError,
                             f"names row {MAX_COUNTER - 1}, which was never written"),
        "untagged": (np.array([int(t(4)[0]), 5]), [1.0, 1.0], StaleIndexError,
                     f"update_priority: index[1]=5 belongs to another buffer or to an earlier buffer "
                     f"created at {{path}}: it carries tag 0 and shard 0" + tail.format(tag=tag, hint="")),
        "another buffer": (np.array([foreign]), [1.0], StaleIndexError,
                           f"update_priority: index[0]={foreign} belongs to another buffer or to an "
                           f"earlier buffer created at {{path}}: it carries tag {other} and shard 0"
                           + tail.format(tag=tag, hint="")),
        "shard bits": (np.array([sharded]), [1.0], StaleIndexError,
                       f"update_priority: index[0]={sharded} belongs to another buffer or to an "
                       f"earlier buffer created at {{path}}: it carries tag {tag} and shard 3"
                       + tail.format(tag=tag, hint=" (it carries shard bits: an index of a sharded "
                                     "buffer goes to BufferClient.update_priority, which routes it to "
                                     "its shard)")),
        # one bad value refuses the whole call, also the live and the overwritten rows in it
        "bad among live and stale": (t(1, 5, 12), [2.0, 3.0, float("nan")], ValueError,
                                     "priority[2]=nan is not a finite number >= 0"),
        "unwritten among live and stale": (t(1, 5, 13), [2.0, 3.0, 4.0], StaleIndexError,
                                           "names row 13, which was never written"),
    }


BAD_NAMES = list(_bad_cases(0))


@pytest.mark.parametrize("sampler", ["prioritized", "uniform"])
@pytest.mark.parametrize("case", BAD_NAMES)
def test_bad_updates_are_refused_whole_and_change_nothing(tmp_path, case, sampler):
    spec = {"type": "prioritized", "alpha": 1.0, "beta": 0.4} if sampler == "prioritized" else sampler
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=10, sampler=spec, seed=0) as rb:
        rb.extend_arrays(rows(0, 13))
        if sampler == "prioritized":
            rb.update_priority(with_tag(np.arange(3, 13), rb.index_tag), np.linspace(0.5, 2.0, 10))
        index, priority, error, message = _bad_cases(rb.index_tag)[case]
        message = message.replace("{path}", str(path))
        if sampler == "uniform" and case == "too large":  # no p**alpha to overflow there
            error, message = None, None
        before = {name: (path / name).read_bytes() for name in ("priorities.bin", "header.bin", "meta.json")
                  if (path / name).exists()}
        stats, mass = rb.stats(), rb.priority_mass
        index, priority = torch.as_tensor(index), torch.from_numpy(np.asarray(priority, dtype=np.float64))
        if error is None:
            assert rb.update_priority(index, priority) == 0
            return
        with pytest.raises(error, match=re.escape(message)):
            rb.update_priority(index, priority)
        assert {name: (path / name).read_bytes() for name in before} == before
        assert rb.stats() == stats and rb.priority_mass == mass


@pytest.mark.parametrize("sampler", ["prioritized", "uniform"])
def test_an_index_of_an_earlier_buffer_at_the_same_path_is_refused(tmp_path, sampler):
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=50, sampler=sampler, seed=0) as rb:
        rb.extend_arrays(rows(0, 40))
        old = rb.sample(8)["index"]
        old_tag = rb.index_tag
    shutil.rmtree(path)
    while True:  # a new buffer at the same path; its tag differs but for a 1-in-4096 draw
        rb = ReplayBuffer.create(path, capacity=50, sampler=sampler, seed=0)
        if rb.index_tag != old_tag:
            break
        rb.close()
        shutil.rmtree(path)
    with rb:
        rb.extend_arrays(rows(0, 40))  # the same counters are live again
        with pytest.raises(StaleIndexError, match=re.escape(
                f"belongs to another buffer or to an earlier buffer created at {path}: it carries "
                f"tag {old_tag} and shard 0, this buffer's indices carry tag {rb.index_tag}")):
            rb.update_priority(old, torch.ones(8))
        assert rb.stats()["priority_updates"] == 0
        with ReplayBuffer.create(tmp_path / "other", capacity=50, sampler=sampler, seed=0) as other:
            other.extend_arrays(rows(0, 40))
            theirs = other.sample(8)["index"]
            if other.index_tag != rb.index_tag:
                with pytest.raises(StaleIndexError, match=r"belongs to another buffer"):
                    rb.update_priority(theirs, torch.ones(8))
            assert other.update_priority(theirs, torch.ones(8)) == 0
        assert rb.update_priority(rb.sample(8)["index"], torch.ones(8)) == 0


def test_the_update_kernel_follows_split_update_rules(tmp_path):
    """The same updates (live, overwritten, duplicates, refusals) through the compiled
    kernel and through the rule written out with ``priorities.split_update`` leave the
    same priorities and leaves and return the same results."""
    capacity, tag = 97, 1234
    rng = np.random.default_rng(3)
    tree = SumTree(capacity)
    prios, expected = np.zeros(capacity), np.zeros(capacity)
    start, end = 0, 0
    for step in range(300):
        end += int(rng.integers(1, 60))
        start = max(0, end - capacity)
        counters = rng.integers(max(0, start - 40), end + (step % 7 == 0), size=int(rng.integers(1, 64)))
        index = with_tag(counters, tag)
        priority = rng.uniform(0.0, 3.0, size=len(index))
        if step % 11 == 0:
            priority[rng.integers(len(priority))] = np.nan
        if step % 13 == 0:
            index[0] = with_shard(index[:1], 1)[0]
        result = tree.update_rows(prios, index, priority, ALPHA, tag, start, end, np.inf)
        split = split_update(index, priority, tag, start, end, np.inf)
        if split is None:
            assert result is None, step
        else:
            live_counters, live_priority, skipped = split
            expected[live_counters % capacity] = live_priority  # the last one listed wins
            top = float(live_priority.max()) if len(live_priority) else 0.0
            assert result == (top, skipped), step
            assert skipped == int(np.count_nonzero(counter_of(index) < start))
        assert np.array_equal(prios, expected)
        np.testing.assert_allclose(tree.levels[0][:capacity], expected ** ALPHA, rtol=1e-15)
        assert tree.total == pytest.approx((expected ** ALPHA).sum(), rel=1e-12)


def test_a_td_error_shaped_n_by_1_is_taken_as_one_priority_per_row(tmp_path):
    """TorchRL's losses write ``td_error`` as ``[n, 1]``, like ``("next", "reward")``:
    it is stored exactly as the same values shaped ``[n]`` would be."""
    sampler = {"type": "prioritized", "alpha": 1.0, "beta": 0.4}
    with ReplayBuffer.create(tmp_path / "b", capacity=64, sampler=sampler, seed=0) as rb:
        index = rb.extend_arrays({("x",): np.arange(8)})
        prio = torch.arange(1.0, 9.0).reshape(8, 1)
        assert rb.update_priority(torch.from_numpy(index), prio) == 0
        stored = np.fromfile(tmp_path / "b" / "priorities.bin", dtype=np.float64)[:8]
        assert stored.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        assert rb.priority_mass == pytest.approx(36.0)
        with pytest.raises(ValueError, match=r"8 priorities \(shape \[4, 2\]\) for 8 indices"):
            rb.update_priority(index, np.ones((4, 2)))
