"""Helper process for the crash test: forks writers that the test kills with SIGKILL.

Usage: ``python crash_writer.py PATH CAPACITY SAMPLER DURABILITY``. It imports rlfleet
once, creates the buffer if absent, then serves lines on stdin:

- ``run SEED``: fork a child that reopens the buffer and, forever, extends it with rows
  whose every field is a function of the row's index (see ``expected_rows``), then sets
  random priorities of some live rows. Around each call it prints ``begin END N`` /
  ``committed N`` (``extend``) and ``prio`` / ``prioed`` (``update_priority``), so the
  last line before a kill says which call the kill interrupted. The parent prints
  ``child PID``. Batch sizes reach 0.7 of the capacity, so the ring wraps every few
  calls, and one batch in five holds more rows than the capacity (1.1 to 2.5 times),
  the case whose commit stores ``start`` past ``end`` for an instant. The priority
  updates name live rows and rows already overwritten (skipped by the buffer).
- ``kill``: SIGKILL the child, reap it and print ``reaped PID SIGNAL`` (SIGNAL is 0 when
  the child had exited by itself, i.e. failed). Killing before reaping means the pid
  cannot have been reused by another process.
- ``quit``: exit.

Every line is written with one ``os.write`` so lines of the two processes never mix.

Forking from an already-imported single-threaded process makes each trial cost
milliseconds instead of a fresh interpreter with torch. The child touches numpy only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OBS_SHAPE = (16, 64)  # 1 KiB per row: a batch copy takes long enough to be interrupted


def expected_rows(index: np.ndarray) -> dict[tuple[str, ...], np.ndarray]:
    """Every field of row ``i`` is determined by ``i``, so a torn row is detectable."""
    index = np.asarray(index, dtype=np.int64)
    pattern = np.arange(int(np.prod(OBS_SHAPE)), dtype=np.int64).reshape(OBS_SHAPE)
    obs = ((index[:, None, None] * 7 + pattern) % 251).astype(np.uint8)
    return {
        ("x",): index.copy(),
        ("observation",): obs,
        ("next", "observation"): obs[:, ::-1].copy(),
        ("reward",): (index * 0.5).astype(np.float32),
        ("episode_id",): index // 10,
        ("step",): index % 10,
    }


def priorities_for(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite, positive priorities spanning small to huge (1e-3 .. 1e12)."""
    return 10.0 ** rng.uniform(-3.0, 12.0, size=n)


def _child(path: str, seed: int) -> None:
    from rlfleet.buffer.replay_buffer import ReplayBuffer

    from rlfleet.buffer.indices import with_tag

    rng = np.random.default_rng(seed)
    rb = ReplayBuffer.open(path, seed=seed)
    capacity = rb.capacity
    while True:
        if rng.random() < 0.2:  # more rows than the capacity: only the newest land
            n = int(rng.integers(int(capacity * 1.1), int(capacity * 2.5)))
        else:
            n = int(rng.integers(1, max(2, int(capacity * 0.7))))
        first = rb.total_inserted
        os.write(1, f"begin {first + n} {n}\n".encode())
        rb.extend_arrays(expected_rows(np.arange(first, first + n)))
        os.write(1, f"committed {rb.total_inserted}\n".encode())
        # every sampler takes the call (the others validate and ignore it)
        start = rb.total_inserted - len(rb)
        live = np.arange(start, rb.total_inserted)
        pick = rng.choice(live, size=min(256, len(live)), replace=False)
        gone = np.arange(max(0, start - 16), start)  # overwritten rows: skipped
        prio = priorities_for(rng, len(pick) + len(gone))
        os.write(1, b"prio\n")
        skipped = rb.update_priority(with_tag(np.concatenate([pick, gone]), rb.index_tag), prio)
        assert skipped == len(gone), (skipped, len(gone))
        os.write(1, b"prioed\n")


class WriterProcess:
    """The test's end of a writer process (``python SCRIPT ARGS``: this file or
    ``frames_crash_writer.py``): its commands and lines. A watchdog kills it, with its
    forked child (which holds the pipe open too), after ``timeout`` seconds, so a writer
    that stops answering (a deadlock) ends ``read_words`` instead of hanging it. Use as a
    context manager: leaving it kills what still runs."""

    def __init__(self, script: Path, *args: Any, timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True,  # its own process group: the watchdog kills its child too
        )
        self.watchdog = threading.Timer(timeout, self.kill_all)
        self.watchdog.start()

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def command(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def read_words(self) -> list[str]:
        line = self.proc.stdout.readline()
        assert line, "the writer process stopped answering (killed by the watchdog or failed)"
        return line.split()

    def quit(self) -> None:
        self.command("quit")
        assert self.proc.wait(timeout=60) == 0

    def __enter__(self) -> WriterProcess:
        assert self.read_words() == ["ready"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.watchdog.cancel()
        if self.proc.poll() is None:
            self.kill_all()
            self.proc.wait()


def serve(child: Callable[[int], None]) -> int:
    """Answer ``run SEED`` / ``kill`` / ``quit`` on stdin (module docstring): ``run``
    forks a process that calls ``child(SEED)`` (and exits 1 should it return)."""
    os.write(1, b"ready\n")
    pid = 0
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "run":
            pid = os.fork()
            if pid == 0:
                try:
                    child(int(words[1]))
                finally:
                    os._exit(1)
            os.write(1, f"child {pid}\n".encode())
        elif words[0] == "kill":
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
            os.write(1, f"reaped {pid} {signum}\n".encode())
    return 0


def main() -> int:
    path, capacity, sampler, durability = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from rlfleet.buffer.replay_buffer import ReplayBuffer

    if not os.path.exists(os.path.join(path, "meta.json")):
        ReplayBuffer.create(path, capacity=capacity, sampler=sampler, durability=durability).close()
    return serve(lambda seed: _child(path, seed))


if __name__ == "__main__":
    sys.exit(main())
