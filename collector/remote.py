"""The Ray actors of a collector fleet: thin shells around ``Collector``.

- ``CollectorWorker`` (actor ``rlfleet:<fleet>:collector-<i>``): owns one ``Collector``
  and runs its loop in a background thread, so control calls (pause, status, attach a
  weight receiver) are served while it collects. Between batches the loop applies the
  newest weights from its receiver (asking at most every ``WEIGHTS_POLL_S``), then
  collects a batch, sends it, and reports its counters to the registry (at most every
  ``collector.report_interval_s``, and whenever it halts); a second thread sends each
  batch while the next one is collected. Runs with ``max_concurrency > 1``: every
  method is thread-safe; the loop thread drives the ``Collector`` and the sender thread
  only calls its ``send``.
- ``FleetRegistry`` (actor ``rlfleet:<fleet>:collectors``): the fleet's memory, which
  outlives any collector: the run state (running / paused / stopped), the newest weights
  (an object-store reference), the weight receiver every collector must build, each
  collector's latest counters, how often each collector index registered, and the
  fleet's frame budget (``max_frames``).

Frame budget: with ``max_frames`` set, a worker collects only batches the registry
granted it. It asks for a grant (``FleetRegistry.grant``) when it has used the last one,
for about ``GRANT_S`` of batches at its current rate; the registry hands out whole
batches until ``max_frames`` is covered, sharing the last ones out evenly, then answers
0 and the worker stops (state ``done``). So the budget holds whatever the driver is
doing (stuck on a restarting shard, say, it cannot stop the collectors in time), the
fleet ends with ``max_frames`` rounded up to a whole batch, and it costs a Ray call per
``GRANT_S`` instead of one per batch.

Restarts: a worker registers when it is constructed, including when Ray reconstructs it
after a crash (``max_restarts``). The registration number is its *incarnation*, part of
every episode id it hands out; it also gets the frames its index already collected (so
the random phase and the epsilon schedule continue) and, if the fleet is running,
starts its loop by itself. A restarted worker therefore needs nobody to restart it.
The frames come from the last report, so after a kill they can lag the rows the worker
had sent by up to one report interval (exact with ``report_interval_s=0``), and the
part of its grant the registry takes back counts those frames as unused.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import threading
import time
import traceback
from typing import Any

import torch
from tensordict import TensorDict

from rlfleet.buffer import BufferClient, InsertTimeout, ShardUnavailable
from rlfleet.collector.collector import Collector
from rlfleet.collector.config import CollectorConfig, EnvConfig, PolicyConfig
from rlfleet.collector.weights import NAMESPACE, make_receiver, registry_name

__all__ = ["CollectorWorker", "FleetRegistry", "worker_name"]

log = logging.getLogger(__name__)

REGISTRY_TIMEOUT_S = 30.0
STATES = ("created", "running", "paused", "stopped")
# The worker's own states, shown in reports and status(): the above, and "idle" (built,
# loop not started), "starting", "done" (the fleet's max_frames was reached), "failed".
# A worker collects a 1024-frame CartPole batch in about 25 ms. Asking the registry for
# new weights after every batch was a blocking Ray round trip per batch; at most this
# often instead.
WEIGHTS_POLL_S = 0.1
# With a frame budget, a worker asks for about this many seconds of batches at a time.
GRANT_S = 0.25
# The sender thread needs the GIL for a few short stretches per batch; with Python's
# default 5 ms switch interval each one waited for the stepping loop to yield, and the
# loop then waited for the send (1 actor x 32 envs: 0.43 -> 0.52 of the ceiling).
SWITCH_INTERVAL_S = 0.0005


def worker_name(fleet: str, index: int) -> str:
    """The actor name of collector ``index`` of fleet ``fleet``."""
    return f"rlfleet:{fleet}:collector-{index}"


class FleetRegistry:
    """State shared by a fleet's collectors (one actor per fleet; calls run one at a time)."""

    def __init__(self, fleet: str, num_collectors: int, first_incarnation: int = 0,
                 max_frames: int | None = None) -> None:
        self.fleet = fleet
        self.max_frames = max_frames
        # Incarnations of this fleet start here, so a resumed run (a new fleet writing into
        # the same buffer) never reuses the episode ids of an earlier session.
        self.first_incarnation = first_incarnation
        self.state = "created"
        self.weights: tuple[int, list[Any]] | None = None
        self.receiver: tuple[str, dict[str, Any]] = ("object_store", {"fleet": fleet})
        self.registrations = [0] * num_collectors
        self.reports: list[dict[str, Any] | None] = [None] * num_collectors
        # frames granted to each collector index (all its incarnations), and in all
        self.granted = [0] * num_collectors
        self.allocated = 0
        # episodes finished by earlier incarnations of each index
        self.carried_episodes = [0] * num_collectors

    def ping(self) -> str:
        return self.state

    def register(self, index: int) -> dict[str, Any]:
        """Called by a worker as it starts; returns its incarnation and what it must resume."""
        incarnation = self.first_incarnation + self.registrations[index]
        self.registrations[index] += 1
        last = self.reports[index]
        start_frames = 0
        if last is not None:
            start_frames = int(last["frames"])
            self.carried_episodes[index] += int(last["episodes"])
            # What the old incarnation was granted past its last report goes back.
            unused = max(0, self.granted[index] - start_frames)
            self.granted[index] -= unused
            self.allocated -= unused
            # Frames stay visible until the new incarnation reports (it starts from them).
            self.reports[index] = {**last, "episodes": 0, "recent_returns": [], "recent_lengths": [],
                                   "frames_per_s": 0.0, "state": "restarting"}
        return {"incarnation": incarnation, "start_frames": start_frames,
                "receiver": self.receiver, "state": self.state,
                "budget": self.max_frames is not None, "budget_spent": self.budget_spent()}

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"fleet state {state!r}: must be one of {list(STATES)}")
        self.state = state

    def set_weights(self, version: int, refs: list[Any]) -> int:
        """Keep ``refs`` (a one-element list holding the weights' reference) if newer."""
        if self.weights is None or version > self.weights[0]:
            self.weights = (version, refs)
        else:
            log.warning("fleet %r: ignoring weights version %d (have %d)", self.fleet, version, self.weights[0])
        return self.weights[0]

    def newer_weights(self, known_version: int) -> tuple[int, list[Any]] | None:
        if self.weights is None or self.weights[0] <= known_version:
            return None
        return self.weights

    def set_receiver(self, kind: str, kwargs: dict[str, Any]) -> None:
        self.receiver = (kind, dict(kwargs))

    def report(self, index: int, stats: dict[str, Any]) -> None:
        """Keep a worker's latest counters."""
        self.reports[index] = stats

    def grant(self, index: int, batches: int, batch_frames: int) -> int:
        """How many of the ``batches`` batches (``batch_frames`` frames each) collector
        ``index`` asks for it may collect: all of them while the budget lasts, an even
        share of the batches left near its end, 0 once it is covered (or without one,
        all)."""
        if self.max_frames is None:
            return batches
        left = self.max_frames - self.allocated
        if left <= 0:
            return 0
        left_batches = -(-left // batch_frames)
        n = min(batches, max(1, left_batches // len(self.granted)))
        self.granted[index] += n * batch_frames
        self.allocated += n * batch_frames
        return n

    def budget_spent(self) -> bool:
        """Whether the grants cover ``max_frames`` (no more will be handed out)."""
        return self.max_frames is not None and self.allocated >= self.max_frames

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "registrations": list(self.registrations),
                "reports": list(self.reports), "carried_episodes": list(self.carried_episodes)}


class _Metrics:
    """``rlfleet_collector_*`` metrics of one worker, tagged ``collector``.

    Counters add up every batch, but reach Ray at most once per ``FLUSH_S`` (and when
    the worker halts): a Ray metric call releases the GIL, and the stepping loop then
    waits for the sender thread to give it back. Eight calls per batch took 4% of a
    collector's samples (py-spy, 2 actors x 32 envs); Prometheus scrapes every few
    seconds anyway.
    """

    FLUSH_S = 1.0

    def __init__(self, tag: str) -> None:
        from ray.util import metrics

        keys = ("collector",)
        self.tags = {"collector": tag}
        self._pending = [0.0, 0.0, 0.0, 0.0]  # frames, env, policy and send seconds not yet flushed
        self._flushed_at = 0.0
        self.frames = metrics.Counter("rlfleet_collector_frames", "frames collected", tag_keys=keys)
        self.fps = metrics.Gauge("rlfleet_collector_fps", "frames per second, last batch", tag_keys=keys)
        self.episode_return = metrics.Gauge(
            "rlfleet_collector_episode_return", "mean return of the last 100 episodes", tag_keys=keys)
        self.episode_length = metrics.Gauge(
            "rlfleet_collector_episode_length", "mean length of the last 100 episodes", tag_keys=keys)
        self.policy_version = metrics.Gauge(
            "rlfleet_collector_policy_version", "version of the weights in use", tag_keys=keys)
        self.env_time = metrics.Counter("rlfleet_collector_env_time_s", "seconds in env.step", tag_keys=keys)
        self.policy_time = metrics.Counter(
            "rlfleet_collector_policy_time_s", "seconds choosing actions", tag_keys=keys)
        self.send_time = metrics.Counter(
            "rlfleet_collector_send_time_s", "seconds sending batches to the buffer", tag_keys=keys)

    def update(self, collector: Collector, fps: float, send_s: float) -> None:
        """Count the last batch; pass the counts on to Ray if ``FLUSH_S`` went by."""
        last, pending = collector.last_batch, self._pending
        for i, value in enumerate((last["frames"], last["env_time_s"], last["policy_time_s"], send_s)):
            pending[i] += value
        if time.monotonic() - self._flushed_at >= self.FLUSH_S:
            self.flush(collector, fps)

    def flush(self, collector: Collector, fps: float) -> None:
        """Pass what was counted, and the gauges, on to Ray now."""
        self._flushed_at = time.monotonic()
        pending, tags = self._pending, self.tags
        # Ray counters refuse increments that are not > 0.
        for i, counter in enumerate((self.frames, self.env_time, self.policy_time, self.send_time)):
            if pending[i] > 0:
                counter.inc(pending[i], tags)
            pending[i] = 0
        self.fps.set(fps, tags)
        if collector.recent_returns:
            self.episode_return.set(sum(collector.recent_returns) / len(collector.recent_returns), tags)
            self.episode_length.set(sum(collector.recent_lengths) / len(collector.recent_lengths), tags)
        self.policy_version.set(collector.policy_version, tags)


class CollectorWorker:
    """One collector actor; see the module docstring. Every method is thread-safe."""

    def __init__(self, fleet: str, index: int, num_collectors: int, seed: int, env: EnvConfig,
                 collector: CollectorConfig, policy: PolicyConfig, buffer: Any) -> None:
        import ray

        # One intra-op thread: a collector's forward pass is small, and actors share cores.
        torch.set_num_threads(1)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.fleet, self.index, self.num_collectors = fleet, index, num_collectors
        self._registry = ray.get_actor(registry_name(fleet), namespace=NAMESPACE)
        reg = ray.get(self._registry.register.remote(index), timeout=REGISTRY_TIMEOUT_S)
        self.incarnation = reg["incarnation"]
        sink = BufferClient.connect(buffer) if isinstance(buffer, str) else buffer
        self.collector = Collector(
            env, policy, sink, collector_id=index, incarnation=self.incarnation, seed=seed,
            frames_per_batch=collector.frames_per_batch, device=collector.device,
            init_random_frames=collector.init_random_frames, exploration=collector.exploration,
            start_frames=reg["start_frames"],
        )
        self._metrics = _Metrics(f"{fleet}:{index}")
        self._cv = threading.Condition()
        self._paused = reg["state"] == "paused"
        # Frame budget (see the module docstring): batches granted and not collected yet,
        # and whether the registry said no more will be granted.
        self._budget = bool(reg["budget"])
        self._budget_spent = bool(reg["budget_spent"])
        self._granted_batches = 0
        self._batch_fps = 0.0
        self._batch_frames = self.collector.steps_per_batch * self.collector.num_envs
        self._report_interval_s = float(collector.report_interval_s)
        self._reported_at = float("-inf")
        self._stopping = False
        self._busy = False
        self._state = "idle"
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._receiver: Any = None
        self._retired: list[Any] = []
        self._last_send_s = 0.0
        self._polled_at = float("-inf")  # time.monotonic() of the last weights poll
        self._receiver_error: str | None = None
        self._snapshot = self._stats(0.0)
        self.attach_receiver(*reg["receiver"])
        if reg["state"] in ("running", "paused"):
            self.start()
        log.info("collector %d of fleet %r up (incarnation %d)", index, fleet, self.incarnation)

    # -- control (called by the fleet on the driver) -----------------------------------

    def ping(self) -> int:
        return self.index

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
        """Stop after the current batch; True once no batch is in flight."""
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

        Building may block (a distributed receiver joins a process group), so it never
        runs on the caller's thread.
        """
        def build() -> None:
            try:
                receiver = make_receiver(kind, collector_index=self.index,
                                         num_collectors=self.num_collectors, **kwargs)
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

        threading.Thread(target=build, name=f"receiver-{self.index}", daemon=True).start()

    def status(self) -> dict[str, Any]:
        with self._cv:
            return {"index": self.index, "incarnation": self.incarnation, "state": self._state,
                    "error": self._error, "receiver_error": self._receiver_error,
                    "stats": dict(self._snapshot)}

    # -- the loop (its own thread) -----------------------------------------------------

    def _loop(self) -> None:
        # The thread count is OpenMP state of each thread: set in __init__ only, this
        # thread's first forward pass started a second OpenMP thread that spun between
        # steps, a whole core (Ray sets OMP_NUM_THREADS=1 for 1-CPU actors, but not for all).
        torch.set_num_threads(1)
        # One sender thread: batch b travels to the buffer while batch b+1 is collected.
        sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sender-{self.index}")
        in_flight: concurrent.futures.Future | None = None
        try:
            while True:
                with self._cv:
                    halt = self._paused or self._stopping or self._budget_spent
                if not halt and self._budget and self._granted_batches == 0:
                    self._ask_grant()  # a halted worker asks for nothing it may not use
                with self._cv:
                    halt = self._paused or self._stopping or self._budget_spent
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
                    with self._cv:
                        self._busy = False
                        self._cv.notify_all()
                        if self._stopping:
                            break
                        halted = "done" if self._budget_spent and not self._paused else "paused"
                        was, self._state = self._state, halted
                    if was != halted:
                        if halted == "done":
                            log.info("collector %d: the fleet's max_frames is reached; collecting no more",
                                     self.index)
                        self._report(0.0)
                    with self._cv:
                        self._cv.wait_for(
                            lambda: self._stopping or not (self._paused or self._budget_spent), timeout=1.0)
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

    def _collect(self, receiver: Any) -> TensorDict:
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
        if batch:
            self._metrics.update(self.collector, fps, self._last_send_s)
        else:  # the worker halts or starts: what it counted shows at once
            self._metrics.flush(self.collector, fps)
        now = time.monotonic()
        if batch and now - self._reported_at < self._report_interval_s:
            return
        self._reported_at = now
        # Fire and forget: the registry only keeps the latest report.
        self._registry.report.remote(self.index, stats)

    def _ask_grant(self) -> None:
        """Ask the registry for about ``GRANT_S`` of batches (blocking: one call per grant)."""
        import ray

        # the rate of the last batch collected (reports after a pause say 0)
        want = max(1, int(self._batch_fps * GRANT_S / self._batch_frames))
        got = ray.get(self._registry.grant.remote(self.index, want, self._batch_frames),
                      timeout=REGISTRY_TIMEOUT_S)
        if got == 0:
            with self._cv:
                self._budget_spent = True
        self._granted_batches = got
