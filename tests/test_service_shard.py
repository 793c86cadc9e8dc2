"""``ReplayShard`` as a plain class (no Ray) on real memmap directories, and the
service's argument checks that need no cluster."""

from __future__ import annotations

import numpy as np
import pytest

from rlfleet.buffer import SampleTimeout, SchemaMismatch, StaleIndexError
from rlfleet.buffer.indices import counter_of, shard_of, tag_of, with_tag
from rlfleet.buffer.capacity import split_capacity
from rlfleet.buffer.naming import shard_actor_name
from rlfleet.buffer.shard import ReplayShard


def arrays(ids) -> dict[tuple[str, ...], np.ndarray]:
    ids = np.asarray(list(ids), dtype=np.int64)
    obs = np.repeat(ids.astype(np.float32)[:, None], 3, axis=1)
    return {("observation",): obs, ("next", "observation"): obs + 1, ("step",): ids}


def make(path, **kwargs) -> ReplayShard:
    args = dict(buffer="t", shard=1, num_shards=2, path=str(path), capacity=50,
                rate_limiter={"min_size_to_sample": 5, "timeout_s": 5.0}, export_metrics=False,
                seed=0)
    args.update(kwargs)
    return ReplayShard(**args)


def test_extend_sample_and_state(tmp_path):
    shard = make(tmp_path / "shard-1")
    out = shard.extend(arrays(range(10)))
    tag = shard.info()["index_tag"]
    # the shard's own indices: its tag, shard bits 0 (the client sets those)
    assert (out["first"], out["last"]) == (int(with_tag(np.int64(0), tag)), int(with_tag(np.int64(10), tag)))
    assert out["state"] == {"size": 10, "mass": 10.0, "total_inserted": 10, "index_tag": tag}
    out = shard.extend(arrays(range(10, 13)))
    assert (counter_of(np.int64(out["first"])), counter_of(np.int64(out["last"]))) == (10, 13)
    got = shard.sample(32)
    assert set(got["arrays"]) == {("observation",), ("next", "observation"), ("step",), ("index",)}
    index = got["arrays"][("index",)]
    np.testing.assert_array_equal(got["arrays"][("step",)], counter_of(index))
    assert set(tag_of(index).tolist()) == {tag} and set(shard_of(index).tolist()) == {0}
    np.testing.assert_array_equal(got["arrays"][("observation",)][:, 0], got["arrays"][("step",)])
    assert shard.sample(0) == {"arrays": None, "state": shard.state()}
    info = shard.info()
    assert (info["buffer"], info["shard"], info["num_shards"], info["path"]) == \
        ("t", 1, 2, str(tmp_path / "shard-1"))
    assert info["schema"][("observation",)] == ((3,), np.dtype("float32"))
    # uniform sampler: no priorities, so no limit; one per-shard limiter
    assert (info["priority_limit"], info["buffer_wide_limiter"]) == (float("inf"), False)
    stats = shard.stats()
    assert (stats["size"], stats["samples"], stats["rate_limiter"]["samples"]) == (13, 32, 32)
    assert shard_actor_name("t", 1) == "rlfleet:t:shard-1"
    shard.close()


def test_a_restarted_shard_reopens_its_committed_rows(tmp_path):
    shard = make(tmp_path / "shard-1")
    shard.extend(arrays(range(30)))
    shard.extend(arrays(range(30, 60)))  # capacity 50: rows 0..9 are overwritten
    # a second construction over the same directory is what a Ray restart does
    again = make(tmp_path / "shard-1")
    assert again.state() == {"size": 50, "mass": 50.0, "total_inserted": 60,
                             "index_tag": shard.info()["index_tag"]}
    steps = again.sample(500)["arrays"][("step",)]
    assert set(steps.tolist()) == set(range(10, 60))
    assert again.limiter.state()["size"] == 50
    shard.close()
    again.close()


def test_update_priority_skips_overwritten_rows_counts_them_and_refuses_whole(tmp_path):
    shard = make(tmp_path / "shard-1", sampler={"type": "prioritized", "alpha": 1.0, "beta": 1.0})
    shard.extend(arrays(range(30)))
    shard.extend(arrays(range(30, 60)))  # capacity 50: counters 0..9 are overwritten
    tag = shard.info()["index_tag"]
    index = with_tag(np.arange(5, 15, dtype=np.int64), tag)  # 5 overwritten, 5 live
    out = shard.update_priority(index, np.full(10, 3.0))
    assert out == {"state": shard.state(), "skipped": 5}
    assert shard.state()["mass"] == 45 * 1.0 + 5 * 3.0
    stats = shard.stats()
    assert (stats["priority_updates"], stats["priority_updates_skipped"]) == (5, 5)
    # refused whole: a live row with a good priority next to a never-written one
    with pytest.raises(StaleIndexError, match=r"index\[1\]=\d+ names row 60, which was never written"):
        shard.update_priority(with_tag(np.array([20, 60], dtype=np.int64), tag), np.array([9.0, 9.0]))
    with pytest.raises(ValueError, match=r"priority\[0\]=inf is not a finite number >= 0"):
        shard.update_priority(with_tag(np.array([20], dtype=np.int64), tag), np.array([np.inf]))
    assert shard.state()["mass"] == 60.0
    assert shard.info()["priority_limit"] < float("inf")
    shard.close()


def test_a_refused_batch_leaves_counts_and_limiter_unchanged(tmp_path):
    # one shard: its own limiter (several shards with a ratio share shard 0's)
    shard = make(tmp_path / "shard-1", num_shards=1,
                 rate_limiter={"min_size_to_sample": 5, "samples_per_insert": 1.0,
                               "error_margin": 100.0})
    shard.extend(arrays(range(10)))
    bad = arrays(range(10, 12))
    bad[("step",)] = bad[("step",)].astype(np.int32)
    with pytest.raises(SchemaMismatch, match="extend: key 'step' has dtype int32, buffer schema says int64"):
        shard.extend(bad)
    assert shard.state()["size"] == 10
    assert shard.limiter.state()["inserts"] == 10
    with pytest.raises(ValueError, match="expected a non-empty dict of numpy arrays"):
        shard.extend({})
    shard.close()


def test_shard_0_keeps_the_buffer_wide_limiter_over_every_shards_rows(tmp_path):
    # what shard 0 of a 2-shard service with a ratio does, driven as a plain class: its
    # own calls and shard 1's forwarded ones meet in one limiter over the total size
    shard = make(tmp_path / "shard-0", shard=0, num_shards=2,
                 rate_limiter={"min_size_to_sample": 20, "samples_per_insert": 1.0,
                               "error_margin": 10.0, "timeout_s": 5.0})
    assert shard.info()["buffer_wide_limiter"] is True
    shard.extend(arrays(range(10)))
    # shard 1 holds 15 rows it stored before: the buffer holds 25 >= 20
    shard.forwarded_size(1, 15)
    shard.sample(4)                                  # served by shard 0
    assert shard.forwarded_acquire_sample(1, 6, None, 15) == 0.0  # admitted for shard 1
    wide = shard.stats()["buffer_rate_limiter"]
    # 25 rows known, 20 of them the minimum: 5 samples owed, 10 taken, so 5 ahead
    assert (wide["size"], wide["inserts"], wide["samples"], wide["ratio_offset"]) == (25, 10, 10, -5.0)
    with pytest.raises(SampleTimeout, match=r"for the buffer-wide rate limiter \(on shard 0\): size=25.*"
                       r"sampling is ahead of the samples_per_insert ratio"):
        shard.forwarded_acquire_sample(1, 16, 0.05, 15)
    shard.forwarded_cancel("sample", 6, 1)            # shard 1 did not use its admission
    assert shard.stats()["buffer_rate_limiter"]["samples"] == 4
    own = shard.stats()["rate_limiter"]              # shard 0's own calls only
    assert (own["inserts"], own["samples"], own["ratio_offset"]) == (10, 4, None)
    with pytest.raises(ValueError, match=r"shard=5 reported its size, but the service has shards 0..1"):
        shard.forwarded_size(5, 1)
    shard.close()
    other = make(tmp_path / "shard-1", shard=1, num_shards=2, rate_limiter={"samples_per_insert": 1.0})
    with pytest.raises(RuntimeError, match=r"rlfleet:t:shard-1 does not keep the buffer-wide rate limiter"):
        other.forwarded_size(1, 3)
    other.close()


def test_sample_below_min_size_times_out(tmp_path):
    shard = make(tmp_path / "shard-1")
    shard.extend(arrays(range(3)))
    with pytest.raises(SampleTimeout, match="holds 3 of the 5 rows needed"):
        shard.sample(2, timeout_s=0.05)
    shard.close()


def test_destroy_removes_the_directory(tmp_path):
    shard = make(tmp_path / "svc" / "shard-1")
    shard.extend(arrays(range(3)))
    shard.destroy()
    assert not (tmp_path / "svc").exists()


@pytest.mark.parametrize(
    "capacity, shards, parts",
    [
        (10, 3, [4, 3, 3]),
        ("1000", 2, [500, 500]),
        ("1kB", 3, ["334B", "333B", "333B"]),
        ("1KiB", 2, ["512B", "512B"]),
    ],
)
def test_capacity_is_split_evenly(capacity, shards, parts):
    assert split_capacity(capacity, shards) == parts


def test_capacity_below_the_shard_count_is_refused():
    with pytest.raises(ValueError, match=r"capacity=2 is smaller than num_shards=3"):
        split_capacity(2, 3)
    with pytest.raises(ValueError, match=r"capacity='lots': not a row count or a size"):
        split_capacity("lots", 2)


# name rules: tests/test_naming.py


def test_a_shard_killed_inside_create_starts_clean_but_never_clobbers_data(tmp_path):
    d = tmp_path / "shard-1"
    d.mkdir()
    (d / "header.bin").write_bytes(b"\0" * 64)  # what create writes before meta.json
    shard = make(d)
    assert shard.state()["size"] == 0 and (d / "meta.json").exists()
    shard.close()
    other = tmp_path / "shard-2"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not an empty directory"):
        make(other)
    assert (other / "notes.txt").read_text() == "keep me"
