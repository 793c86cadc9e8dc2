"""Buffer format 1 (reward and flags at the root): read-only opening, and the in-place
upgrade to format 2 (TorchRL's layout), including upgrades interrupted at every step.

Format 1 directories are built on real files the way rlfleet wrote them: the buffer
stores whatever keys it is given, so a buffer written with the format 1 keys and then
given format 1's ``meta.json`` (no index tag, version 1) and header version word is
byte for byte a format 1 directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import BufferFormatError, ReplayBuffer
from rlfleet.buffer.check import check_buffer
from rlfleet.buffer.indices import counter_of, tag_of
from rlfleet.buffer.upgrade import _Upgrade, upgrade_buffer

CAPACITY = 16
MOVED = ["next.reward", "next.done", "next.terminated", "next.truncated"]


def format1_rows(index: np.ndarray, reward_shape: tuple[int, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    """Rows of the format 1 layout; every field a function of the row counter."""
    index = np.asarray(index, dtype=np.int64)
    n = len(index)
    return {
        ("observation",): np.repeat(index[:, None], 3, axis=1).astype(np.float32),
        ("action",): index % 4,
        ("reward",): (index * 0.5).astype(np.float32).reshape(n, *reward_shape),
        ("done",): index % 5 == 4,
        ("terminated",): index % 10 == 4,
        ("truncated",): index % 10 == 9,
        ("next", "observation"): np.repeat(index[:, None] + 1, 3, axis=1).astype(np.float32),
        ("episode_id",): index // 5,
        ("step",): index % 5,
    }


def make_format1(path: Path, rows: int = 23, sampler: str = "uniform", reward_shape=()) -> None:
    """A format 1 directory holding rows ``rows - CAPACITY .. rows - 1`` (the ring wrapped)."""
    with ReplayBuffer.create(path, capacity=CAPACITY, sampler=sampler) as rb:
        for first in range(0, rows, 9):
            rb.extend_arrays(format1_rows(np.arange(first, min(rows, first + 9)), reward_shape))
    meta = json.loads((path / "meta.json").read_text())
    del meta["index_tag"]
    meta["format_version"] = 1
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    header = np.memmap(path / "header.bin", dtype=np.int64, mode="r+", shape=(8,))
    header[1] = 1
    header.flush()
    del header


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (hard links show under both names)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def assert_format2_rows(td: TensorDict, counters: np.ndarray) -> None:
    want = format1_rows(counters)
    for key, arr in want.items():
        if key[-1] in ("reward", "done", "terminated", "truncated"):
            got = td.get(("next", key[-1])).numpy()
            assert got.shape == (len(counters), 1), key
            assert np.array_equal(got[:, 0], arr), key
            assert key not in td.keys(include_nested=True), key
        else:
            assert np.array_equal(td.get(key).numpy(), arr), key


def format1_error(what: str, path: Path) -> str:
    return re.escape(f"{what}: {path} is format 1 (reward and flags at the root); run `rlfleet check "
                     f"--upgrade {path}` to migrate it in place to format 2")


@pytest.mark.parametrize("sampler", ["uniform", "prioritized"])
def test_format1_opens_read_only_and_returns_what_is_stored(tmp_path, sampler):
    path = tmp_path / "old"
    make_format1(path, sampler=sampler)
    before = tree(path)
    report = check_buffer(path)
    assert report.ok and report.format_version == 1 and report.size == CAPACITY
    assert str(report).splitlines()[3] == (
        f"  format 1 (reward and flags at the root): opens read-only; run `rlfleet check "
        f"--upgrade {path}` to migrate it in place to format 2")
    with ReplayBuffer.open(path, seed=0) as rb:
        assert rb.format_version == 1 and rb.index_tag == 0 and len(rb) == CAPACITY
        assert rb.schema[("reward",)] == ((), np.dtype(np.float32))
        got = rb[:]
        for key, want in format1_rows(np.arange(23 - CAPACITY, 23)).items():
            assert np.array_equal(got.get(key).numpy(), want), key  # root keys, shape [N]
        batch = rb.sample(64)
        index = batch["index"].numpy()
        assert (tag_of(index) == 0).all()
        for key, want in format1_rows(counter_of(index)).items():
            assert np.array_equal(batch.get(key).numpy(), want), key
        if sampler == "prioritized":
            assert torch.isfinite(batch["weight"]).all()
        with pytest.raises(BufferFormatError, match=format1_error("extend", path)):
            rb.extend_arrays(format1_rows(np.arange(23, 25)))
        with pytest.raises(BufferFormatError, match=format1_error("update_priority", path)):
            rb.update_priority(index[:2], [1.0, 2.0])
        rb.flush()
        assert len(rb) == CAPACITY and rb.total_inserted == 23
    other = "prioritized" if sampler == "uniform" else "uniform"
    with pytest.raises(BufferFormatError, match=format1_error(f"open: sampler={other!r}", path)):
        ReplayBuffer.open(path, sampler=other)
    assert tree(path) == before  # never written, not even meta.json


def test_format1_repair_of_a_killed_oversized_extend_stays_in_memory(tmp_path):
    path = tmp_path / "old"
    make_format1(path)
    header = np.memmap(path / "header.bin", dtype=np.int64, mode="r+", shape=(8,))
    header[2] = 40  # start past end: a kill inside an extend of 33 rows after 23
    header.flush()
    del header
    before = tree(path)
    assert check_buffer(path).repairs
    with ReplayBuffer.open(path) as rb:
        assert len(rb) == 0 and rb.total_inserted == 23
    assert tree(path) == before


def test_upgrade_moves_reward_and_flags_under_next(tmp_path, capsys):
    from rlfleet.launch.cli import main as cli_main

    path = tmp_path / "old"
    make_format1(path, sampler="prioritized")
    with ReplayBuffer.open(path) as rb:
        old_rows = rb[:]
    old_files = tree(path)
    assert cli_main(["check", "--upgrade", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"buffer {path}: upgraded from format 1 to 2 (moved under next: "
                      f"{', '.join(MOVED)})")
    assert out[1] == f"buffer {path}: OK"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 2 and 0 <= meta["index_tag"] < 4096
    entries = {tuple(e["key"]): (e["shape"], e["dtype"]) for e in meta["schema"]}
    assert entries[("next", "reward")] == ([1], "<f4") and entries[("next", "done")] == ([1], "bool")
    assert not any(len(k) == 1 and k[0] in ("reward", "done", "terminated", "truncated") for k in entries)
    assert np.fromfile(path / "header.bin", dtype=np.int64)[1] == 2
    files = tree(path)
    for name in ("reward", "done", "terminated", "truncated"):  # the bytes moved unchanged
        assert f"data/{name}.memmap" not in files
        assert files[f"data/next/{name}.memmap"] == old_files[f"data/{name}.memmap"]
    assert files["priorities.bin"] == old_files["priorities.bin"]
    assert not (path / "upgrade.tmp").exists()

    data = TensorDict.load_memmap(path / "data")  # plain tensordict sees the new layout
    assert data.get(("next", "reward")).shape == (CAPACITY, 1)
    assert data.get(("next", "truncated")).dtype == torch.bool
    assert "reward" not in data.keys() and "done" not in data.keys()
    with ReplayBuffer.open(path, seed=1) as rb:
        assert rb.format_version == 2 and rb.index_tag == meta["index_tag"]
        rows = rb[:]
        assert_format2_rows(rows, np.arange(23 - CAPACITY, 23))
        for key in ("reward", "done", "terminated", "truncated"):
            assert torch.equal(rows["next", key][:, 0], old_rows[key])
        batch = rb.sample(32)
        assert_format2_rows(batch, counter_of(batch["index"].numpy()))
        assert rb.update_priority(batch["index"], torch.full((32,), 2.0)) == 0
        new = format1_rows(np.arange(23, 30))
        new = {(("next", k[0]) if k[0] in ("reward", "done", "terminated", "truncated") else k):
               (v[:, None] if k[0] in ("reward", "done", "terminated", "truncated") else v)
               for k, v in new.items()}
        rb.extend_arrays(new)  # format 2 rows are written now
        assert_format2_rows(rb[-7:], np.arange(23, 30))
    assert str(upgrade_buffer(path)) == f"buffer {path}: already format 2; nothing to upgrade"
    assert check_buffer(path).ok


def test_upgrade_keeps_a_per_row_shape_of_one_and_refuses_a_clash(tmp_path):
    path = tmp_path / "old"
    make_format1(path, reward_shape=(1,))
    report = upgrade_buffer(path)
    assert report.moved == MOVED
    with ReplayBuffer.open(path) as rb:
        assert rb.schema[("next", "reward")] == ((1,), np.dtype(np.float32))
        assert rb.schema[("next", "done")] == ((1,), np.dtype(bool))
        assert_format2_rows(rb[:], np.arange(23 - CAPACITY, 23))

    clash = tmp_path / "clash"
    with ReplayBuffer.create(clash, capacity=4) as rb:
        rb.extend_arrays({("reward",): np.zeros(2, np.float32), ("next", "reward"): np.ones((2, 1), np.float32)})
    meta = json.loads((clash / "meta.json").read_text())
    meta["format_version"] = 1
    (clash / "meta.json").write_text(json.dumps(meta))
    before = tree(clash)
    with pytest.raises(BufferFormatError, match=re.escape(
            f"upgrade: {clash} holds both 'reward' and 'next.reward'; format 2 keeps only "
            f"'next.reward', so this buffer cannot be upgraded in place")):
        upgrade_buffer(clash)
    assert tree(clash) == before


# a crash after step k of the upgrade (module docstring of rlfleet.buffer.upgrade), and
# a crash inside steps: one file linked of four; metadata rewritten but old names kept
PARTIAL = ["none", "one link", "link", "metadata", "header", "commit", "commit+metadata"]


@pytest.mark.parametrize("partial", PARTIAL)
def test_an_interrupted_upgrade_opens_and_a_rerun_finishes_it(tmp_path, partial):
    reference = tmp_path / "reference"
    make_format1(reference, sampler="prioritized")
    path = tmp_path / "old"
    shutil.copytree(reference, path)
    upgrade_buffer(reference)
    plan = _Upgrade(path)
    steps = {"none": [], "one link": [], "link": ["link"], "metadata": ["link", "metadata"],
             "header": ["link", "metadata", "header"],
             "commit": ["link", "metadata", "header", "commit"],
             "commit+metadata": ["link", "metadata", "header", "commit"]}[partial]
    for step in steps:
        getattr(plan, step)()
    if partial == "one link":
        os.link(path / "data" / "reward.memmap", path / "data" / "next" / "reward.memmap")
    if partial == "commit+metadata":  # step 5 half done: the old names are still there
        from rlfleet.buffer.upgrade import _write_tensordict_metadata

        _write_tensordict_metadata(path, plan.new_schema, CAPACITY)
    committed = "commit" in steps
    report = check_buffer(path)
    assert report.ok, str(report)
    assert report.format_version == (2 if committed else 1)
    with ReplayBuffer.open(path) as rb:  # either format opens, with the same rows
        rows = rb[:]
        if committed:
            assert_format2_rows(rows, np.arange(23 - CAPACITY, 23))
        else:
            for key, want in format1_rows(np.arange(23 - CAPACITY, 23)).items():
                assert np.array_equal(rows.get(key).numpy(), want), key
    result = upgrade_buffer(path)  # the rerun finishes it
    assert result.to_version == 2
    if committed:
        assert result.from_version == 2 and result.removed  # leftovers of step 5
        assert "data/reward.memmap" in result.removed
    assert sorted(tree(path)) == sorted(tree(reference))
    for name in tree(path):
        if name != "meta.json":  # the index tag is drawn per upgrade
            assert tree(path)[name] == tree(reference)[name], name
    meta, ref = (json.loads((p / "meta.json").read_text()) for p in (path, reference))
    assert {k: v for k, v in meta.items() if k != "index_tag"} == {k: v for k, v in ref.items() if k != "index_tag"}
    assert check_buffer(path).ok
    with ReplayBuffer.open(path) as rb:
        assert_format2_rows(rb[:], np.arange(23 - CAPACITY, 23))
    assert str(upgrade_buffer(path)) == f"buffer {path}: already format 2; nothing to upgrade"


WRITER = """
import sys, time
import numpy as np
header = np.memmap(sys.argv[1], dtype=np.int64, mode="r+", shape=(8,))  # as a writer maps it
print("mapped", flush=True)
time.sleep(600)
"""


def test_upgrade_refuses_a_directory_open_for_writing(tmp_path):
    path = tmp_path / "old"
    make_format1(path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path / "header.bin")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mapped"
        before = tree(path)
        with pytest.raises(BufferFormatError, match=re.escape(
                f"upgrade: {path} is open for writing by process {proc.pid}; close the buffer "
                f"(stop the run or service using it) and upgrade again")):
            upgrade_buffer(path)
        assert tree(path) == before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert upgrade_buffer(path).to_version == 2


@pytest.mark.parametrize("tag, shown", [(None, "None"), (4096, "4096"), (-1, "-1"), ("7", "'7'")])
def test_format2_meta_needs_a_valid_index_tag(tmp_path, tag, shown):
    path = tmp_path / "b"
    ReplayBuffer.create(path, capacity=4).close()
    meta = json.loads((path / "meta.json").read_text())
    if tag is None:
        del meta["index_tag"]
    else:
        meta["index_tag"] = tag
    (path / "meta.json").write_text(json.dumps(meta))
    message = re.escape(f"field 'index_tag'={shown} must be an integer in [0, 4096) (format 2 and later)")
    with pytest.raises(BufferFormatError, match=message):
        ReplayBuffer.open(path)
    assert not check_buffer(path).ok
