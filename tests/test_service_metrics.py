"""The shards' ``rlfleet_buffer_*`` metrics on the node's real Prometheus endpoint."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayService, SampleTimeout

NAMES = ["items", "inserts", "samples", "bytes", "rate_limiter_wait_s", "sample_latency_s",
         "priority_updates", "priority_updates_skipped"]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def value(text: str, metric: str, **tags: str) -> float | None:
    """The value of the first sample of ``metric`` whose labels include ``tags``."""
    for line in text.splitlines():
        m = re.match(rf"^{metric}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in tags.items()):
            return float(m.group(2))
    return None


def test_shard_metrics_appear_on_the_prometheus_endpoint(ray_cluster, tmp_path):
    svc = ReplayService.launch("svc-metrics", tmp_path, capacity=60, num_shards=2, seed=0,
                               rate_limiter={"min_size_to_sample": 10})
    try:
        client = svc.client(seed=0, split="rows")  # every sample meets both shards' limiters
        td = TensorDict({"observation": torch.zeros(30, 4)}, batch_size=[30])
        first = client.extend(td)  # shard 0: 30 rows, full (capacity 30 per shard)
        client.extend(td[:5])      # shard 1, the emptier one: 5 rows, under its min size
        with pytest.raises(SampleTimeout):
            client.sample(40, timeout_s=0.2)  # shard 1 waits, then times out
        client.extend(td[:10])     # shard 1: 15 rows
        for _ in range(3):
            client.sample(20)
        assert client.update_priority(first, torch.ones(30)) == 0
        # 30 more rows straight into shard 0 overwrite every row `first` names
        shard0 = ray.get_actor("rlfleet:svc-metrics:shard-0", namespace="rlfleet")
        ray.get(shard0.extend.remote({("observation",): np.zeros((30, 4), np.float32)}))
        assert client.update_priority(first, torch.ones(30)) == 30
        stats = client.stats()["shards"]
        assert (stats[0]["priority_updates"], stats[0]["priority_updates_skipped"]) == (30, 30)
        want = {
            ("ray_rlfleet_buffer_items", "0"): 30.0,
            ("ray_rlfleet_buffer_items", "1"): 15.0,
            ("ray_rlfleet_buffer_samples(?:_total)?", "0"): float(stats[0]["samples"]),
            ("ray_rlfleet_buffer_samples(?:_total)?", "1"): float(stats[1]["samples"]),
            ("ray_rlfleet_buffer_inserts(?:_total)?", "0"): 60.0,
            ("ray_rlfleet_buffer_inserts(?:_total)?", "1"): 15.0,
            ("ray_rlfleet_buffer_priority_updates(?:_total)?", "0"): 30.0,
            ("ray_rlfleet_buffer_priority_updates_skipped(?:_total)?", "0"): 30.0,
        }
        assert stats[0]["samples"] + stats[1]["samples"] >= 60
        port = ray_cluster.metrics_export_port
        got: dict = {}
        deadline = time.monotonic() + 90  # Ray exports every few seconds
        while got != want and time.monotonic() < deadline:
            time.sleep(2)
            text = scrape(port)
            got = {k: value(text, k[0], buffer="svc-metrics", shard=k[1]) for k in want}
        assert got == want
        tagged = [line for line in text.splitlines() if 'buffer="svc-metrics"' in line]
        for name in NAMES:
            assert any(line.startswith(f"ray_rlfleet_buffer_{name}") for line in tagged), name
        assert value(text, "ray_rlfleet_buffer_bytes", buffer="svc-metrics", shard="0") > 0
        # the timed-out wait of shard 1 was observed once
        assert value(text, "ray_rlfleet_buffer_rate_limiter_wait_s_count", buffer="svc-metrics",
                     shard="1", side="sample") == 1.0
        assert value(text, "ray_rlfleet_buffer_sample_latency_s_count", buffer="svc-metrics",
                     shard="0") >= 3.0
    finally:
        ReplayService.shutdown("svc-metrics", delete=True)
