"""ReplayBuffer on real memmap directories: layout, reopen, wrap-around, positions, errors.

Indices carry the buffer's tag (``rlfleet.buffer.indices``): tests compare their row
counters (``counters``) with the rows they expect. The module passes 400 lines because
it is the table of ReplayBuffer's basic contract, one short test per promise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import BufferFormatError, ReplayBuffer, SchemaMismatch
from rlfleet.buffer.indices import MAX_COUNTER, counter_of, tag_of, with_tag
from rlfleet.buffer.capacity import parse_capacity


def set_counters(rb: ReplayBuffer, start: int, end: int) -> None:
    """Move an EMPTY buffer's window to ``[start, start)`` (tests of large counters;
    ``start`` at most ``indices.MAX_COUNTER``): the header words and the window, as a
    buffer that had inserted ``start`` rows and lost them all would hold them."""
    w = rb._window
    with rb._write_lock, w.lock:
        if w.end != w.start or start != end:
            raise ValueError("set_counters: only an empty window can be moved")
        if not 0 <= start <= MAX_COUNTER:
            raise ValueError(f"set_counters: start={start} is not in [0, 2**44]")
        rb._header.start = rb._header.end = start
        w.start = w.end = start
        if rb._columns is not None:
            rb._columns.reserved = rb.capacity


def counters(index) -> np.ndarray:
    """The row counters of indices a buffer returned (a tensor or an array)."""
    return counter_of(np.asarray(index))


def rows(first: int, n: int, episode: int = 0) -> TensorDict:
    """Rows whose every field encodes the row number ``first + i``."""
    ids = torch.arange(first, first + n)
    return TensorDict(
        {
            "observation": ids[:, None].float().expand(n, 4).clone(),
            "action": ids.clone(),
            "reward": ids.float(),
            "done": ids % 2 == 0,
            "next": {"observation": (ids[:, None].float() + 0.5).expand(n, 4).clone()},
            "episode_id": torch.full((n,), episode, dtype=torch.int64),
            "step": ids.clone(),
        },
        batch_size=[n],
    )


def assert_rows(td: TensorDict, expected_ids: list[int] | np.ndarray) -> None:
    ids = torch.as_tensor(np.asarray(expected_ids), dtype=torch.int64)
    assert torch.equal(td["action"], ids)
    assert torch.equal(td["observation"], ids[:, None].float().expand(len(ids), 4))
    assert torch.equal(td["next", "observation"], ids[:, None].float().expand(len(ids), 4) + 0.5)
    assert torch.equal(td["done"], ids % 2 == 0)


def test_extend_then_reopen_has_same_contents(tmp_path):
    path = tmp_path / "buf"
    with ReplayBuffer.create(path, capacity=100, seed=0) as rb:
        idx = rb.extend(rows(0, 30))
        assert counters(idx).tolist() == list(range(30))
        assert (tag_of(idx.numpy()) == rb.index_tag).all() and 0 <= rb.index_tag < 4096
        idx = rb.extend(rows(30, 12))
        assert torch.equal(idx, torch.from_numpy(with_tag(np.arange(30, 42), rb.index_tag)))
        assert len(rb) == 42 and rb.total_inserted == 42 and rb.capacity == 100
        assert rb.schema[("next", "observation")] == ((4,), np.dtype("float32"))
        assert rb.schema[("done",)] == ((), np.dtype("bool"))
    with ReplayBuffer.open(path) as rb:
        assert len(rb) == 42 and rb.total_inserted == 42 and rb.sampler_type == "uniform"
        assert_rows(rb[:], range(42))
        batch = rb.sample(1000)
        assert_rows(batch, counters(batch["index"]))
        assert set(counters(batch["index"]).tolist()) == set(range(42))  # 1000 draws hit all 42 rows
        assert (tag_of(batch["index"].numpy()) == rb.index_tag).all()


def test_directory_layout_opens_with_plain_tensordict(tmp_path):
    path = tmp_path / "buf"
    with ReplayBuffer.create(path, capacity=16) as rb:
        rb.extend(rows(0, 5))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "rlfleet.buffer" and meta["format_version"] == 2
    assert isinstance(meta["index_tag"], int) and 0 <= meta["index_tag"] < 4096
    assert np.fromfile(path / "header.bin", dtype=np.int64)[1] == 2  # the header's version word
    assert meta["capacity"] == 16 and meta["sampler"] == {"type": "uniform"}
    assert (path / "header.bin").stat().st_size == 64
    data = TensorDict.load_memmap(path / "data")
    assert data.batch_size == torch.Size([16])
    assert torch.equal(data["action"][:5], torch.arange(5))
    assert torch.equal(data["next", "observation"][:5, 0], torch.arange(5).float() + 0.5)


def test_wrap_around_keeps_newest_rows_in_order(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=10, seed=1) as rb:
        for first in range(0, 35, 7):
            rb.extend(rows(first, 7))
        assert len(rb) == 10 and rb.total_inserted == 35
        assert_rows(rb[:], range(25, 35))
        assert int(rb[0]["action"]) == 25 and int(rb[-1]["action"]) == 34
        assert_rows(rb[torch.tensor([0, 9, -2])], [25, 34, 33])
        assert_rows(rb[2:8:3], [27, 30])
        batch = rb.sample(500)
        assert set(counters(batch["index"]).tolist()) == set(range(25, 35))
        assert_rows(batch, counters(batch["index"]))


def test_batch_larger_than_capacity_keeps_the_newest(tmp_path):
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=8) as rb:
        rb.extend(rows(0, 3))
        idx = rb.extend(rows(3, 21))
        assert counters(idx).tolist() == list(range(3, 24))
        assert len(rb) == 8 and rb.total_inserted == 24
        assert_rows(rb[:], range(16, 24))
    with ReplayBuffer.open(path) as rb:
        assert_rows(rb[:], range(16, 24))


def test_extend_arrays_and_sample_arrays(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=50, seed=3) as rb:
        arrays = {k: v.numpy() for k, v in rows(0, 20).items(include_nested=True, leaves_only=True)}
        arrays = {(k,) if isinstance(k, str) else k: v for k, v in arrays.items()}
        for a in arrays.values():
            a.setflags(write=False)  # arrays arriving through Ray are read-only
        idx = rb.extend_arrays(arrays)
        assert idx.dtype == np.int64 and idx.tolist() == with_tag(np.arange(20), rb.index_tag).tolist()
        out = rb.sample_arrays(64)
        assert set(out) == set(arrays) | {("index",)}
        assert out[("observation",)].shape == (64, 4)
        assert np.array_equal(out[("action",)], counters(out[("index",)]))
        assert np.array_equal(out[("next", "observation")][:, 0], counters(out[("index",)]) + 0.5)


def test_sample_owns_its_memory(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=4, seed=0) as rb:
        rb.extend(rows(0, 4))
        batch = rb.sample(16)
        before = batch["action"].clone()
        rb.extend(rows(100, 4))  # overwrite every slot
        assert torch.equal(batch["action"], before)
        assert np.array_equal(batch["action"].numpy(), counters(batch["index"]))


def test_counters_pass_2_to_the_31_and_reach_2_to_the_44(tmp_path):
    start = 2**31 - 5
    # a fresh buffer with its window moved just below 2**31 (internal test hook)
    path2 = tmp_path / "b2"
    with ReplayBuffer.create(path2, capacity=7, sampler="prioritized") as rb:
        rb.extend(rows(0, 0))
        set_counters(rb, start, start)
        idx = rb.extend(rows(start, 10))
        assert counters(idx).tolist() == list(range(start, start + 10))
        assert rb.total_inserted == 2**31 + 5 and len(rb) == 7
        assert rb.update_priority(with_tag(np.array([2**31 + 4]), rb.index_tag), torch.tensor([5.0])) == 0
        tag = rb.index_tag
    with ReplayBuffer.open(path2) as rb:
        assert rb.total_inserted == 2**31 + 5 and rb.index_tag == tag
        assert_rows(rb[:], range(2**31 - 2, 2**31 + 5))
        batch = rb.sample(50)
        assert int(counters(batch["index"]).min()) >= 2**31 - 2
        assert np.array_equal(batch["action"].numpy(), counters(batch["index"]))
        # overwritten since: skipped and counted, not refused
        assert rb.update_priority(with_tag(np.array([start, 2**31 + 4]), tag), [1.0, 2.0]) == 1
        assert rb.stats()["priority_updates"] == 1 and rb.stats()["priority_updates_skipped"] == 1

    # the last counters an index can name: 2**44 - 1 is the largest
    path3 = tmp_path / "b3"
    with ReplayBuffer.create(path3, capacity=4, sampler="prioritized") as rb:
        rb.extend(rows(0, 0))
        set_counters(rb, MAX_COUNTER - 6, MAX_COUNTER - 6)
        idx = rb.extend(rows(0, 6))
        assert counters(idx).tolist() == list(range(MAX_COUNTER - 6, MAX_COUNTER))
        assert (tag_of(idx.numpy()) == rb.index_tag).all()  # the counter never reaches the tag
        before = (path3 / "header.bin").read_bytes()
        for n in (1, 5):
            with pytest.raises(ValueError, match=rf"extend: {n} rows would take the row counter to "
                                                 rf"{MAX_COUNTER + n}, past 17592186044416 \(2\*\*44.*"
                                                 rf"create a new buffer"):
                rb.extend(rows(0, n))
        assert rb.total_inserted == MAX_COUNTER and (path3 / "header.bin").read_bytes() == before
        assert rb.extend(rows(0, 0)).tolist() == []  # an empty batch still passes
        assert rb.update_priority(idx[-2:], [3.0, 4.0]) == 0
        drawn = counters(rb.sample(20)["index"])
        assert drawn.min() >= MAX_COUNTER - 4 and drawn.max() <= MAX_COUNTER - 1
    with pytest.raises(ValueError, match=r"start=17592186044417 is not in \[0, 2\*\*44\]"):
        with ReplayBuffer.create(tmp_path / "b4", capacity=4) as rb:
            set_counters(rb, MAX_COUNTER + 1, MAX_COUNTER + 1)


@pytest.mark.parametrize(
    "capacity, expected",
    [
        (1000, (1000, None)),
        ("1_000_000", (1_000_000, None)),
        ("500GB", (None, 500 * 10**9)),
        ("2TiB", (None, 2 * 2**40)),
        ("1.5 MB", (None, 1_500_000)),
        ("1e6", (1_000_000, None)),
        ("2.5E3", (2500, None)),
        ("1e3GB", (None, 10**12)),
        ("1_000GB", (None, 10**12)),
    ],
)
def test_parse_capacity(capacity, expected):
    assert parse_capacity(capacity) == expected


@pytest.mark.parametrize(
    "capacity, message",
    [
        (0, r"row count must be in \[1, 2\*\*44\) \(the row counter of an index has 44 bits\)"),
        (2**44, r"capacity=17592186044416: row count must be in \[1, 2\*\*44\)"),
        (-3, r"row count must be in"),
        ("12 parsecs", r"not a row count or a size"),
        (True, r"expected a row count"),
        (1.5, r"expected a row count"),
        ("1.5e0", r"capacity='1.5e0': a row count must be a whole number"),
        ("2.5", r"capacity='2.5': a row count must be a whole number"),
    ],
)
def test_bad_capacity(tmp_path, capacity, message):
    with pytest.raises(ValueError, match=message):
        ReplayBuffer.create(tmp_path / "b", capacity=capacity)
    assert not (tmp_path / "b").exists()


def test_byte_capacity_fixes_rows_at_first_extend(tmp_path):
    path = tmp_path / "b"
    # rows(): 4*4 + 8 + 4 + 1 + 4*4 + 8 + 8 = 61 bytes per row
    with ReplayBuffer.create(path, capacity="6100B") as rb:
        assert rb.capacity == 0
        rb.extend(rows(0, 3))
        assert rb.capacity == 100
    with ReplayBuffer.open(path) as rb:
        assert rb.capacity == 100 and len(rb) == 3


def test_capacity_beyond_free_disk_is_refused_unless_overcommit(tmp_path):
    with pytest.raises(ValueError, match=r"capacity='1000PB' needs 1000.00 PB but only .* is free .*overcommit=True"):
        ReplayBuffer.create(tmp_path / "b", capacity="1000PB")
    assert not (tmp_path / "b").exists()
    with ReplayBuffer.create(tmp_path / "b", capacity="1000PB", overcommit=True) as rb:
        with pytest.raises(OSError, match=r"cannot create sparse data files of .* lower the capacity"):
            rb.extend(rows(0, 2))  # beyond what the filesystem allows in one file
        assert len(rb) == 0 and rb.schema is None
    with ReplayBuffer.create(tmp_path / "c", capacity=10**13) as rb:
        with pytest.raises(ValueError, match=r"capacity=10000000000000 needs .*overcommit=True"):
            rb.extend(rows(0, 2))


SCHEMA_CASES = {
    "missing key": (lambda td: td.exclude("reward"), r"batch lacks key 'reward'"),
    "extra key": (lambda td: td.update({"extra": torch.zeros(4)}), r"batch has key 'extra' that the buffer schema lacks"),
    "extra nested key": (
        lambda td: td.update({("next", "reward"): torch.zeros(4)}),
        r"batch has key 'next.reward'",
    ),
    "dtype": (
        lambda td: td.update({"observation": td["observation"].double()}),
        r"key 'observation' has dtype float64, buffer schema says float32",
    ),
    "shape": (
        lambda td: td.update({("next", "observation"): torch.zeros(4, 5)}),
        r"key 'next.observation' has per-row shape \[5\], buffer schema says \[4\]",
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_schema_mismatch_leaves_buffer_unchanged(tmp_path, case):
    change, message = SCHEMA_CASES[case]
    with ReplayBuffer.create(tmp_path / "b", capacity=10) as rb:
        rb.extend(rows(0, 6))
        with pytest.raises(SchemaMismatch, match=message):
            rb.extend(change(rows(6, 4)))
        assert len(rb) == 6 and rb.total_inserted == 6
        assert_rows(rb[:], range(6))


def test_bad_batches(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=10) as rb:
        with pytest.raises(ValueError, match=r"expected a TensorDict with batch_size \[N\], got batch_size \[\]"):
            rb.extend(TensorDict({"a": torch.zeros(3)}, batch_size=[]))
        with pytest.raises(ValueError, match=r"got batch_size \[2, 3\]"):
            rb.extend(TensorDict({"a": torch.zeros(2, 3)}, batch_size=[2, 3]))
        with pytest.raises(SchemaMismatch, match=r"key 'index' is reserved"):
            rb.extend(TensorDict({"index": torch.zeros(2)}, batch_size=[2]))
        with pytest.raises(SchemaMismatch, match=r"dtype torch.bfloat16"):
            rb.extend(TensorDict({"a": torch.zeros(2, dtype=torch.bfloat16)}, batch_size=[2]))
        with pytest.raises(ValueError, match=r"key 'b' has 3 rows, other keys have 2"):
            rb.extend_arrays({("a",): np.zeros(2), ("b",): np.zeros(3)})
        assert rb.schema is None and len(rb) == 0


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_bad_sample_size(tmp_path, n):
    with ReplayBuffer.create(tmp_path / "b", capacity=10) as rb:
        rb.extend(rows(0, 3))
        with pytest.raises(ValueError, match=r"sample: n=.* must be a positive int"):
            rb.sample(n)


def test_sample_empty_buffer(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=10) as rb:
        with pytest.raises(ValueError, match=r"sample: the buffer is empty"):
            rb.sample(4)
        rb.extend(rows(0, 0))
        with pytest.raises(ValueError, match=r"sample: the buffer is empty"):
            rb.sample_arrays(4)


def test_positions_out_of_range(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=10) as rb:
        rb.extend(rows(0, 3))
        with pytest.raises(IndexError, match=r"position 3 is out of range for a buffer of 3 rows"):
            rb[3]
        with pytest.raises(IndexError, match=r"position -4 is out of range"):
            rb[-4]
        with pytest.raises(IndexError, match=r"positions -1..5 out of range"):
            rb[torch.tensor([-1, 5])]


def test_create_on_non_empty_path(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("x")
    with pytest.raises(FileExistsError, match=r"exists and is not an empty directory"):
        ReplayBuffer.create(tmp_path / "b", capacity=10)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        ReplayBuffer.create(tmp_path / "f", capacity=10)
    (tmp_path / "empty").mkdir()
    ReplayBuffer.create(tmp_path / "empty", capacity=10).close()


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no buffer directory at"):
        ReplayBuffer.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BufferFormatError, match=r"is not an rlfleet buffer \(no meta.json\)"):
        ReplayBuffer.open(tmp_path / "plain")
    (tmp_path / "plain" / "meta.json").write_text("{not json")
    with pytest.raises(BufferFormatError, match=r"is not valid JSON"):
        ReplayBuffer.open(tmp_path / "plain")
    (tmp_path / "plain" / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(BufferFormatError, match=r"format is 'other'"):
        ReplayBuffer.open(tmp_path / "plain")
    ReplayBuffer.create(tmp_path / "newer", capacity=10).close()
    meta = json.loads((tmp_path / "newer" / "meta.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "newer" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BufferFormatError, match=r"format version 99; this rlfleet reads versions up to 2: upgrade"):
        ReplayBuffer.open(tmp_path / "newer")
    meta["format_version"] = 1
    del meta["sampler"]
    (tmp_path / "newer" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BufferFormatError, match=r"lacks 'sampler'; the buffer directory is damaged"):
        ReplayBuffer.open(tmp_path / "newer")
    (tmp_path / "newer" / "header.bin").unlink()
    meta["sampler"] = {"type": "uniform"}
    (tmp_path / "newer" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BufferFormatError, match=r"header .* is missing or not 64 bytes"):
        ReplayBuffer.open(tmp_path / "newer")


def test_closed_buffer_refuses_calls(tmp_path):
    rb = ReplayBuffer.create(tmp_path / "b", capacity=10)
    rb.extend(rows(0, 2))
    rb.close()
    rb.close()
    with pytest.raises(ValueError, match=r"is closed; reopen it"):
        rb.sample(1)


def test_stats(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=10, seed=0) as rb:
        rb.extend(rows(0, 4))
        rb.extend(rows(4, 4))
        rb.sample(3)
        s = rb.stats()
        assert s["size"] == 8 and s["capacity"] == 10 and s["total_inserted"] == 8
        assert s["inserts"] == 8 and s["samples"] == 3 and s["priority_mass"] == 8
        assert s["bytes_on_disk"] > 0
        assert s["priority_updates"] == 0 and s["priority_updates_skipped"] == 0
        # samplers without priorities check and count an update the same way
        assert rb.update_priority(rb.sample(5)["index"], torch.ones(5)) == 0
        rb.extend(rows(8, 4))  # rows 0 and 1 are overwritten
        assert rb.update_priority(with_tag(np.array([0, 1, 2, 11]), rb.index_tag), torch.ones(4)) == 2
        s = rb.stats()
        assert s["priority_updates"] == 7 and s["priority_updates_skipped"] == 2


@pytest.mark.parametrize("sampler", ["uniform", "prioritized", {"type": "sequence", "length": 3}])
def test_sample_into_out_matches_a_fresh_sample(tmp_path, sampler):
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=50, seed=0, sampler=sampler) as rb:
        rb.extend(rows(0, 40))
    with ReplayBuffer.open(path, seed=3) as fresh, ReplayBuffer.open(path, seed=3) as reused:
        out = reused.sample(16)
        fresh.sample(16)  # the same draws so far
        storages = {key: out.get(key).data_ptr() for key in out.keys(True, True)}
        for _ in range(3):
            expected = fresh.sample(16)
            got = reused.sample(16, out=out)
            assert got is out
            assert set(got.keys(True, True)) == set(expected.keys(True, True))
            for key in expected.keys(True, True):
                assert torch.equal(got.get(key), expected.get(key)), key
                assert got.get(key).data_ptr() == storages[key]  # written in place
        assert_rows(out if out.batch_dims == 1 else out[:, 0], counters(out["index"].reshape(len(out), -1)[:, 0]))


def test_sample_into_out_follows_a_replaced_tensor_and_keeps_added_keys(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=50, seed=0) as rb:
        rb.extend(rows(0, 40))
        out = rb.sample(8)
        out["advantage"] = torch.full((8,), 7.0)
        out["action"] = torch.zeros(8, dtype=torch.int64)  # a new tensor: checked and used
        rb.sample(8, out=out)
        assert_rows(out, counters(out["index"]))
        assert torch.equal(out["advantage"], torch.full((8,), 7.0))


def test_sample_into_bad_out(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=50, seed=0) as rb:
        rb.extend(rows(0, 40))
        out, bad = rb.sample(8), rb.sample(8)
        before = rb.stats()["samples"]
        with pytest.raises(ValueError, match=r"out has batch_size \[8\] but this call gives \[9\]"):
            rb.sample(9, out=out)
        with pytest.raises(TypeError, match=r"out must be a TensorDict returned by an earlier sample, got dict"):
            rb.sample(8, out={"action": torch.zeros(8)})
        out["reward"] = torch.zeros(8, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"out\['reward'\] is torch.float64 \[8\], expected torch.float32 \[8\]"):
            rb.sample(8, out=out)
        out["reward"] = torch.zeros(8)
        del out["next"]
        with pytest.raises(ValueError, match=r"out has no tensor at key 'next.observation'"):
            rb.sample(8, out=out)
        bad["observation"] = torch.zeros(4, 8).T  # right shape, not contiguous
        with pytest.raises(ValueError, match=r"out\['observation'\] must be a contiguous CPU tensor"):
            rb.sample(8, out=bad)
        assert rb.stats()["samples"] == before  # refused before drawing anything


def test_a_byte_capacity_says_so_until_the_first_batch_fixes_the_rows(tmp_path):
    rb = ReplayBuffer.create(tmp_path / "b", capacity="1MB")
    assert rb.capacity == 0 and rb.capacity_bytes == 1_000_000
    assert rb.stats()["capacity_bytes"] == 1_000_000
    assert "capacity=0 (rows of 1.00 MB, counted at the first extend)" in repr(rb)
    rb.extend_arrays({("x",): np.zeros((4, 25), np.float32)})  # 100 bytes a row
    assert rb.capacity == 10_000 and "capacity=10000," in repr(rb)
    rb.close()
