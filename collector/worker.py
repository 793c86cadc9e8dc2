"""``CollectorWorker``: one collector's loop, with its pause, stop, budget and sender thread.

Runs inside a collector actor (``remote.CollectorActor`` is its thin Ray shell) and, in
tests, on a plain thread with a plain ``FleetRegistry`` and a local ``ReplayBuffer`` as
its sink. It talks to the fleet only through the three calls of ``Registry`` and to the
buffer only through ``sink.extend``; it imports no Ray.

The loop runs on its own thread, so control calls (pause, status, attach a weight
receiver) are served while it collects::

    while not stopping:
        if paused or budget spent: report once, wait
        if budget and no grant left: ask the registry for ~GRANT_S of batches
        apply the newest weights from the receiver (asked at most every WEIGHTS_POLL_S)
        collect a batch; hand it to the sender thread (it sends while the next is collected)
        report counters to the registry (at most every report_interval_s)

Frame budget: with one, the worker collects only batches the registry granted. It asks
for a grant when it has used the last one, for about ``GRANT_S`` of batches at its
current rate; an answer of 0 means the fleet's ``max_frames`` is covered, and the worker
halts (state ``done``). So the budget holds whatever the driver is doing, and costs a
registry call per ``GRANT_S`` instead of one per batch.

Restarts: the worker registers as it is built. The registration gives its incarnation
(part of every episode id), the frames its index already collected (so the random phase
and the epsilon schedule continue), the weight receiver to build and the fleet's state:
if the fleet is running (or paused) the loop starts by itself.

Thread-safety: every public method is thread-safe. The loop thread drives the
``Collector``; the sender thread only calls its ``send``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

import torch
from tensordict import TensorDict

from rlfleet.buffer import InsertTimeout, ShardUnavailable
from rlfleet.collector.collector import Collector, Sink
from rlfleet.collector.config import CollectorConfig, EnvConfig, PolicyConfig
from rlfleet.collector.weights import WeightReceiver

__all__ = ["CollectorWorker", "GRANT_S", "Registry", "WEIGHTS_POLL_S", "WorkerMetrics"]

log = logging.getLogger(__name__)

# The worker's states, in reports and status(): "idle" (built, loop not started),
# "starting", "running", "paused", "done" (the fleet's max_frames is reached),
# "stopped", "failed".
# A worker collects a 1024-frame CartPole batch in about 25 ms. Asking the registry for
# new weights after every batch was a blocking Ray round trip per batch; at most this
# often instead.
WEIGHTS_POLL_S = 0.1
# With a frame budget, a worker asks for about this many seconds of batches at a time.
GRANT_S = 0.25


class Registry(Protocol):
    """The fleet registry's calls a worker makes (``FleetRegistry``, or a Ray adaptor of it)."""

    def register(self, index: int) -> dict[str, Any]: ...

    def report(self, index: int, stats: dict[str, Any]) -> None: ...

    def grant(self, index: int, batches: int, batch_frames: int) -> int: ...


class WorkerMetrics(Protocol):
    """Where a worker's per-batch counters go (``metrics.CollectorMetrics``)."""

    def update(self, collector: Collector, fps: float, send_s: float) -> None: ...

    def flush(self, collector: Collector, fps: float) -> None: ...


ReceiverFactory = Callable[[str, dict[str, Any]], WeightReceiver]


class CollectorWorker:
    """One collector and its loop thread; see the module docstring.

    Args:
        fleet: The fleet's name (log messages).
        index: This collector's index in the fleet.
        seed: The run's seed (the collector derives its own from it).
        env, collector, policy: What the ``Collector`` runs.
        sink: Where batches go (a ``BufferClient``, a ``ReplayBuffer``).
        registry: The fleet's registry; ``register`` is called here.
        build_receiver: ``(kind, kwargs) -> WeightReceiver``, called on a background
            thread by ``attach_receiver``; None: the worker takes no weights.
        metrics: Gets every batch's counters; None: none exported.
        num_threads: ``torch.set_num_threads`` on the loop thread (the thread count is
            OpenMP state of each thread); None: left alone.

    Raises:
        ValueError: The collector cannot be built (bad env, space, device).
    """

    def __init__(self, *, fleet: str, index: int, seed: int, env: EnvConfig, collector: CollectorConfig,
                 policy: PolicyConfig, sink: Sink, registry: Registry,
                 build_receiver: ReceiverFactory | None = None, metrics: WorkerMetrics | None = None,
                 num_threads: int | None = None) -> None:
        self.fleet, self.index = fleet, index
        self._registry = registry
        self._build_receiver = build_receiver
        self._metrics = metrics
        self._num_threads = num_threads
        reg = registry.register(index)
        self.incarnation = int(reg["incarnation"])
        self.collector = Collector(
            env, policy, sink, collector_id=index, incarnation=self.incarnation, seed=seed,
            frames_per_batch=collector.frames_per_batch, device=collector.device,
            init_random_frames=collector.init_random_frames, exploration=collector.exploration,
            start_frames=int(reg["start_frames"]),
        )
        self._cv = threading.Condition()
        self._paused = reg["state"] == "paused"
        # Frame budget: batches granted and not collected yet, and whether the registry
        # said no more will be granted.
        self._budget = bool(reg["budget"])
        self._budget_spent = bool(reg["budget_spent"])
        self._granted_batches = 0
        self._batch_fps = 0.0
        self.batch_frames = self.collector.steps_per_batch * self.collector.num_envs
        self._report_interval_s = float(collector.report_interval_s)
        self._reported_at = float("-inf")
        self._stopping = False
        self._busy = False
        self._state = "idle"
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._receiver: WeightReceiver | None = None
        self._retired: list[WeightReceiver] = []
        self._last_send_s = 0.0
        self._polled_at = float("-inf")  # time.monotonic() of the last weights poll
        self._receiver_error: str | None = None
        self._snapshot = self._stats(0.0)
        if reg["receiver"] is not None:
            self.attach_receiver(*reg["receiver"])
        if reg["state"] in ("running", "paused"):
            self.start()
        log.info("collector %d of fleet %r up (incarnation %d)", index, fleet, self.incarnation)

    # -- control -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (no-op if it runs)."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._state = "starting"
            self._thread = threading.Thread(target=self._loop, name=f"collector-{self.index}", daemon=True)
            self._thread.start()

    def pause(self, timeout_s: float = 60.0) -> bool:
        """Stop after the current batch; True once no batch is in flight (sent included)."""
        with self._cv:
            self._paused = True
            self._cv.notify_all()
            return self._cv.wait_for(lambda: not self._busy, timeout=timeout_s)

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def stop(self, timeout_s: float = 60.0) -> bool:
        """End the loop after the current batch and close the envs; True if it ended in time."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        ended = thread is None or not thread.is_alive()
        if ended:
            self.collector.close()
            with self._cv:
                receivers, self._retired = [*self._retired, self._receiver], []
            for receiver in receivers:
                if receiver is not None:
                    receiver.close()
            with self._cv:
                self._state = "stopped" if self._state != "failed" else "failed"
        return ended

    def attach_receiver(self, kind: str, kwargs: dict[str, Any]) -> None:
        """Build a weight receiver in the background; the loop uses it once it is built.

        Building may block (a broadcast receiver joins a process group), so it never
        runs on the caller's thread. A failure shows in ``status()["receiver_error"]``.

        Raises:
            RuntimeError: The worker was built without ``build_receiver``.
        """
        build = self._build_receiver
        if build is None:
            raise RuntimeError(
                f"collector {self.index}: attach_receiver({kind!r}) needs a worker built with build_receiver"
            )

        def run() -> None:
            try:
                receiver = build(kind, kwargs)
            except Exception as e:  # noqa: BLE001 - reported through status()
                log.exception("collector %d: building the %r weight receiver failed", self.index, kind)
                with self._cv:
                    self._receiver_error = f"{type(e).__name__}: {e}"
                return
            with self._cv:
                if self._receiver is not None:
                    # The loop may be polling it right now: it closes it between batches.
                    self._retired.append(self._receiver)
                self._receiver, self._receiver_error = receiver, None

        threading.Thread(target=run, name=f"receiver-{self.index}", daemon=True).start()

    def status(self) -> dict[str, Any]:
        """``index``, ``incarnation``, ``state``, ``error`` (the loop's traceback, if it
        failed), ``receiver_error`` and ``stats`` (the counters of the last report)."""
        with self._cv:
            return {"index": self.index, "incarnation": self.incarnation, "state": self._state,
                    "error": self._error, "receiver_error": self._receiver_error,
                    "stats": dict(self._snapshot)}

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the loop thread to end (after ``stop`` or a failure); True if it did."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    # -- the loop (its own thread) -----------------------------------------------------

    def _halted(self) -> bool:
        return self._paused or self._stopping or self._budget_spent

    def _loop(self) -> None:
        if self._num_threads is not None:
            # Set on this thread: set only where the actor was built, this thread's first
            # forward pass started a second OpenMP thread that spun between steps.
            torch.set_num_threads(self._num_threads)
        # One sender thread: batch b travels to the buffer while batch b+1 is collected.
        sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sender-{self.index}")
        in_flight: concurrent.futures.Future | None = None
        try:
            while True:
                with self._cv:
                    halt = self._halted()
                if not halt and self._budget and self._granted_batches == 0:
                    self._ask_grant()  # a halted worker asks for nothing it may not use
                with self._cv:
                    halt = self._halted()
                    if not halt:
                        self._busy = True
                    receiver = self._receiver
                    retired, self._retired = self._retired, []
                for old in retired:
                    old.close()
                if halt:
                    # "No batch in flight" includes the one being sent.
                    if in_flight is not None:
                        self._last_send_s = in_flight.result()
                        in_flight = None
                    if self._wait_halted():
                        break
                    continue
                with self._cv:
                    self._state = "running"
                t0 = time.perf_counter()
                td = self._collect(receiver)
                if self._budget:
                    self._granted_batches -= 1
                if in_flight is not None:
                    self._last_send_s = in_flight.result()
                in_flight = sender.submit(self._send, td)
                self._batch_fps = len(td) / max(time.perf_counter() - t0, 1e-9)
                self._report(self._batch_fps, batch=True)
        except Exception as e:  # noqa: BLE001 - the fleet's health check raises it
            log.exception("collector %d: loop failed", self.index)
            with self._cv:
                self._state = "failed"
                self._error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                self._busy = False
                self._cv.notify_all()
            self._report(0.0)
            return
        finally:
            sender.shutdown(wait=True)
        with self._cv:
            self._state = "stopped"
        self._report(0.0)

    def _wait_halted(self) -> bool:
        """Report the halt once and wait a while for a change; True if stopping."""
        with self._cv:
            self._busy = False
            self._cv.notify_all()
            if self._stopping:
                return True
            halted = "done" if self._budget_spent and not self._paused else "paused"
            was, self._state = self._state, halted
        if was != halted:
            if halted == "done":
                log.info("collector %d: the fleet's max_frames is reached; collecting no more", self.index)
            self._report(0.0)
        with self._cv:
            self._cv.wait_for(lambda: self._stopping or not (self._paused or self._budget_spent), timeout=1.0)
        return False

    def _collect(self, receiver: WeightReceiver | None) -> TensorDict:
        if receiver is not None and time.monotonic() - self._polled_at >= WEIGHTS_POLL_S:
            self._polled_at = time.monotonic()
            got = receiver.poll()
            if got is not None:
                self.collector.set_weights(*got)
        return self.collector.collect_batch()

    def _send(self, td: TensorDict) -> float:
        """Runs on the sender thread; returns the seconds spent sending."""
        while True:
            try:
                return self.collector.send(td)
            except InsertTimeout:
                # The learners are behind (rate limiter): hold the batch and try again.
                if self._stopping:
                    return 0.0
            except ShardUnavailable as e:
                # The rows may or may not be stored; sending again could duplicate them.
                log.warning("collector %d: dropped a batch of %d rows: %s", self.index, len(td), e)
                return 0.0

    def _stats(self, fps: float) -> dict[str, Any]:
        stats = self.collector.stats()
        stats["frames_per_s"] = fps
        stats["state"] = self._state
        return stats

    def _report(self, fps: float, *, batch: bool = False) -> None:
        stats = self._stats(fps)
        with self._cv:
            self._snapshot = stats
        if self._metrics is not None:
            if batch:
                self._metrics.update(self.collector, fps, self._last_send_s)
            else:  # the worker halts or starts: what it counted shows at once
                self._metrics.flush(self.collector, fps)
        now = time.monotonic()
        if batch and now - self._reported_at < self._report_interval_s:
            return
        self._reported_at = now
        self._registry.report(self.index, stats)

    def _ask_grant(self) -> None:
        """Ask the registry for about ``GRANT_S`` of batches (blocking: one call per grant)."""
        # the rate of the last batch collected (reports after a pause say 0)
        want = max(1, int(self._batch_fps * GRANT_S / self.batch_frames))
        got = self._registry.grant(self.index, want, self.batch_frames)
        if got == 0:
            with self._cv:
                self._budget_spent = True
        self._granted_batches = got
