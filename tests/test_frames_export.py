"""Frame-stack buffers out as offline datasets (``rlfleet export-dataset``) and checked
(``rlfleet check``), on real buffers filled by real stacked pixel envs (``test_frames.Envs``).

What an export must hold is worked out from what the buffer's own reader returns
(``rb[:]``: the rows whose stacks rebuild) with ``test_datasets``'s plain-Python
``reference``, and every row is also checked against what the env emitted
(``Envs.check``). The reset and unreadable rows are counted from the stored columns.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from test_datasets import assert_same_rows, imported, reference, rows_of
from test_frames import FRAME, STACK, Envs
from rlfleet.buffer import ReplayBuffer
from rlfleet.buffer.check import check_buffer
from rlfleet.buffer.frames import NEXT_KEY, PREV_KEY
from rlfleet.buffer.scan import BufferFiles
from rlfleet.launch.cli import main
from rlfleet.launch.dataset_export import export_dataset

minari = pytest.importorskip("minari")
datasets = pytest.importorskip("datasets")


def fill(path, *, padding: str = "reset", capacity: int = 60, batches: int = 12, reopen_after: int | None = None,
         count: int = 3) -> Envs:
    """A frame-stack buffer at ``path``: ``batches`` env-major batches of 5 steps of
    ``count`` envs (the ring of 60 wraps); reopened after batch ``reopen_after``."""
    envs = Envs(count=count, padding=padding)
    rb = ReplayBuffer.create(path, capacity=capacity, frame_stack={"key": "observation", "padding": padding})
    for b in range(batches):
        rb.extend(envs.batch(5))
        if b == reopen_after:
            rb.close()
            rb = ReplayBuffer.open(path)
    rb.close()
    return envs


def keys_of(rows: TensorDict) -> set[tuple[str, ...]]:
    return {k if isinstance(k, tuple) else (k,) for k in rows.keys(True, True)}


def stored_counts(path) -> tuple[int, int]:
    """(reset rows, unreadable rows) of the window, from the stored columns and ``rb[:]``."""
    with ReplayBuffer.open(path) as rb:
        start, end = rb.total_inserted - len(rb), rb.total_inserted
        readable = len(rb[:])
    data = TensorDict.load_memmap(path / "data")
    slots = torch.arange(start, end) % data.batch_size[0]
    resets = int((data["step"][slots] == -1).sum())
    return resets, (end - start) - resets - readable


@pytest.mark.parametrize("chunk_rows", [1, 2, 7, 1000])
@pytest.mark.parametrize("padding", ["reset", "zero"])
def test_a_scan_rebuilds_exactly_the_rows_the_buffer_reads(tmp_path, padding, chunk_rows):
    envs = fill(tmp_path / "b", padding=padding, reopen_after=5)
    resets, unreadable = stored_counts(tmp_path / "b")
    assert resets > 0 and unreadable > 0  # the ring cut chains, the reopen left UNKNOWN links
    want = rows_of(tmp_path / "b")
    with BufferFiles.open(tmp_path / "b") as files:
        assert set(files.schema) == keys_of(want)
        assert files.schema[("observation",)] == ((STACK, *FRAME), np.dtype(np.uint8))
        chunks = list(files.chunks(chunk_rows=chunk_rows))
        only = list(files.chunks(chunk_rows=chunk_rows, keys=[("step",), ("next", "observation")]))
    assert sum(c.resets for c in chunks) == resets
    assert sum(c.unreadable for c in chunks) == unreadable
    assert sum(c.covered for c in chunks) == 60 and sum(len(c) for c in chunks) == len(want)
    for key in files.schema:
        got = np.concatenate([c.arrays[key] for c in chunks])
        assert np.array_equal(got, want[key].numpy()), key
    assert all(list(c.arrays) == [("step",), ("next", "observation")] for c in only)
    assert np.array_equal(np.concatenate([c.arrays[("next", "observation")] for c in only]),
                          want["next", "observation"].numpy())
    envs.check(want)


@pytest.mark.parametrize("fmt", ["minari", "hf"])
@pytest.mark.parametrize("padding", ["reset", "zero"])
def test_whole_episodes_go_out_with_their_stacks_and_come_back_row_for_row(tmp_path, fmt, padding):
    envs = fill(tmp_path / "b", padding=padding)
    want, cut, unfinished = reference(rows_of(tmp_path / "b"))
    resets, unreadable = stored_counts(tmp_path / "b")
    assert len(want) > 10 and cut > 0 and unreadable > 0
    out = tmp_path / "minari" / "frames-v0" if fmt == "minari" else tmp_path / "hf"
    result = export_dataset(tmp_path / "b", fmt, out)
    assert (result.rows_exported, result.episodes) == (len(want), len(set(want["episode_id"].tolist())))
    assert (result.cut, result.unfinished, result.inconsistent, result.missing) == (cut, unfinished, 0, 0)
    assert (result.rows_read, result.unreadable, result.evicted) == (60 - resets - unreadable, unreadable, 0)
    if fmt == "hf":
        hf = datasets.load_from_disk(str(out))
        assert sorted(hf.column_names) == sorted(".".join(k) for k in keys_of(want))
        assert hf.features["observation"].length == STACK and hf.features["next.observation"].length == STACK
    else:
        ds = minari.MinariDataset(str(out / "data"))
        assert ds.observation_space.shape == (STACK, *FRAME) and ds.total_steps == len(want)
    back = imported(out, tmp_path / "back")
    assert_same_rows(back, want)
    envs.check(back)


def test_all_rows_exports_every_readable_row_in_order_and_counts_the_others(tmp_path, capsys):
    envs = fill(tmp_path / "b", capacity=500, batches=8, reopen_after=3)  # no wrap: only the reopen cuts
    resets, unreadable = stored_counts(tmp_path / "b")
    want = rows_of(tmp_path / "b")
    assert unreadable > 0  # the rows of the 3 episodes that went on across the reopen
    result = export_dataset(tmp_path / "b", "hf", tmp_path / "hf", all_rows=True, chunk_rows=4)
    assert (result.rows_exported, result.unreadable, result.cut) == (len(want), unreadable, None)
    with ReplayBuffer.from_dataset(tmp_path / "hf", tmp_path / "back") as back:
        got = back[:]
    assert_same_rows(got.exclude("index"), want.exclude("index"))  # in the buffer's order
    envs.check(got)
    # whole episodes: those that went on across the reopen lost rows, and are cut
    whole, cut, unfinished = reference(want)
    assert main(["export-dataset", str(tmp_path / "b"), "--format", "hf", str(tmp_path / "hf2"), "--plain"]) == 0
    printed = capsys.readouterr().out
    assert f"exported {len(set(whole['episode_id'].tolist()))} episodes ({len(whole)} rows)" in printed
    assert f"skipped episodes: {cut} cut by the ring (first rows overwritten), {unfinished} unfinished" in printed
    assert f"left out {unreadable} rows whose frame stacks reach frames no longer stored\n" in printed
    assert_same_rows(imported(tmp_path / "hf2", tmp_path / "back2"), whole)


def test_a_sharded_buffer_rebuilds_each_shard_from_its_own_rows(tmp_path):
    # batches alternate shards: an episode's rows in the other shard link UNKNOWN there
    envs = Envs(count=2)
    shards = [ReplayBuffer.create(tmp_path / "b" / f"shard-{k}", capacity=80, frame_stack="observation")
              for k in range(2)]
    for b in range(14):
        shards[b % 2].extend(envs.batch(3))
    for rb in shards:
        rb.close()
    counts = [stored_counts(tmp_path / "b" / f"shard-{k}") for k in range(2)]
    everything = rows_of(tmp_path / "b")
    want, cut, unfinished = reference(everything)
    result = export_dataset(tmp_path / "b", "hf", tmp_path / "hf")
    assert (result.rows_exported, result.cut, result.unfinished) == (len(want), cut, unfinished)
    assert result.unreadable == sum(u for _, u in counts) > 0
    back = imported(tmp_path / "hf", tmp_path / "back")
    assert_same_rows(back, want)
    envs.check(back)
    result = export_dataset(tmp_path / "b", "hf", tmp_path / "all", all_rows=True)
    assert result.rows_exported == len(everything)


def test_export_through_a_running_service_matches_the_export_from_disk(ray_cluster, tmp_path):
    from rlfleet.buffer import ReplayService

    name = f"frames-export-{os.getpid()}"
    service = ReplayService.launch(name, tmp_path / "svc", capacity=120, num_shards=2, frame_stack="observation",
                                   detached=False, seed=0)
    try:
        sources = [Envs(count=2, seed=1000 * k, first_episode=1000 * k, collector=k) for k in range(2)]
        for _ in range(8):  # each client writes its batches to one shard; both rings wrap
            for k, envs in enumerate(sources):
                service.client(seed=k).extend(envs.batch(5))
        want, cut, unfinished = reference(rows_of(tmp_path / "svc"))
        result = export_dataset(tmp_path / "svc", "hf", tmp_path / "hf", use_service=True, task_per="shard")
        assert result.where.startswith(f"replay service {name!r}: 2 Ray task(s), one per shard")
        assert (result.rows_exported, result.cut, result.unfinished, result.missing) == (len(want), cut, unfinished, 0)
        assert result.unreadable == sum(stored_counts(tmp_path / "svc" / f"shard-{k}")[1] for k in range(2)) > 0
        back = imported(tmp_path / "hf", tmp_path / "back")
        assert_same_rows(back, want)
        merged = Envs(count=1)
        merged.truth = {**sources[0].truth, **sources[1].truth}
        merged.check(back)
        from_disk = export_dataset(tmp_path / "svc", "hf", tmp_path / "disk", use_service=False)
        assert (from_disk.rows_exported, from_disk.unreadable) == (result.rows_exported, result.unreadable)
        assert_same_rows(imported(tmp_path / "disk", tmp_path / "back-disk"), want)
    finally:
        ReplayService.shutdown(name, delete=True)


def test_check_passes_a_healthy_frame_stack_buffer_and_names_a_broken_link(tmp_path, capsys):
    fill(tmp_path / "b", padding="zero")
    resets, _ = stored_counts(tmp_path / "b")
    report = check_buffer(tmp_path / "b")
    assert report.ok, str(report)
    assert (report.reset_rows, report.rows_checked, report.frame_stack) == (
        resets, 60, {"key": ["observation"], "padding": "zero", "size": STACK})
    assert (f"  frame stack: 'observation' and its next twin are stacks of {STACK} frames (padding zero) "
            f"rebuilt on read from 'frame_stack.frame'; {resets} of the rows are reset rows (one per episode "
            f"start)") in str(report).splitlines()
    assert json.loads(json.dumps(report.to_dict()))["reset_rows"] == resets
    assert main(["check", str(tmp_path / "b")]) == 0
    capsys.readouterr()

    with ReplayBuffer.open(tmp_path / "b") as rb:
        start, end = rb.total_inserted - len(rb), rb.total_inserted
    data = TensorDict.load_memmap(tmp_path / "b" / "data")
    steps = data["step"][torch.arange(start, end) % 60]
    reset = start + int(torch.nonzero(steps == -1)[0])
    row = start + int(torch.nonzero(steps > 0)[0])
    prev, forward = data[PREV_KEY], data[NEXT_KEY]
    before = int(prev[row % 60])
    assert int(forward[before % 60]) == row  # the row before it links forward to it
    prev[row % 60] = row + 3  # a link to a newer row: no writer stores that
    data["step"][reset % 60] = 0  # a reset row that says step 0
    report = check_buffer(tmp_path / "b")
    assert sorted(report.problems) == sorted([
        f"row {row} has frame_stack.prev {row + 3}: not the counter of an older row, -1 (a reset row) or -2 (unknown)",
        f"row {reset} has frame_stack.prev -1 and step 0: reset rows (prev -1), and only they, have step -1",
        f"row {before} has frame_stack.next {row}: not -1 or a younger row whose frame_stack.prev is {before}",
    ])
    assert main(["check", str(tmp_path / "b")]) == 1

    # forward links alone: one to a row that links back elsewhere, one to an older row
    prev[row % 60] = before
    data["step"][reset % 60] = -1
    assert check_buffer(tmp_path / "b").ok
    linked = int(forward[row % 60])
    forward[row % 60] = row + 2  # row + 2 links back to row + 1 or is a reset row
    assert check_buffer(tmp_path / "b").problems == [
        f"row {row} has frame_stack.next {row + 2}: not -1 or a younger row whose frame_stack.prev is {row}"]
    forward[row % 60] = linked
    forward[reset % 60] = reset - 1
    assert check_buffer(tmp_path / "b").problems == [
        f"row {reset} has frame_stack.next {reset - 1}: not -1 or a younger row whose frame_stack.prev is {reset}"]
