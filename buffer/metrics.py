"""The ``rlfleet_buffer_*`` metrics one shard exports through ``ray.util.metrics``.

Runs inside a shard actor. Ray serves them on each node's Prometheus endpoint with its
own ``ray_`` prefix (``ray_rlfleet_buffer_items``) and on the dashboard, tagged
``buffer`` and ``shard``. Counters and histograms are updated per call; the gauges
(items, bytes) are set by the shard's own refresh thread about once a second, so a hot
insert/sample loop never pays for a ``stat`` of every data file.

Thread-safe: ``ray.util.metrics`` objects may be updated from any actor thread.
"""

from __future__ import annotations

from ray.util import metrics

__all__ = ["ShardMetrics"]

# seconds; rate-limiter waits run from milliseconds to the limiter's timeout
_WAIT_BOUNDARIES = [0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]
# seconds; one shard's share of a batch is a gather from page cache plus pickling
_LATENCY_BOUNDARIES = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]


class ShardMetrics:
    """Ray metrics of one shard, tagged ``buffer=<name>`` and ``shard=<k>``.

    Args:
        buffer: the service name.
        shard: the shard number.
    """

    def __init__(self, buffer: str, shard: int) -> None:
        tags = {"buffer": buffer, "shard": str(shard)}
        keys = ("buffer", "shard")
        self.items = metrics.Gauge(
            "rlfleet_buffer_items", description="rows held by the shard", tag_keys=keys
        )
        self.bytes = metrics.Gauge(
            "rlfleet_buffer_bytes", description="bytes of the shard's files on disk", tag_keys=keys
        )
        self.inserts = metrics.Counter(
            "rlfleet_buffer_inserts", description="rows inserted into the shard", tag_keys=keys
        )
        self.samples = metrics.Counter(
            "rlfleet_buffer_samples", description="rows sampled from the shard", tag_keys=keys
        )
        self.wait = metrics.Histogram(
            "rlfleet_buffer_rate_limiter_wait_s",
            description="seconds an insert or sample call waited for the rate limiter",
            boundaries=_WAIT_BOUNDARIES,
            tag_keys=(*keys, "side"),
        )
        self.latency = metrics.Histogram(
            "rlfleet_buffer_sample_latency_s",
            description="seconds the shard spent serving one sample call (waits included)",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=keys,
        )
        self.priority_updates = metrics.Counter(
            "rlfleet_buffer_priority_updates",
            description="rows whose priority update the shard stored", tag_keys=keys,
        )
        self.priority_updates_skipped = metrics.Counter(
            "rlfleet_buffer_priority_updates_skipped",
            description="rows whose priority update the shard skipped: overwritten since "
                        "they were sampled",
            tag_keys=keys,
        )
        for m in (self.items, self.bytes, self.inserts, self.samples, self.latency,
                  self.priority_updates, self.priority_updates_skipped):
            m.set_default_tags(tags)
        self.wait.set_default_tags(tags)

    def inserted(self, rows: int, wait_s: float) -> None:
        """Count one insert call of ``rows`` rows that waited ``wait_s`` seconds."""
        self.inserts.inc(rows)
        if wait_s > 0:
            self.wait.observe(wait_s, tags={"side": "insert"})

    def sampled(self, rows: int, wait_s: float, latency_s: float) -> None:
        """Count one sample call of ``rows`` rows."""
        if rows:
            self.samples.inc(rows)
        if wait_s > 0:
            self.wait.observe(wait_s, tags={"side": "sample"})
        self.latency.observe(latency_s)

    def priorities_updated(self, stored: int, skipped: int) -> None:
        """Count one priority update: ``stored`` rows set, ``skipped`` overwritten ones."""
        if stored:
            self.priority_updates.inc(stored)
        if skipped:
            self.priority_updates_skipped.inc(skipped)

    def timed_out(self, side: str, wait_s: float) -> None:
        """Record a wait that ended in a timeout."""
        self.wait.observe(wait_s, tags={"side": side})

    def refresh(self, items: int, bytes_on_disk: int) -> None:
        """Set the gauges."""
        self.items.set(items)
        self.bytes.set(bytes_on_disk)
