"""Crash consistency: writers killed with SIGKILL at random instants, then reopened.

After every kill the buffer must reopen with every visible row intact (each field equal
to the function of its index that the writer stored) and with nothing lost that an
``extend`` had returned before the kill. The next trial continues writing into the same
directory, so reopening after a crash and writing on is covered as well.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crash_writer import expected_rows
from rlfleet.buffer import ReplayBuffer
from rlfleet.buffer.check import check_buffer

WRITER = Path(__file__).with_name("crash_writer.py")


def verify(path: Path, committed: int, capacity: int) -> int:
    report = check_buffer(path)
    assert report.ok, str(report)
    with ReplayBuffer.open(path) as rb:
        assert rb.total_inserted >= committed, "an extend that had returned was lost"
        assert len(rb) == min(capacity, rb.total_inserted) or len(rb) < capacity
        if len(rb):
            got = rb[:]
            first = rb.total_inserted - len(rb)
            want = expected_rows(np.arange(first, rb.total_inserted))
            for key, arr in want.items():
                assert np.array_equal(got.get(key).numpy(), arr), f"torn row in key {key}"
            if rb.sampler_type == "prioritized":
                assert np.isfinite(rb.priority_mass) and rb.priority_mass > 0
            batch = rb.sample(64)
            assert np.array_equal(batch["x"].numpy(), batch["index"].numpy())
        return rb.total_inserted


def run_trials(path: Path, trials: int, *, sampler: str, durability: str, capacity: int, seed: int) -> int:
    """Fork a writer per trial, kill it after a random number (0-3) of commits plus a
    random delay, verify the reopened buffer; return how many kills came after writes."""
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(path), str(capacity), sampler, durability],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
    )
    rng = random.Random(seed)
    kills_mid_stream = 0

    def command(text: str) -> None:
        proc.stdin.write(text + "\n")
        proc.stdin.flush()

    try:
        assert proc.stdout.readline().strip() == "ready"
        committed = 0
        for trial in range(trials):
            committed_before = committed
            command(f"run {seed * 100_000 + trial}")
            wait_commits, seen_commits, started = rng.randint(0, 3), 0, False
            while not started or seen_commits < wait_commits:
                line = proc.stdout.readline()
                words = line.split()
                if words[0] == "child":
                    started = True
                elif words[0] == "committed":
                    committed = max(committed, int(words[1]))
                    seen_commits += 1
                else:
                    raise AssertionError(f"unexpected line from the writer: {line!r}")
            time.sleep(rng.uniform(0.0, 0.05))
            command("kill")
            while True:
                line = proc.stdout.readline()
                words = line.split()
                if words[0] == "reaped":
                    assert int(words[2]) == signal.SIGKILL, "the writer failed before it was killed"
                    break
                assert words[0] == "committed", f"unexpected line from the writer: {line!r}"
                committed = max(committed, int(words[1]))
            kills_mid_stream += committed > committed_before  # killed after writing began
            total = verify(path, committed, capacity)
            assert total >= committed
        command("quit")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return kills_mid_stream


@pytest.mark.parametrize(
    "sampler, durability, trials",
    [("prioritized", "process", 14), ("uniform", "fsync", 4)],
)
def test_sigkill_while_writing_keeps_committed_rows_intact(tmp_path, sampler, durability, trials):
    kills = run_trials(tmp_path / "b", trials, sampler=sampler, durability=durability, capacity=1000, seed=1)
    assert kills >= trials // 2  # about 3 in 4 trials wait for at least one commit


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampler, durability, trials",
    [("prioritized", "process", 300), ("sequence", "process", 100), ("uniform", "fsync", 100)],
)
def test_sigkill_many_trials(tmp_path, sampler, durability, trials):
    kills = run_trials(tmp_path / "b", trials, sampler=sampler, durability=durability, capacity=1000, seed=2)
    assert kills >= trials // 2  # about 3 in 4 trials wait for at least one commit
