"""Crash consistency of frame-stack buffers: writers killed with SIGKILL mid-extend, then reopened.

A helper process (``frames_crash_writer.py``) forks writers that extend a frame-stack
buffer (stacks of 4, ``padding="reset"``, episodes of 1 to 9 steps, the ring wrapping
every few calls, one batch in six larger than the ring); the test kills each after a
random number of commits plus a random delay, so kills land inside ``extend`` (between
the compaction, the row copies and the header stores) and between calls. After every
kill the buffer must check OK (``frame_stack.prev`` links included), reopen with nothing
lost that an ``extend`` had returned, and every row it reads back or samples must equal,
stack for stack, the rows the writer was given (each a function of its ``(episode,
step)``: ``rows_for``). The next trial's writer reopens and writes on; at the end the
test process writes new episodes and reads every one of them back.
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from crash_writer import WriterProcess
from frames_crash_writer import TAG, Episodes, rows_for
from rlfleet.buffer import ReplayBuffer
from rlfleet.buffer.check import check_buffer
from rlfleet.collector.testing import decode_pixels

WRITER = Path(__file__).with_name("frames_crash_writer.py")
CAPACITY = 300


@dataclass
class Figures:
    trials: int = 0
    kills_mid_extend: int = 0
    kills_after_commit: int = 0
    oversized_commits: int = 0
    rows_read: int = 0  # rows rb[:] returned, all checked
    rows_sampled: int = 0


def assert_rows_are_true(rows: dict, where: str) -> None:
    """Every row, stacks included, equals what the writer was given for its (episode, step)."""
    episode, step = rows["episode_id"].numpy(), rows["step"].numpy()
    assert (step >= 0).all(), f"{where}: a reset row came back"
    want = rows_for(episode, step)
    for key, value in want.items():
        got = rows.get(key).numpy()
        assert got.shape == value.shape and np.array_equal(got, value), f"{where}: torn or wrong key {key}"
    newest = decode_pixels(rows["next", "observation"][:, -1].numpy(), grey=True)
    assert np.array_equal(newest, np.stack([np.full_like(step, TAG), episode % 65536, step + 1], axis=1)), where


def verify(path: Path, committed: int, trial: int, figures: Figures) -> None:
    report = check_buffer(path)
    assert report.ok, str(report)
    with ReplayBuffer.open(path, seed=trial) as rb:
        assert rb.total_inserted >= committed, "an extend that had returned was lost"
        assert len(rb) <= CAPACITY
        rows = rb[:]
        if rb.schema is None:  # killed before its first extend committed: nothing stored
            assert committed == 0 and rb.total_inserted == 0 and len(rows) == 0
            return
        assert_rows_are_true(rows, f"trial {trial}, rb[:]")
        pairs = rows["episode_id"].numpy() * 100 + rows["step"].numpy()
        assert len(np.unique(pairs)) == len(pairs), f"trial {trial}: a row read twice"
        figures.rows_read += len(rows)
        if len(rows):
            batch = rb.sample(64)
            assert_rows_are_true(batch, f"trial {trial}, sample")
            figures.rows_sampled += len(batch)


def run_trials(path: Path, trials: int, *, durability: str, seed: int) -> Figures:
    """Fork a writer per trial, kill it after 0-3 commits plus a random delay, verify."""
    rng = random.Random(seed)
    figures = Figures()
    with WriterProcess(WRITER, path, CAPACITY, durability, timeout=60.0 + 3.0 * trials) as writer:
        command, read_words = writer.command, writer.read_words
        committed = 0
        for trial in range(trials):
            before = committed
            command(f"run {seed * 1000 + trial + 1}")
            wait_commits, seen, started, last, big = rng.randint(0, 3), 0, False, "child", False
            while True:
                if started and seen >= wait_commits:
                    time.sleep(rng.uniform(0.0, 0.02))
                    command("kill")
                    break
                words = read_words()
                last = words[0]
                started |= words[0] == "child"
                if words[0] == "committed":
                    committed, seen = max(committed, int(words[1])), seen + 1
                    figures.oversized_commits += big
                elif words[0] == "begin":
                    big = int(words[1]) > CAPACITY
            while (words := read_words())[0] != "reaped":
                assert words[0] in ("begin", "committed"), f"unexpected line from the writer: {words!r}"
                last = words[0]
                if words[0] == "committed":
                    committed = max(committed, int(words[1]))
                    figures.oversized_commits += big
                else:
                    big = int(words[1]) > CAPACITY
            assert int(words[2]) == signal.SIGKILL, "the writer failed before it was killed"
            figures.trials += 1
            figures.kills_mid_extend += last == "begin"
            figures.kills_after_commit += committed > before
            verify(path, committed, trial, figures)
        writer.quit()
    return figures


def write_on(path: Path) -> None:
    """After the last kill: new episodes go in, and every one of their rows reads back."""
    with ReplayBuffer.open(path, seed=0) as rb:
        episode, step = Episodes(10**9).take(30)  # 90 rows and their reset rows: under the ring
        before = rb.total_inserted
        rb.extend_arrays(rows_for(episode, step))
        assert rb.total_inserted == before + len(step) + int((step == 0).sum())
        rows = rb[:]
        assert_rows_are_true(rows, "after the trials")
        read = set((rows["episode_id"].numpy() * 100 + rows["step"].numpy()).tolist())
        assert set((episode * 100 + step).tolist()) <= read
        assert_rows_are_true(rb.sample(256), "sample after the trials")
    assert check_buffer(path).ok


def report(capsys, name: str, f: Figures) -> None:
    with capsys.disabled():
        print(f"\nframe-stack crash suite [{name}]: trials={f.trials} kills mid-extend={f.kills_mid_extend} "
              f"oversized batches committed={f.oversized_commits} rows read back={f.rows_read} "
              f"rows sampled={f.rows_sampled}")


def check_figures(f: Figures, trials: int) -> None:
    assert f.trials == trials
    assert f.kills_after_commit >= trials // 2  # about 3 in 4 trials wait for a commit
    assert f.kills_mid_extend >= 1
    assert f.rows_read > 0 and f.rows_sampled > 0


def test_sigkill_mid_extend_of_a_frame_stack_buffer_leaves_exact_stacks(tmp_path, capsys):
    f = run_trials(tmp_path / "b", 20, durability="process", seed=1)
    report(capsys, "process", f)
    check_figures(f, 20)
    write_on(tmp_path / "b")


@pytest.mark.slow
@pytest.mark.parametrize("durability, trials", [("process", 100), ("fsync", 30)])
def test_sigkill_many_trials_of_a_frame_stack_buffer(tmp_path, capsys, durability, trials):
    f = run_trials(tmp_path / "b", trials, durability=durability, seed=2)
    report(capsys, durability, f)
    check_figures(f, trials)
    assert f.oversized_commits >= 1
    write_on(tmp_path / "b")
