"""``ReplayShard``: one shard of a replay service, as a plain class.

Runs in the shard's Ray actor (``remote.shard_actor_class`` wraps it), or in-process in
tests, which drive it without Ray. A shard is one ``ReplayBuffer`` directory on its
node's local disk, one rate limiter, and the shard's metrics.

Ray restarts a dead shard by calling ``__init__`` again with the same arguments, so the
constructor opens the directory when it already holds a buffer and creates it only
when it does not: a restarted shard serves exactly its committed rows.

Everything that crosses Ray is numpy: ``extend`` takes ``{key_path: ndarray}`` (arrays
arrive read-only from the object store; the buffer copies them into its files) and
``sample`` returns the same shape of dict, plus each row's sampling mass when
prioritized (the client weighs the whole batch: ``row_reader.importance_weights``).
Indices here are the shard's own: tagged with its ``index_tag``, shard bits 0
(``indices``); the client sets and clears the shard bits.

With ``samples_per_insert`` set and several shards, the rate limiter is the buffer's:
shard 0 keeps it and the others forward to it (``shared_limiter``); the
``forwarded_*`` methods are that protocol.

Thread-safe: every public method may run concurrently with the others.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray

from rlfleet.buffer.metrics import ShardMetrics
from rlfleet.buffer.naming import DEFAULT_NAMESPACE, shard_actor_name
from rlfleet.buffer.rate_limiter import RateLimiter, RateLimiterSpec
from rlfleet.buffer.replay_buffer import ReplayBuffer
from rlfleet.buffer.shared_limiter import LimiterOwner, SharedLimiter, uses_shared_limiter

__all__ = ["ReplayShard"]

log = logging.getLogger(__name__)

Arrays = dict[tuple[str, ...], np.ndarray]


class _Rates:
    """Rows per second over the last ``window_s`` seconds, from a running total."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._lock = threading.Lock()
        self._mark_t = time.monotonic()
        self._mark = {"inserts": 0, "samples": 0}
        self._last = dict(self._mark)

    def rates(self, totals: Mapping[str, int]) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            dt = max(now - self._mark_t, 1e-9)
            out = {f"{k}_per_s": (totals[k] - self._mark[k]) / dt for k in self._mark}
            if dt >= self._window_s:
                # slide the window; keep the previous one's rate until the next has data
                self._mark_t, self._mark = now, {k: int(totals[k]) for k in self._mark}
            return out


class ReplayShard:
    """One shard of a replay service: a ``ReplayBuffer`` plus its rate limiter.

    Runs inside a Ray actor named ``rlfleet:<buffer>:shard-<k>`` in ``namespace`` (or
    in-process in tests). Thread-safe.

    Args:
        buffer: the service name.
        shard: this shard's number, ``0 <= shard < num_shards``.
        num_shards: how many shards the service has.
        path: this shard's directory (absolute: the actor's working directory is not
            the driver's).
        capacity: this shard's capacity, rows or a size string.
        sampler: the sampler name or mapping, as ``ReplayBuffer.create`` takes it.
        rate_limiter: the limiter settings (see ``RateLimiterSpec``).
        durability: ``"process"`` or ``"fsync"``.
        overcommit: allow a capacity beyond the free disk.
        seed: seed of the shard's sampler (None: from the OS).
        export_metrics: export ``rlfleet_buffer_*`` through ``ray.util.metrics``.
        namespace: the Ray namespace of the service's shard actors (where shard 0, the
            keeper of a buffer-wide limiter, is found).
        frame_stack: ``ReplayBuffer.create``'s ``frame_stack`` (each frame stored once).
    """

    def __init__(
        self,
        buffer: str,
        shard: int,
        num_shards: int,
        path: str,
        capacity: int | str,
        sampler: str | Mapping[str, Any] = "uniform",
        rate_limiter: Mapping[str, Any] | None = None,
        durability: str = "process",
        overcommit: bool = False,
        seed: int | None = None,
        export_metrics: bool = True,
        namespace: str = DEFAULT_NAMESPACE,
        frame_stack: str | Mapping[str, Any] | None = None,
    ) -> None:
        self.name = buffer
        self.namespace = namespace
        self.shard = shard
        self.num_shards = num_shards
        self.path = Path(path)
        self.limiter_spec = RateLimiterSpec.from_mapping(rate_limiter)
        if (self.path / "meta.json").exists():
            self.buffer = ReplayBuffer.open(self.path, seed=seed)
            if isinstance(capacity, int) and self.buffer.capacity != capacity:
                log.warning("%s: reopened %s with its stored capacity %d rows (asked for %d)",
                            shard_actor_name(buffer, shard), self.path, self.buffer.capacity, capacity)
            log.info("%s: reopened %s holding %d rows",
                     shard_actor_name(buffer, shard), self.path, len(self.buffer))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _clear_interrupted_create(self.path)
            self.buffer = ReplayBuffer.create(self.path, capacity=capacity, sampler=sampler, durability=durability,
                                              overcommit=overcommit, seed=seed, frame_stack=frame_stack)
        self.limiter: RateLimiter | SharedLimiter
        if uses_shared_limiter(self.limiter_spec, num_shards):
            owner = LimiterOwner(self.limiter_spec, num_shards, len(self.buffer)) if shard == 0 else None
            self.limiter = SharedLimiter(
                self.limiter_spec, shard, len(self.buffer), owner=owner,
                owner_handle=None if owner else functools.partial(_shard_handle, buffer, 0, namespace))
        else:
            self.limiter = RateLimiter(self.limiter_spec, size=len(self.buffer))
        self.metrics = ShardMetrics(buffer, shard) if export_metrics else None
        self._rates = _Rates()
        self._started = time.time()
        self._closed = threading.Event()
        if self.metrics is not None:
            # gauges follow the shard even when no call arrives to refresh them
            threading.Thread(target=self._refresh_loop, name="rlfleet-shard-metrics",
                             daemon=True).start()

    # -- serving -------------------------------------------------------------------------

    def ping(self) -> int:
        """Answer at once (liveness probe); returns this process's pid."""
        return os.getpid()

    def info(self) -> dict[str, Any]:
        """What a client needs once: placement, schema, sampler, limiter settings."""
        return {
            "buffer": self.name,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "path": str(self.path),
            "node_id": _node_id(),
            "pid": os.getpid(),
            "capacity": self.buffer.capacity,
            "sampler_type": self.buffer.sampler_type,
            "sampler": self.buffer.sampler,
            "schema": self.buffer.schema,
            "frame_stack": self.buffer.frame_stack,
            "rate_limiter": self.limiter_spec.to_mapping(),
            "buffer_wide_limiter": isinstance(self.limiter, SharedLimiter),
            # what a client checks a priority update against before sending it
            "index_tag": self.buffer.index_tag,
            "priority_limit": self.buffer.priority_limit,
        }

    def state(self) -> dict[str, Any]:
        """The small, fast-changing numbers a client splits a batch by, and checks a
        priority update against (``total_inserted``, ``index_tag``)."""
        return {
            "size": len(self.buffer),
            "mass": float(self.buffer.priority_mass),
            "total_inserted": int(self.buffer.total_inserted),
            "index_tag": self.buffer.index_tag,
        }

    def extend(self, arrays: Arrays, timeout_s: float | None = None) -> dict[str, Any]:
        """Insert a flat batch (waits for the rate limiter).

        Returns ``{"first", "last", "state"}``: the batch got the local indices
        ``first .. last - 1`` (one run), and the shard's state; ``{"index", "state"}`` where
        they are not one run (a frame-stack buffer's reset rows lie between them).
        Two ints instead of an index array: an array in a Ray reply costs about 0.2 ms
        per call, a seventh of a whole cartpole insert.

        Not idempotent: the client never retries it.

        Raises:
            SchemaMismatch: the batch differs from the shard's schema (nothing stored).
            InsertTimeout: the rate limiter held the call past ``timeout_s``.
        """
        m = _rows(arrays)
        try:
            wait_s = self.limiter.acquire_insert(m, timeout_s)
        except TimeoutError:
            if self.metrics is not None:
                self.metrics.timed_out("insert", timeout_s or self.limiter_spec.timeout_s)
            raise
        try:
            index = self.buffer.extend_arrays(arrays)
        except BaseException:
            self.limiter.cancel_insert(m)
            raise
        self.limiter.set_size(len(self.buffer))
        if self.metrics is not None:
            self.metrics.inserted(m, wait_s)
        first = int(index[0]) if len(index) else self.buffer.total_inserted
        if len(index) and int(index[-1]) - first + 1 != len(index):  # frame-stack reset rows
            return {"index": index, "state": self.state()}
        return {"first": first, "last": first + len(index), "state": self.state()}

    def sample(self, n: int, timeout_s: float | None = None) -> dict[str, Any]:
        """Sample ``n`` rows (waits for the rate limiter); ``n == 0`` returns only state.

        Returns:
            ``{"arrays": {key_path: ndarray [n, ...]} | None, "state": {...}}``; arrays
            include ``("index",)`` (local). When prioritized, ``"mass"`` is each row's
            sampling mass ``p**alpha`` (float64 ``[n]``), from which the client computes
            the batch's weights. With the buffer-wide limiter, a shard that holds no row
            once the limiter admits the call gives the admission back and answers
            ``{"arrays": None, "state": ..., "short": n}``: the client draws those rows
            from the other shards.

        Raises:
            SampleTimeout: the rate limiter held the call past ``timeout_s``.
        """
        start = time.perf_counter()
        if n <= 0:
            return {"arrays": None, "state": self.state()}
        try:
            wait_s = self.limiter.acquire_sample(n, timeout_s)
        except TimeoutError:
            if self.metrics is not None:
                self.metrics.timed_out("sample", timeout_s or self.limiter_spec.timeout_s)
            raise
        if isinstance(self.limiter, SharedLimiter) and len(self.buffer) == 0:
            # the buffer holds enough rows, but none of them here
            self.limiter.cancel_sample(n)
            return {"arrays": None, "state": self.state(), "short": n}
        try:
            arrays, mass = self.buffer.draw_arrays(n)
        except BaseException:
            self.limiter.cancel_sample(n)
            raise
        if self.metrics is not None:
            self.metrics.sampled(n, wait_s, time.perf_counter() - start)
        out = {"arrays": arrays, "state": self.state()}
        if mass is not None:
            out["mass"] = mass
        return out

    def update_priority(self, index: np.ndarray, priority: np.ndarray) -> dict[str, Any]:
        """Set priorities by this shard's indices (idempotent), all or nothing.

        Rows overwritten since they were sampled are skipped and counted.

        Returns:
            ``{"state": {...}, "skipped": rows skipped}``.

        Raises (with nothing stored):
            ValueError: a priority NaN, inf, negative or above ``info()["priority_limit"]``.
            StaleIndexError: an index of another buffer, of an earlier buffer at this
                path, or of a row never written.
        """
        index = np.asarray(index)
        skipped = int(self.buffer.update_priority(index, np.asarray(priority)))
        if self.metrics is not None:
            self.metrics.priorities_updated(index.size - skipped, skipped)
        return {"state": self.state(), "skipped": skipped}

    def stats(self) -> dict[str, Any]:
        """Buffer stats, limiter state, rates, placement: one shard's row of ``status``."""
        out: dict[str, Any] = dict(self.buffer.stats())
        limiter = self.limiter.state()
        out.update(self._rates.rates({"inserts": limiter["inserts"], "samples": limiter["samples"]}))
        out["rate_limiter"] = limiter
        if isinstance(self.limiter, SharedLimiter) and self.limiter.owner is not None:
            out["buffer_rate_limiter"] = self.limiter.buffer_state()
        out.update(shard=self.shard, index_tag=self.buffer.index_tag, node_id=_node_id(),
                   pid=os.getpid(), path=str(self.path),
                   uptime_s=time.time() - self._started, sampler_type=self.buffer.sampler_type)
        return out

    def flush(self) -> None:
        """Make every committed row durable on disk."""
        self.buffer.flush()

    def close(self) -> None:
        """Flush and close the buffer (before the actor is killed)."""
        self._closed.set()
        self.buffer.close()

    def destroy(self) -> None:
        """Close the buffer and delete this shard's directory (on this node's disk)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        try:  # the last shard of the service also removes the service directory
            self.path.parent.rmdir()
        except OSError:
            pass
        log.info("%s: deleted %s", shard_actor_name(self.name, self.shard), self.path)

    # -- the buffer-wide rate limiter, on shard 0 (see shared_limiter) -------------------

    def forwarded_acquire_insert(self, shard: int, m: int, timeout_s: float | None,
                                 size: int) -> float:
        """Shard ``shard`` (holding ``size`` rows) asks to insert ``m`` rows; blocks until
        admitted. Returns seconds waited.

        Raises:
            InsertTimeout: not admitted within ``timeout_s``; nothing counted.
        """
        return self._owner().acquire("insert", m, timeout_s, shard, size)

    def forwarded_acquire_sample(self, shard: int, n: int, timeout_s: float | None,
                                 size: int) -> float:
        """Shard ``shard`` (holding ``size`` rows) asks to sample ``n`` rows; blocks until
        admitted. Returns seconds waited.

        Raises:
            SampleTimeout: not admitted within ``timeout_s``; nothing counted.
        """
        return self._owner().acquire("sample", n, timeout_s, shard, size)

    def forwarded_cancel(self, side: str, count: int, shard: int) -> None:
        """Shard ``shard`` gives back an admission it did not use."""
        self._owner().cancel(side, count, shard)

    def forwarded_size(self, shard: int, size: int) -> None:
        """Shard ``shard`` holds ``size`` rows now (sent after each of its writes)."""
        self._owner().report_size(shard, size)

    # -- internals -----------------------------------------------------------------------

    def _owner(self) -> LimiterOwner:
        owner = getattr(self.limiter, "owner", None)
        if owner is None:
            raise RuntimeError(
                f"{shard_actor_name(self.name, self.shard)} does not keep the buffer-wide "
                f"rate limiter: only shard 0 of a service with samples_per_insert set and "
                f"more than one shard does"
            )
        return owner

    def _refresh_loop(self, period_s: float = 1.0) -> None:
        while not self._closed.is_set():
            try:
                stats = self.buffer.stats()
                self.metrics.refresh(int(stats["size"]), int(stats.get("bytes_on_disk", 0)))
            except Exception:  # closed under us: the loop ends with the shard
                if self._closed.is_set():
                    return
                log.debug("metrics refresh failed", exc_info=True)
            self._closed.wait(period_s)


def _clear_interrupted_create(path: Path) -> None:
    """Remove what a shard killed inside ``ReplayBuffer.create`` left behind.

    ``meta.json`` is written last, so a directory without it that holds nothing but the
    header was never a buffer; anything else in it is left alone (create then refuses it
    with a clear error).
    """
    if path.is_dir() and {p.name for p in path.iterdir()} == {"header.bin"}:
        (path / "header.bin").unlink()
        log.warning("%s: removed the header of an interrupted create", path)


def _shard_handle(buffer: str, shard: int, namespace: str) -> Any:
    """The Ray handle of another shard of this service (inside a shard actor)."""
    return ray.get_actor(shard_actor_name(buffer, shard), namespace=namespace)


def _rows(arrays: Arrays) -> int:
    if not isinstance(arrays, dict) or not arrays:
        raise ValueError(
            f"extend: expected a non-empty dict of numpy arrays keyed by key-path tuples, "
            f"got {type(arrays).__name__}"
        )
    return int(len(next(iter(arrays.values()))))


def _node_id() -> str | None:
    try:
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker there is simply no node
        pass
    return None
