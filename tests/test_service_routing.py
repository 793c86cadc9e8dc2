"""The client's routing decisions as plain functions (no Ray): where an extend's rows go
(``write_plan``), what a priority update is checked against before anything is sent
(``priority_routing``), and how a sample is split over the shards and put back together
(``sample_fanout``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlfleet.buffer import StaleIndexError
from rlfleet.buffer.indices import shard_of, with_shard, with_tag
from rlfleet.buffer.priority_routing import check_update
from rlfleet.buffer.row_reader import importance_weights
from rlfleet.buffer.sample_fanout import assemble, by_batch, split_rows, split_weights
from rlfleet.buffer.shard_table import ShardEntry, ShardTable
from rlfleet.buffer.write_plan import MIN_CHUNK_BYTES, chunk_count, cut_points, plan_write

# -- write_plan ------------------------------------------------------------------------------


MB = 1 << 20
BIG = 4 * MIN_CHUNK_BYTES  # a batch worth cutting


@pytest.mark.parametrize("rows, nbytes, shards, chunks", [
    (1000, 2 * MIN_CHUNK_BYTES - 1, 2, 1), (1000, 2 * MIN_CHUNK_BYTES, 2, 2), (1000, BIG, 3, 3),
    (1000, 3 * MIN_CHUNK_BYTES, 8, 3), (1, BIG, 2, 1), (1000, BIG, 1, 1), (32768, 2 * MB, 2, 1),
])
def test_chunk_count_keeps_every_chunk_at_least_the_minimum_payload(rows, nbytes, shards, chunks):
    assert chunk_count(rows, nbytes, shards) == chunks


def episodes(rows: int, length: int) -> np.ndarray:
    return np.arange(rows, dtype=np.int64) // length


@pytest.mark.parametrize("rows, parts, episode_id, cuts", [
    pytest.param(1000, 2, None, [0, 500, 1000], id="even"),
    pytest.param(1000, 3, None, [0, 333, 667, 1000], id="even-3"),
    # an episode ends at row 480, within an eighth of a chunk (62 rows) of 500
    pytest.param(1000, 2, episodes(1000, 480), [0, 480, 1000], id="snaps-to-episode-end"),
    # the nearest episode ends (300, 600) are more than 62 rows away: cut where it falls
    pytest.param(1000, 2, episodes(1000, 300), [0, 500, 1000], id="too-far-to-snap"),
    # env-major batch of 4 envs x 250 steps, one episode per env: the cut is an env boundary
    pytest.param(1000, 2, np.repeat([7, 3, 9, 4], 250), [0, 500, 1000], id="env-major"),
    pytest.param(1000, 2, np.zeros(1000, np.int64), [0, 500, 1000], id="one-episode"),
])
def test_cut_points_prefer_episode_boundaries_near_even_cuts(rows, parts, episode_id, cuts):
    assert cut_points(rows, parts, episode_id) == cuts


@pytest.mark.parametrize("rows, nbytes, inserted, turn, split, plan", [
    pytest.param(1000, BIG, [0, 0], 0, True, [(0, 0, 500), (1, 500, 1000)], id="cut-tie"),
    pytest.param(1000, BIG, [0, 0], 1, True, [(1, 0, 500), (0, 500, 1000)], id="cut-tie-turn"),
    pytest.param(1000, BIG, [900, 0], 0, True, [(1, 0, 500), (0, 500, 1000)], id="cut-least-first"),
    pytest.param(1000, BIG, [0, 0], 0, False, [(0, 0, 1000)], id="whole-when-inserts-may-wait"),
    pytest.param(1000, MB, [0, 0], 0, True, [(0, 0, 1000)], id="small-payload-whole"),
    pytest.param(1000, MB, [1000, 0], 0, True, [(1, 0, 1000)], id="small-to-least-filled"),
    pytest.param(40, MB, [40, 40], 1, True, [(1, 0, 40)], id="small-tie-turn"),
])
def test_plan_write_balances_local_shards(rows, nbytes, inserted, turn, split, plan):
    assert plan_write(rows, nbytes, [0, 1], inserted, turn, split=split) == plan


def test_plan_write_uses_only_the_writer_shards():
    # shards 1 and 3 are on the caller's node; 0 and 2 are empty but elsewhere
    assert plan_write(1000, BIG, [1, 3], [0, 500, 0, 100], 0, split=True) == [(3, 0, 500), (1, 500, 1000)]
    assert plan_write(1000, MB, [1, 3], [0, 500, 0, 100], 0, split=True) == [(3, 0, 1000)]


# -- priority_routing ------------------------------------------------------------------------

TAGS = (5, 9)


def table(inserted=(100, 50), limits=(float("inf"), 1e10)) -> ShardTable:
    """Two shards as a client would know them: tags 5 and 9, rows stored 100 and 50."""
    entries = []
    for k in range(2):
        info = {"node_id": "n", "sampler_type": "prioritized", "schema": None,
                "sampler": {"type": "prioritized", "alpha": 0.6, "beta": 0.4},
                "rate_limiter": {"timeout_s": 1.0}, "index_tag": TAGS[k],
                "priority_limit": limits[k]}
        entries.append(ShardEntry(handle=None, info=info, total_inserted=inserted[k]))
    return ShardTable("t", entries, "n")


def index(shard: int, counter: int, tag: int | None = None) -> int:
    return int(with_shard(with_tag(np.int64(counter), TAGS[shard] if tag is None else tag), shard))


def no_refresh(shards):
    raise AssertionError(f"no shard should be asked again, asked {shards}")


def test_a_good_update_is_split_by_shard_with_the_shard_bits_cleared():
    idx = np.array([index(1, 7), index(0, 3), index(1, 49)])
    parts = check_update(table(), idx, np.array([1.0, 2.0, 3.0]), no_refresh)
    assert sorted(parts) == [0, 1]
    np.testing.assert_array_equal(parts[0][0], [with_tag(np.int64(3), TAGS[0])])
    np.testing.assert_array_equal(parts[1][0], with_tag(np.array([7, 49]), TAGS[1]))
    np.testing.assert_array_equal(parts[1][1], [1.0, 3.0])


BAD = [
    ("nan", [index(0, 1), index(1, 1)], [1.0, float("nan")], ValueError,
     r"priority\[1\]=nan is not a finite number >= 0; priorities must be finite and non-negative"),
    ("negative-priority", [index(0, 1), index(1, 1)], [-0.5, 1.0], ValueError,
     r"priority\[0\]=-0.5 is not a finite number >= 0"),
    ("negative-index", [index(0, 1), -4], [1.0, 1.0], StaleIndexError,
     r"index\[1\]=-4 is negative; pass the int64 indices"),
    ("no-such-shard", [index(0, 1), int(with_shard(np.int64(2), 2))], [1.0, 1.0], StaleIndexError,
     rf"index\[1\]={int(with_shard(np.int64(2), 2))} names shard 2, but buffer 't' has shards 0..1"),
    ("another-buffer", [index(0, 1), index(1, 1, tag=6)], [1.0, 1.0], StaleIndexError,
     r"index\[1\]=\d+ belongs to an earlier buffer deleted and created again under the name "
     r"'t', or to another buffer: it carries tag 6, and shard 1 of this buffer issues tag 9"),
    ("never-written", [index(0, 1), index(1, 60)], [1.0, 1.0], StaleIndexError,
     r"index\[1\]=\d+ names row 60 of shard 1, which has written rows 0..49: it was never written"),
    ("too-large", [index(0, 1), index(1, 1)], [1e300, 2e10], ValueError,
     r"priority\[1\]=20000000000.0 is above 1e\+10, the largest shard 1 of buffer 't' accepts"),
]


@pytest.mark.parametrize("idx, prio, error, message", [case[1:] for case in BAD], ids=[c[0] for c in BAD])
def test_one_bad_entry_refuses_the_whole_update(idx, prio, error, message):
    shards = table()
    asked = []

    def refresh(ks):  # a shard asked again still reports the same rows
        asked.extend(ks)

    with pytest.raises(error, match=message):
        check_update(shards, np.array(idx, dtype=np.int64), np.array(prio), refresh)
    # only an index at or beyond a shard's known rows makes the client ask that shard
    assert asked == ([1] if "never-written" in message or "row 60" in message else [])


def test_an_index_beyond_the_cached_rows_refreshes_that_shard_once():
    shards = table(inserted=(100, 50))

    def refresh(ks):  # shard 1 has stored 20 more rows since the client last heard
        assert ks == [1]
        shards.note_state(1, {"size": 70, "mass": 70.0, "total_inserted": 70})

    parts = check_update(shards, np.array([index(1, 60), index(0, 99)]), np.array([1.0, 1.0]), refresh)
    assert sorted(parts) == [0, 1] and shards[1].total_inserted == 70


def test_an_answer_with_another_tag_replaces_what_the_table_knew_of_that_shard():
    shards = table(inserted=(100, 50))
    shards.note_state(1, {"size": 40, "mass": 40.0, "total_inserted": 40, "index_tag": 77})
    assert (shards[1].index_tag, shards[1].total_inserted) == (77, 40)  # not max(50, 40)
    shards.note_state(0, {"size": 90, "mass": 90.0, "total_inserted": 90, "index_tag": TAGS[0]})
    assert (shards[0].index_tag, shards[0].total_inserted) == (TAGS[0], 100)  # a late answer
    with pytest.raises(StaleIndexError, match=r"carries tag 9, and shard 1 of this buffer issues tag 77"):
        check_update(shards, np.array([index(1, 3)]), np.array([1.0]), no_refresh)


# -- sample_fanout: the split and the assembly, as pure functions ----------------------------


@pytest.mark.parametrize("sizes, masses, prioritized, expected", [
    ([30, 10], [1.0, 3.0], False, [0.75, 0.25]),
    ([30, 10], [1.0, 3.0], True, [0.25, 0.75]),
    ([0, 0], [0.0, 0.0], False, [0.5, 0.5]),  # nothing known yet: an even split
    ([5, 0, 5], [0.0, 0.0, 0.0], True, [1 / 3, 1 / 3, 1 / 3]),
])
def test_split_weights_follow_size_or_mass(sizes, masses, prioritized, expected):
    np.testing.assert_allclose(split_weights(sizes, masses, prioritized), expected)


def test_split_rows_splits_every_batch_in_full_and_leaves_out_empty_shares():
    rng = np.random.default_rng(0)
    weights = np.array([0.7, 0.0, 0.3])
    per_shard = split_rows(rng, [(0, 256), (1, 256), (2, 5)], weights)
    assert per_shard[1] == []  # a shard of weight 0 gets no row
    for b, rows in ((0, 256), (1, 256), (2, 5)):
        assert sum(r for shard in per_shard for bb, r in shard if bb == b) == rows
    # the draw is one multinomial per batch from the given generator: reproducible
    again = split_rows(np.random.default_rng(0), [(0, 256), (1, 256), (2, 5)], weights)
    assert again == per_shard
    counts = np.zeros(3)
    for _ in range(200):
        for k, shard in enumerate(split_rows(rng, [(0, 100)], weights)):
            counts[k] += sum(r for _, r in shard)
    np.testing.assert_allclose(counts / counts.sum(), weights, atol=0.01)


def answer(shard: int, counters: list[int]) -> dict:
    """A shard's sample answer: its own indices (tag 5, shard bits 0) and one column."""
    idx = with_tag(np.asarray(counters, dtype=np.int64), 5)
    return {("index",): idx, ("x",): np.asarray(counters, dtype=np.float32) + 1000 * shard}


def test_by_batch_and_assemble_rebuild_each_batch_with_global_indices_and_weights():
    # shard 0 served 3 rows of batch 0 then 1 of batch 1; shard 1: 1 of batch 0, 3 of batch 1
    m0, m1 = np.array([1.0, 2.0, 4.0, 8.0]), np.array([0.5, 1.0, 1.0, 16.0])
    parts = [(0, answer(0, [10, 11, 12, 13]), m0, [(0, 3), (1, 1)]),
             (1, answer(1, [20, 21, 22, 23]), m1, [(0, 1), (1, 3)])]
    pieces = by_batch(parts, 2)
    assert [[(k, r0, rows) for k, _, _, r0, rows in p] for p in pieces] == \
        [[(0, 0, 3), (1, 0, 1)], [(0, 3, 1), (1, 1, 3)]]
    first, second = (assemble(4, p, beta=0.5) for p in pieces)
    assert first["x"].tolist() == [10.0, 11.0, 12.0, 1020.0]
    assert [int(shard_of(np.int64(i))) for i in first["index"]] == [0, 0, 0, 1]
    assert first["index"][3].item() == int(with_shard(with_tag(np.int64(20), 5), 1))
    # the weights of each batch as a whole: (min mass / mass) ** beta over its own rows
    mass = np.array([1.0, 2.0, 4.0, 0.5])
    np.testing.assert_allclose(first["weight"].numpy(), (mass.min() / mass) ** 0.5, rtol=1e-6)
    mass = np.array([8.0, 1.0, 1.0, 16.0])
    np.testing.assert_allclose(second["weight"].numpy(), (mass.min() / mass) ** 0.5, rtol=1e-6)
    assert first["weight"].dtype == torch.float32 and float(second["weight"].max()) == 1.0
    # uniform: no masses, no weights
    plain = assemble(4, by_batch([(1, answer(1, [1, 2, 3, 4]), None, [(0, 4)])], 1)[0], beta=None)
    assert "weight" not in plain.keys() and plain["x"].tolist() == [1001.0, 1002.0, 1003.0, 1004.0]
    with pytest.raises(RuntimeError, match=r"assembled 4 rows, expected 5"):
        assemble(5, pieces[0], beta=None)


def test_assemble_weighs_rows_from_several_shards_as_one_buffer_would():
    """The weights a client assembles from two shards' masses are those a single buffer
    holding both shards' rows gives the same rows: ``importance_weights`` of the batch."""
    rng = np.random.default_rng(1)
    mass = rng.uniform(0.1, 5.0, size=64)
    parts = [(0, answer(0, list(range(40))), mass[:40], [(0, 40)]),
             (1, answer(1, list(range(24))), mass[40:], [(0, 24)])]
    batch = assemble(64, by_batch(parts, 1)[0], beta=0.4)
    np.testing.assert_array_equal(batch["weight"].numpy(), importance_weights(mass, 0.4))
