"""The buffer-wide rate limiter of a sharded service: shard 0 keeps it, the others forward.

Runs inside shard actors. Used only when ``samples_per_insert`` is set and the service
has more than one shard (``rate_limiter.py`` states the contract); otherwise each shard
keeps its own ``RateLimiter`` and nothing here runs.

Why one limiter and not one per shard: writers prefer their own node's shard, so a shard
may hold rows and receive no inserts. With a limiter per shard that shard would owe no
samples, and every sample the client's size-weighted split sends it would block until
``SampleTimeout``. Counting every insert and sample of the buffer in one place makes
``samples_per_insert`` hold for the buffer as a whole, which is what a learner asks for.

How (``LimiterOwner`` on shard 0, ``SharedLimiter`` on every shard):

- an acquire on shard 0 runs on its ``LimiterOwner`` directly; on shard k > 0 it is one
  call to shard 0 (``forwarded_acquire_insert`` / ``_sample``) that blocks there until
  admitted. Each forwarded call carries the caller's size, and each write reports the
  new size without waiting for an answer, so the owner's ``size`` (which
  ``min_size_to_sample`` reads) is the sum of what the shards last reported;
- a cancel is sent without waiting for an answer;
- no deadlock through threads: the service puts inserts and samples in separate
  concurrency groups on every shard, and size reports and cancels in a third that never
  blocks (``remote.py``), so a side that waits can take every thread of its own group
  but never one the other side needs to release it;
- a forwarded acquire that the caller stops waiting for (shard 0 unreachable past the
  timeout plus a grace) is cancelled on the owner if it is admitted later, so no row is
  counted that was never written or served.

Restarts: shard 0 rebuilds the counts centred (as a reopened shard's limiter does) and
learns the other shards' rows from their next forwarded call or size report, crediting
rows it had not counted as pre-existing (``RateLimiter.add_existing``). A restarted
shard k only loses its own counts for ``stats``.

Thread-safe: every method may run concurrently with the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rlfleet.buffer.errors import InsertTimeout, SampleTimeout, ShardUnavailable
from rlfleet.buffer.rate_limiter import RateLimiter, RateLimiterSpec

__all__ = ["LimiterOwner", "SharedLimiter", "uses_shared_limiter"]

log = logging.getLogger(__name__)

# seconds a forwarding shard waits for shard 0 beyond the limiter's own timeout: covers a
# forwarded call queued behind others, and shard 0 restarting
_FORWARD_GRACE_S = 30.0

_SIDES = ("insert", "sample")


def uses_shared_limiter(spec: RateLimiterSpec, num_shards: int) -> bool:
    """Whether a service with these settings keeps one buffer-wide limiter on shard 0."""
    return spec.samples_per_insert is not None and num_shards > 1


class LimiterOwner:
    """Shard 0's buffer-wide limiter: one ``RateLimiter`` over the sum of the shards' sizes.

    Args:
        spec: the settings.
        num_shards: shards in the service.
        own_size: rows shard 0 holds when it starts.
    """

    def __init__(self, spec: RateLimiterSpec, num_shards: int, own_size: int) -> None:
        self.limiter = RateLimiter(spec, size=own_size, scope="buffer")
        self._lock = threading.Lock()
        self._sizes = [0] * num_shards
        self._sizes[0] = int(own_size)
        # per shard: inserts admitted since this owner started, and the rows found on it
        # that those do not explain (stored before the start)
        self._admitted = [0] * num_shards
        self._existing = [0] * num_shards
        self._existing[0] = int(own_size)

    def acquire(self, side: str, count: int, timeout_s: float | None, shard: int, size: int) -> float:
        """Wait until ``count`` rows of ``side`` may go ahead for ``shard`` (which holds
        ``size`` rows now); count them; return seconds waited.

        Raises:
            InsertTimeout, SampleTimeout: the wait passed ``timeout_s``; nothing counted.
        """
        self.report_size(shard, size)
        if side == "insert":
            wait_s = self.limiter.acquire_insert(count, timeout_s)
            with self._lock:
                self._admitted[shard] += count
            return wait_s
        return self.limiter.acquire_sample(count, timeout_s)

    def cancel(self, side: str, count: int, shard: int) -> None:
        """Undo an acquire of ``count`` rows whose write or sample did not happen."""
        if side == "insert":
            with self._lock:
                self._admitted[shard] -= count
            self.limiter.cancel_insert(count)
        else:
            self.limiter.cancel_sample(count)

    def report_size(self, shard: int, size: int) -> None:
        """Record that ``shard`` holds ``size`` rows (sizes only grow: a late report of an
        older size changes nothing)."""
        with self._lock:
            if not 0 <= shard < len(self._sizes):
                raise ValueError(
                    f"rate limiter: shard={shard} reported its size, but the service has "
                    f"shards 0..{len(self._sizes) - 1}; the shard belongs to another service"
                )
            self._sizes[shard] = max(self._sizes[shard], int(size))
            # rows beyond what this owner admitted were stored before it started
            unexplained = self._sizes[shard] - self._admitted[shard] - self._existing[shard]
            if unexplained > 0:
                self._existing[shard] += unexplained
            total = sum(self._sizes)
        if unexplained > 0:
            self.limiter.add_existing(unexplained)
        self.limiter.set_size(total)


class SharedLimiter:
    """One shard's handle on the buffer-wide limiter, with the shard's own counts.

    Offers the ``RateLimiter`` methods a shard calls (``acquire_*``, ``cancel_*``,
    ``set_size``, ``state``), so the shard drives either the same way.

    Args:
        spec: the settings.
        shard: this shard's number.
        size: rows this shard holds when it starts.
        owner: the ``LimiterOwner`` when this is shard 0, else None.
        owner_handle: for shard k > 0, returns the Ray handle of shard 0 (called lazily).
    """

    def __init__(self, spec: RateLimiterSpec, shard: int, size: int, *,
                 owner: LimiterOwner | None, owner_handle: Callable[[], Any] | None) -> None:
        if (owner is None) == (owner_handle is None):
            raise ValueError("SharedLimiter: give owner (shard 0) or owner_handle (other shards)")
        self.spec = spec
        self.shard = shard
        self.owner = owner
        self._owner_handle = owner_handle
        self._handle: Any = None
        self._lock = threading.Lock()
        self._size = int(size)
        self._counts = {f"{what}_{side}": 0 for side in _SIDES
                        for what in ("total", "waits", "timeouts", "waiting")}
        self._wait_s = dict.fromkeys(_SIDES, 0.0)

    # -- RateLimiter's methods -----------------------------------------------------------

    def acquire_insert(self, m: int, timeout_s: float | None = None) -> float:
        """Wait until the buffer-wide limiter admits ``m`` rows; returns seconds waited."""
        return self._acquire("insert", int(m), timeout_s)

    def cancel_insert(self, m: int) -> None:
        """Undo ``acquire_insert(m)`` after a failed write."""
        self._cancel("insert", int(m))

    def acquire_sample(self, n: int, timeout_s: float | None = None) -> float:
        """Wait until the buffer-wide limiter admits ``n`` rows; returns seconds waited."""
        return self._acquire("sample", int(n), timeout_s)

    def cancel_sample(self, n: int) -> None:
        """Undo ``acquire_sample(n)`` after a failed sample."""
        self._cancel("sample", int(n))

    def set_size(self, size: int) -> None:
        """Record this shard's size after a write and report it to the owner (shard 0
        directly; other shards without waiting for an answer)."""
        with self._lock:
            self._size = int(size)
        if self.owner is not None:
            self.owner.report_size(self.shard, size)
        else:
            self._owner().forwarded_size.remote(self.shard, int(size))

    def state(self) -> dict[str, Any]:
        """This shard's own counts, in ``RateLimiter.state``'s keys. ``ratio_offset`` is
        None: the ratio is the buffer's (``buffer_state`` on shard 0)."""
        with self._lock:
            c = dict(self._counts)
            wait_s = dict(self._wait_s)
            size = self._size
        return {
            "size": size,
            "min_size_to_sample": self.spec.min_size_to_sample,
            "samples_per_insert": self.spec.samples_per_insert,
            "error_margin": self.spec.error_margin,
            "inserts": c["total_insert"],
            "samples": c["total_sample"],
            "ratio_offset": None,
            "insert_waits": c["waits_insert"],
            "sample_waits": c["waits_sample"],
            "insert_wait_s": wait_s["insert"],
            "sample_wait_s": wait_s["sample"],
            "insert_timeouts": c["timeouts_insert"],
            "sample_timeouts": c["timeouts_sample"],
            # calls of this shard waiting on the buffer-wide limiter now (forwarded ones
            # from when they are sent)
            "inserts_waiting": c["waiting_insert"],
            "samples_waiting": c["waiting_sample"],
            "buffer_wide": True,
        }

    def buffer_state(self) -> dict[str, Any] | None:
        """The buffer-wide limiter's state (shard 0), else None."""
        return None if self.owner is None else self.owner.limiter.state()

    # -- internals -----------------------------------------------------------------------

    def _owner(self) -> Any:
        if self._handle is None:
            self._handle = self._owner_handle()  # type: ignore[misc]  # set for shard k > 0
        return self._handle

    def _acquire(self, side: str, count: int, timeout_s: float | None) -> float:
        if count <= 0:
            return 0.0
        with self._lock:
            self._counts[f"waiting_{side}"] += 1
            size = self._size
        try:
            if self.owner is not None:
                wait_s = self.owner.acquire(side, count, timeout_s, self.shard, size)
            else:
                wait_s = self._forward(side, count, timeout_s, size)
        except TimeoutError:
            with self._lock:
                self._counts[f"timeouts_{side}"] += 1
                self._counts[f"waits_{side}"] += 1
            raise
        finally:
            with self._lock:
                self._counts[f"waiting_{side}"] -= 1
        with self._lock:
            self._counts[f"total_{side}"] += count
            if wait_s > 0:
                self._counts[f"waits_{side}"] += 1
                self._wait_s[side] += wait_s
        return wait_s

    def _cancel(self, side: str, count: int) -> None:
        if count <= 0:
            return
        with self._lock:
            self._counts[f"total_{side}"] -= count
        if self.owner is not None:
            self.owner.cancel(side, count, self.shard)
        else:
            self._owner().forwarded_cancel.remote(side, count, self.shard)

    def _forward(self, side: str, count: int, timeout_s: float | None, size: int) -> float:
        """One blocking call to shard 0's limiter; errors in rlfleet's words."""
        handle = self._owner()
        method = handle.forwarded_acquire_insert if side == "insert" else handle.forwarded_acquire_sample
        ref = method.remote(self.shard, count, timeout_s, size)
        wait = self.spec.timeout_s if timeout_s is None else float(timeout_s)
        start = time.monotonic()
        try:
            return float(ray.get(ref, timeout=wait + _FORWARD_GRACE_S))
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, BaseException) else e) from e
        except GetTimeoutError:
            def give_back(admitted: Any) -> None:
                if admitted.exception() is None:  # nobody will use the rows now
                    handle.forwarded_cancel.remote(side, count, self.shard)

            ref.future().add_done_callback(give_back)
            error = InsertTimeout if side == "insert" else SampleTimeout
            raise error(
                f"{side} of {count} rows on shard {self.shard}: the buffer-wide rate limiter "
                f"on shard 0 did not answer within {time.monotonic() - start:.0f}s "
                f"(timeout_s={wait:g} plus {_FORWARD_GRACE_S:g}s grace); shard 0 may be "
                f"restarting or overloaded, retry later"
            ) from None
        except RayActorError as e:
            raise ShardUnavailable(
                f"{side} of {count} rows on shard {self.shard}: shard 0, which keeps the "
                f"buffer-wide rate limiter, is gone ({type(e).__name__}); nothing was "
                f"stored or sampled. Relaunch the service"
            ) from e
