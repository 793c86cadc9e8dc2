"""Crash consistency: writers killed with SIGKILL at random instants, then reopened.

A helper process (``crash_writer.py``) forks writers that extend the buffer (wrapping
the ring every few calls) and update priorities; the test kills each one with SIGKILL
after a random number of commits plus a random delay, so kills land inside ``extend``,
inside ``update_priority`` and between them. After every kill the buffer must reopen
with every visible row intact (each field equal to the function of its index that the
writer stored), with nothing lost that an ``extend`` had returned before the kill, and
(prioritized) with every live priority finite and positive. The next trial writes on
into the same directory, so reopening after a crash and writing on is covered as well.

With ``durability="fsync"`` the page cache of every buffer file is dropped before each
reopen (``posix_fadvise(DONTNEED)``, unprivileged; residency is measured with
``mincore``), so the rows are read back from the disk rather than from memory.

Each suite prints one figure line (shown with or without ``-s``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from crash_writer import expected_rows
from rlfleet.buffer import ReplayBuffer
from rlfleet.buffer.check import check_buffer

WRITER = Path(__file__).with_name("crash_writer.py")


@dataclass
class Figures:
    trials: int = 0
    kills_mid_extend: int = 0
    kills_mid_update: int = 0
    kills_after_commit: int = 0  # trials whose writer had committed at least once
    rows_checked: int = 0
    rows_lost: int = 0
    pages_dropped: int = 0  # pages of buffer files not resident after the drop
    pages_resident: int = 0


def _resident_pages(path: Path) -> tuple[int, int]:
    """(resident, total) pages of ``path`` in the page cache, via mincore(2)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if size == 0:
        return 0, 0
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        # a map of our own: mincore needs an address, and mapping faults in no page
        raw = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        try:
            if libc.mincore(ctypes.c_void_p(raw), ctypes.c_size_t(size), vec) != 0:
                return 0, pages
        finally:
            libc.munmap(ctypes.c_void_p(raw), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec), pages


def drop_page_cache(path: Path, figures: Figures) -> None:
    """Evict every file of the buffer from the page cache (clean pages; dirty pages of a
    killed writer's uncommitted rows stay until written back)."""
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        resident, total = _resident_pages(f)
        figures.pages_dropped += total - resident
        figures.pages_resident += resident


def read_priorities(path: Path, capacity: int, first: int, end: int) -> np.ndarray:
    prio = np.fromfile(path / "priorities.bin", dtype=np.float64)
    assert prio.shape == (capacity,)
    return prio[np.arange(first, end) % capacity]


def verify(path: Path, committed: int, capacity: int, figures: Figures) -> int:
    report = check_buffer(path)
    assert report.ok, str(report)
    with ReplayBuffer.open(path) as rb:
        assert rb.total_inserted >= committed, "an extend that had returned was lost"
        figures.rows_lost += max(0, committed - rb.total_inserted)
        assert len(rb) <= capacity
        if len(rb):
            got = rb[:]
            first = rb.total_inserted - len(rb)
            want = expected_rows(np.arange(first, rb.total_inserted))
            for key, arr in want.items():
                assert np.array_equal(got.get(key).numpy(), arr), f"torn row in key {key}"
            figures.rows_checked += len(rb)
            if rb.sampler_type == "prioritized":
                live = read_priorities(path, capacity, first, rb.total_inserted)
                bad = ~(np.isfinite(live) & (live > 0))
                assert not bad.any(), f"live priority {live[bad][0]!r} is not finite and positive"
                # the sum-tree rebuilt at open agrees with the stored priorities
                assert rb.priority_mass == pytest.approx(float(np.sum(live ** 0.6)), rel=1e-9)
            batch = rb.sample(64)
            assert np.array_equal(batch["x"].numpy(), batch["index"].numpy())
        return rb.total_inserted


def run_trials(path: Path, trials: int, *, sampler: str, durability: str, capacity: int,
               seed: int, drop_cache: bool = False) -> Figures:
    """Fork a writer per trial, kill it after a random number (0-3) of commits plus a
    random delay, verify the reopened buffer; return the suite's figures."""
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(path), str(capacity), sampler, durability],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
    )
    rng = random.Random(seed)
    figures = Figures()
    # a writer that stops answering (a deadlock) is killed, so readline ends, not hangs
    watchdog = threading.Timer(60.0 + 3.0 * trials, proc.kill)
    watchdog.start()

    def command(text: str) -> None:
        proc.stdin.write(text + "\n")
        proc.stdin.flush()

    def read_words() -> list[str]:
        line = proc.stdout.readline()
        assert line, "the writer process stopped answering (killed by the watchdog or failed)"
        return line.split()

    try:
        assert proc.stdout.readline().strip() == "ready"
        committed = 0
        for trial in range(trials):
            committed_before = committed
            command(f"run {seed * 100_000 + trial}")
            wait_commits, seen_commits, started = rng.randint(0, 3), 0, False
            last = "child"
            while not started or seen_commits < wait_commits:
                words = read_words()
                last = words[0]
                if words[0] == "child":
                    started = True
                elif words[0] == "committed":
                    committed = max(committed, int(words[1]))
                    seen_commits += 1
                elif words[0] not in ("begin", "prio", "prioed"):
                    raise AssertionError(f"unexpected line from the writer: {words!r}")
            time.sleep(rng.uniform(0.0, 0.05))
            command("kill")
            while True:
                words = read_words()
                if words[0] == "reaped":
                    assert int(words[2]) == signal.SIGKILL, "the writer failed before it was killed"
                    break
                assert words[0] in ("begin", "committed", "prio", "prioed"), \
                    f"unexpected line from the writer: {words!r}"
                last = words[0]
                if words[0] == "committed":
                    committed = max(committed, int(words[1]))
            figures.trials += 1
            figures.kills_mid_extend += last == "begin"
            figures.kills_mid_update += last == "prio"
            figures.kills_after_commit += committed > committed_before
            if drop_cache:
                drop_page_cache(path, figures)
            total = verify(path, committed, capacity, figures)
            assert total >= committed
        command("quit")
        assert proc.wait(timeout=60) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return figures


def report(capsys, name: str, f: Figures, drop_cache: bool) -> None:
    line = (
        f"crash suite [{name}]: trials={f.trials} kills mid-write={f.kills_mid_extend} "
        f"kills mid-update_priority={f.kills_mid_update} rows checked={f.rows_checked} "
        f"rows lost={f.rows_lost}"
    )
    if drop_cache:
        line += (f" page cache dropped before each reopen (posix_fadvise DONTNEED on every "
                 f"file): {f.pages_dropped} pages out of memory, {f.pages_resident} still "
                 f"resident (dirty pages are kept)")
    with capsys.disabled():
        print("\n" + line)


def check_figures(f: Figures, trials: int) -> None:
    assert f.trials == trials and f.rows_lost == 0
    assert f.kills_after_commit >= trials // 2  # about 3 in 4 trials wait for a commit
    assert f.kills_mid_extend >= 1  # the kill does land inside extend
    assert f.rows_checked > 0


def drop_cache_supported() -> bool:
    return hasattr(os, "posix_fadvise") and sys.platform.startswith("linux")


@pytest.mark.parametrize(
    "sampler, durability, trials",
    [("prioritized", "process", 24), ("uniform", "fsync", 12)],
)
def test_sigkill_while_writing_keeps_committed_rows_intact(tmp_path, capsys, sampler, durability, trials):
    drop = durability == "fsync" and drop_cache_supported()
    if durability == "fsync" and not drop:
        with capsys.disabled():
            print("\ncrash suite: page cache not dropped: posix_fadvise is Linux-only")
    f = run_trials(tmp_path / "b", trials, sampler=sampler, durability=durability,
                   capacity=1000, seed=1, drop_cache=drop)
    report(capsys, f"{sampler}, {durability}", f, drop)
    check_figures(f, trials)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampler, durability, trials",
    [("prioritized", "process", 300), ("sequence", "process", 100), ("uniform", "fsync", 100),
     ("prioritized", "fsync", 60)],
)
def test_sigkill_many_trials(tmp_path, capsys, sampler, durability, trials):
    drop = durability == "fsync" and drop_cache_supported()
    f = run_trials(tmp_path / "b", trials, sampler=sampler, durability=durability,
                   capacity=1000, seed=2, drop_cache=drop)
    report(capsys, f"{sampler}, {durability}", f, drop)
    check_figures(f, trials)
    # Only the prioritized sampler writes in update_priority (the others check the
    # arguments and return), and with fsync the msync of extend takes nearly all the time:
    # elsewhere a kill inside update_priority is luck (0 of 100 sequence trials once).
    if sampler == "prioritized" and durability == "process":
        assert f.kills_mid_update >= 1
