"""Reverb-style rate limiter: the rules, and one limiter's counts.

Runs inside a shard actor (or anywhere a ``ReplayBuffer`` is shared by threads). It
counts rows, not calls: ``inserts`` rows written and ``samples`` rows handed out since
the limiter started. Two rules, as in Reverb's ``SampleToInsertRatio``:

- sampling waits until the buffer holds ``min_size_to_sample`` rows (at least one);
- with ``samples_per_insert`` set, the deficit ``d = samples_per_insert * inserts -
  samples`` is kept near its centre ``c = samples_per_insert * min_size_to_sample``,
  within ``error_margin`` rows either side.

Batches make the second rule subtle: an insert of 1024 rows moves ``d`` by
``1024 * samples_per_insert`` at once, and a margin smaller than a batch would deadlock
a rule that demands the result stay inside the band. So an operation is admitted when
its result stays inside the band **or** when it moves ``d`` back towards the centre
from the far side (a sample when ``d >= c``, an insert when ``d < c``). Exactly one side
is always admitted, so a writer and a sampler never wait for each other forever, and
``|d - c|`` never exceeds ``max(error_margin, largest batch)``: with a margin at least
as large as the batches, the ratio holds within the margin.

Which rows one limiter counts (the contract of a sharded service):

- ``samples_per_insert`` set and more than one shard: **one limiter for the whole
  buffer**. Shard 0 keeps it; every other shard forwards each acquire and cancel, and
  its size after each write, to shard 0 (``shared_limiter.py``). So over the buffer,
  ``samples_per_insert * inserted - sampled`` stays within ``error_margin`` (or the
  largest batch) of its centre, whichever shards the writers and samplers use: a shard
  that holds rows but gets no inserts still serves its share of samples, paid for by the
  inserts into the others. ``min_size_to_sample`` counts the buffer's total rows.
- otherwise (one shard, or no ratio): each shard has its own limiter and
  ``min_size_to_sample`` counts that shard's rows. Nothing crosses shards, so the common
  path costs no extra call.

Loop that drives it (the shard actor)::

    limiter.acquire_insert(m, timeout_s)      # blocks; counts the m rows
    try:
        buffer.extend_arrays(arrays)
    except BaseException:
        limiter.cancel_insert(m)              # nothing was stored
        raise
    limiter.set_size(len(buffer))             # wakes samplers

    limiter.acquire_sample(n, timeout_s)      # blocks; counts the n rows
    batch = buffer.sample_arrays(n)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlfleet.buffer.errors import InsertTimeout, SampleTimeout

__all__ = ["RateLimiter", "RateLimiterSpec"]


@dataclass(frozen=True)
class RateLimiterSpec:
    """The limiter's settings, as ``ReplayService.launch(rate_limiter=...)`` takes them.

    Attributes:
        min_size_to_sample: rows held before any sample is served (0 acts as 1: an
            empty buffer has nothing to sample): the buffer's total when the limiter is
            buffer-wide (``samples_per_insert`` set, several shards), else each shard's own.
        samples_per_insert: target ratio of sampled rows to inserted rows, over the whole
            buffer; None turns the ratio rule off (inserts never wait).
        error_margin: tolerance around the ratio, in sampled rows.
        timeout_s: default longest wait of one call before it raises.
    """

    min_size_to_sample: int = 0
    samples_per_insert: float | None = None
    error_margin: float = 0.0
    timeout_s: float = 60.0

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "RateLimiterSpec":
        """Build from a plain mapping, refusing unknown keys and bad values."""
        if mapping is None:
            return cls()
        if not isinstance(mapping, Mapping):
            raise ValueError(
                f"rate_limiter={mapping!r}: expected a mapping such as "
                f"{{'min_size_to_sample': 1000, 'samples_per_insert': 4.0, 'error_margin': 512}}"
            )
        known = {"min_size_to_sample", "samples_per_insert", "error_margin", "timeout_s"}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(
                f"rate_limiter: unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        spec = cls(**dict(mapping))
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if isinstance(self.min_size_to_sample, bool) or not isinstance(self.min_size_to_sample, int) \
                or self.min_size_to_sample < 0:
            raise ValueError(
                f"rate_limiter.min_size_to_sample={self.min_size_to_sample!r}: must be an int >= 0"
            )
        spi = self.samples_per_insert
        if spi is not None and (not isinstance(spi, (int, float)) or isinstance(spi, bool)
                                or not math.isfinite(spi) or spi <= 0):
            raise ValueError(
                f"rate_limiter.samples_per_insert={spi!r}: must be a finite number > 0, "
                f"or None to turn the ratio off"
            )
        margin = self.error_margin
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) \
                or not math.isfinite(margin) or margin < 0:
            raise ValueError(f"rate_limiter.error_margin={margin!r}: must be a finite number >= 0")
        t = self.timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
            raise ValueError(f"rate_limiter.timeout_s={t!r}: must be a number of seconds > 0")

    def to_mapping(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-able)."""
        return {
            "min_size_to_sample": self.min_size_to_sample,
            "samples_per_insert": self.samples_per_insert,
            "error_margin": self.error_margin,
            "timeout_s": self.timeout_s,
        }


class RateLimiter:
    """Blocks inserts or samples of one shard, or of a whole buffer, to hold Reverb's rules.

    Thread-safe: any number of threads may call ``acquire_*`` concurrently; waits use
    one ``threading.Condition``.

    Args:
        spec: the settings.
        size: rows already held (a reopened shard). The limiter starts as if they had
            just been inserted, with the ratio at its centre, so a restart neither blocks
            the sampler nor grants it a burst (``add_existing`` does the same for rows
            learnt of later).
        scope: what the limiter counts, for messages: ``"shard"`` or ``"buffer"``.
    """

    def __init__(self, spec: RateLimiterSpec, *, size: int = 0, scope: str = "shard") -> None:
        spec.validate()
        self.spec = spec
        self.scope = scope
        self._cond = threading.Condition()
        self._size = int(size)
        self._existing = 0
        self._inserts = 0.0
        self._samples = 0.0
        self._add_existing(int(size))
        self._insert_waits = 0
        self._sample_waits = 0
        self._insert_wait_s = 0.0
        self._sample_wait_s = 0.0
        self._insert_timeouts = 0
        self._sample_timeouts = 0
        self._total_inserts = 0
        self._total_samples = 0
        self._waiting = {"insert": 0, "sample": 0}

    # -- the two rules -------------------------------------------------------------------

    @property
    def _min_size(self) -> int:
        return max(1, self.spec.min_size_to_sample)

    def _centre(self) -> float:
        return (self.spec.samples_per_insert or 0.0) * self.spec.min_size_to_sample

    def _deficit(self) -> float:
        return (self.spec.samples_per_insert or 0.0) * self._inserts - self._samples

    def _can_sample(self, n: int) -> bool:
        if self._size < self._min_size:
            return False
        if self.spec.samples_per_insert is None:
            return True
        d, c = self._deficit(), self._centre()
        return d - n >= c - self.spec.error_margin or d >= c

    def _can_insert(self, m: int) -> bool:
        spi = self.spec.samples_per_insert
        if spi is None:
            return True
        d, c = self._deficit(), self._centre()
        return d + spi * m <= c + self.spec.error_margin or d < c

    # -- public --------------------------------------------------------------------------

    def acquire_insert(self, m: int, timeout_s: float | None = None) -> float:
        """Wait until ``m`` rows may be inserted, then count them. Returns seconds waited.

        Raises:
            InsertTimeout: the wait passed ``timeout_s`` (default ``spec.timeout_s``);
                nothing is counted.
        """
        return self._acquire("insert", int(m), timeout_s)

    def cancel_insert(self, m: int) -> None:
        """Undo ``acquire_insert(m)`` after a failed write (nothing was stored)."""
        with self._cond:
            self._inserts -= m
            self._total_inserts -= m
            self._cond.notify_all()

    def acquire_sample(self, n: int, timeout_s: float | None = None) -> float:
        """Wait until ``n`` rows may be sampled, then count them. Returns seconds waited.

        Raises:
            SampleTimeout: the wait passed ``timeout_s`` (default ``spec.timeout_s``);
                nothing is counted.
        """
        return self._acquire("sample", int(n), timeout_s)

    def cancel_sample(self, n: int) -> None:
        """Undo ``acquire_sample(n)`` after a failed sample."""
        with self._cond:
            self._samples -= n
            self._total_samples -= n
            self._cond.notify_all()

    def set_size(self, size: int) -> None:
        """Record the committed row count (after a write) and wake waiters."""
        with self._cond:
            self._size = int(size)
            self._cond.notify_all()

    def add_existing(self, rows: int) -> None:
        """Count ``rows`` that were stored before this limiter started and that it learns
        of only now (a shard's rows reported to a restarted buffer-wide limiter): credited
        as the constructor credits ``size``, so the ratio sits where it would had they been
        known at the start. Does not change ``size``; ``set_size`` does."""
        with self._cond:
            self._add_existing(int(rows))
            self._cond.notify_all()

    def _add_existing(self, rows: int) -> None:
        # As if ``rows`` had been inserted and the samples they owe beyond the minimum
        # size taken: d moves towards the centre, never past it.
        if rows <= 0:
            return
        spi = self.spec.samples_per_insert or 0.0
        over = max(0, self._existing + rows - self.spec.min_size_to_sample) \
            - max(0, self._existing - self.spec.min_size_to_sample)
        self._existing += rows
        self._inserts += rows
        self._samples += spi * over

    def state(self) -> dict[str, float | int | None]:
        """A snapshot of counters and settings (JSON-able)."""
        with self._cond:
            spi = self.spec.samples_per_insert
            return {
                "size": self._size,
                "min_size_to_sample": self.spec.min_size_to_sample,
                "samples_per_insert": spi,
                "error_margin": self.spec.error_margin,
                "inserts": self._total_inserts,
                "samples": self._total_samples,
                # how far sampling is ahead (<0) or behind (>0) the ratio, in rows
                "ratio_offset": None if spi is None else self._deficit() - self._centre(),
                "insert_waits": self._insert_waits,
                "sample_waits": self._sample_waits,
                "insert_wait_s": self._insert_wait_s,
                "sample_wait_s": self._sample_wait_s,
                "insert_timeouts": self._insert_timeouts,
                "sample_timeouts": self._sample_timeouts,
                # calls blocked right now
                "inserts_waiting": self._waiting["insert"],
                "samples_waiting": self._waiting["sample"],
            }

    def describe(self) -> str:
        """One line naming the state, for error messages."""
        s = self.state()
        text = (
            f"size={s['size']}, min_size_to_sample={s['min_size_to_sample']}, "
            f"inserted={s['inserts']}, sampled={s['samples']}"
        )
        if s["samples_per_insert"] is not None:
            text += (
                f", samples_per_insert={s['samples_per_insert']}, "
                f"error_margin={s['error_margin']}, ratio_offset={s['ratio_offset']:+.1f} rows"
            )
        return text

    # -- internals -----------------------------------------------------------------------

    def _acquire(self, side: str, count: int, timeout_s: float | None) -> float:
        if count < 0:
            raise ValueError(f"{side}: row count {count} must be >= 0")
        timeout = self.spec.timeout_s if timeout_s is None else float(timeout_s)
        check = self._can_insert if side == "insert" else self._can_sample
        start = time.monotonic()
        with self._cond:
            waited = False
            if count > 0 and not check(count):
                waited = True
                deadline = start + timeout
                self._waiting[side] += 1
                try:
                    while not check(count):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self._record_wait(side, time.monotonic() - start, timed_out=True)
                            raise self._timeout_error(side, count, timeout)
                        self._cond.wait(left)
                finally:
                    self._waiting[side] -= 1
            if side == "insert":
                self._inserts += count
                self._total_inserts += count
            else:
                self._samples += count
                self._total_samples += count
            elapsed = time.monotonic() - start if waited else 0.0
            if waited:
                self._record_wait(side, elapsed, timed_out=False)
            # a sample moves the deficit down, which may now admit a blocked writer
            self._cond.notify_all()
            return elapsed

    def _record_wait(self, side: str, seconds: float, *, timed_out: bool) -> None:
        if side == "insert":
            self._insert_waits += 1
            self._insert_wait_s += seconds
            self._insert_timeouts += int(timed_out)
        else:
            self._sample_waits += 1
            self._sample_wait_s += seconds
            self._sample_timeouts += int(timed_out)

    def _timeout_error(self, side: str, count: int, timeout: float) -> TimeoutError:
        # called with the lock held: build the text without re-entering state()
        spi = self.spec.samples_per_insert
        label = "rate limiter" if self.scope == "shard" else "buffer-wide rate limiter (on shard 0)"
        state = (
            f"size={self._size}, min_size_to_sample={self.spec.min_size_to_sample}, "
            f"inserted={self._total_inserts}, sampled={self._total_samples}"
        )
        if spi is not None:
            state += (
                f", samples_per_insert={spi}, error_margin={self.spec.error_margin}, "
                f"ratio_offset={self._deficit() - self._centre():+.1f} rows"
            )
        if side == "insert":
            return InsertTimeout(
                f"insert of {count} rows waited {timeout:g}s (timeout_s) for the {label}: "
                f"{state}. Samplers are behind the samples_per_insert ratio; sample more, "
                f"raise error_margin or timeout_s, or set samples_per_insert=None"
            )
        if self._size < self._min_size:
            fix = (f"the {self.scope} holds {self._size} of the {self._min_size} rows needed; "
                   f"insert more rows, lower min_size_to_sample, or raise timeout_s")
        else:
            fix = ("sampling is ahead of the samples_per_insert ratio; insert more rows, "
                   "raise error_margin or timeout_s")
        return SampleTimeout(
            f"sample of {count} rows waited {timeout:g}s (timeout_s) for the {label}: "
            f"{state}. {fix}"
        )
