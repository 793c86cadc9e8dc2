"""``CollectorMetrics``: one collector's ``rlfleet_collector_*`` Ray metrics, tagged ``collector``.

Runs inside a collector actor (``remote.CollectorActor`` hands it to its
``CollectorWorker``); a worker without one (tests) exports nothing. Called from the
worker's loop thread only: not thread-safe.

Counters add up every batch, but reach Ray at most once per ``FLUSH_S`` (and when the
worker halts): a Ray metric call releases the GIL, and the stepping loop then waits for
the sender thread to give it back. Eight calls per batch took 4% of a collector's
samples (py-spy, 2 actors x 32 envs); Prometheus scrapes every few seconds anyway.
"""

from __future__ import annotations

import time

from ray.util import metrics

from rlfleet.collector.collector import Collector

__all__ = ["CollectorMetrics"]


class CollectorMetrics:
    """Ray metrics of the collector tagged ``tag`` (``"<fleet>:<index>"``)."""

    FLUSH_S = 1.0

    def __init__(self, tag: str) -> None:
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
