"""The buffer-wide rate limiter on the session's real local Ray cluster: two shards, a
ratio, and inserts into one shard only (what node-local writers do when one node's
collectors stop). Samples keep flowing from both shards, and samples/inserts over the
buffer stays within ``samples_per_insert`` of the inserts beyond the minimum size, to
``error_margin / inserted``, all the while; it still does after shard 0, which keeps
the limiter, is killed and restarted."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import ray

from rlfleet.buffer import ReplayService
from rlfleet.buffer.indices import shard_of

SPI, MARGIN, MIN_SIZE = 1.0, 100.0, 100
INSERT, SAMPLE = 50, 40  # rows per insert, per sample: both below the margin
NAME = "svc-wide"


def arrays(first: int, n: int = INSERT) -> dict[tuple[str, ...], np.ndarray]:
    ids = np.arange(first, first + n, dtype=np.int64)
    return {("observation",): np.repeat(ids.astype(np.float32)[:, None], 3, axis=1), ("step",): ids}


def shard(k: int):
    return ray.get_actor(f"rlfleet:{NAME}:shard-{k}", namespace="rlfleet")


@pytest.fixture(scope="module")
def wide(ray_cluster, tmp_path_factory):
    """The service, and a sampling client connected while the buffer was empty."""
    svc = ReplayService.launch(NAME, tmp_path_factory.mktemp("wide"), capacity=20000, num_shards=2,
                               seed=0, rate_limiter={"min_size_to_sample": MIN_SIZE,
                                                     "samples_per_insert": SPI,
                                                     "error_margin": MARGIN, "timeout_s": 60.0})
    yield svc, svc.client(seed=1)
    ReplayService.shutdown(NAME, delete=True)


class Run:
    """A writer thread (into one shard's actor) and a sampler thread (through the client)
    at once, the buffer-wide limiter polled meanwhile."""

    def __init__(self, client, writes: list[tuple[int, int]], samples: int) -> None:
        self.client, self.writes, self.samples = client, writes, samples
        self.errors: list[BaseException] = []
        self.offsets: list[float] = []
        self.sampled_shards: list[int] = []

    def guard(self, fn):
        def run():
            try:
                fn()
            except BaseException as e:  # surfaced by the test
                self.errors.append(e)
        return run

    def write(self) -> None:
        for k, first in self.writes:
            ray.get(shard(k).extend.remote(arrays(first)), timeout=120)

    def sample(self) -> None:
        for _ in range(self.samples):
            batch = self.client.sample(SAMPLE)
            steps, obs = batch["step"].numpy(), batch["observation"][:, 0].numpy()
            assert (obs == steps).all()
            self.sampled_shards.extend(shard_of(batch["index"].numpy()).tolist())

    def __call__(self) -> dict:
        threads = [threading.Thread(target=self.guard(self.write)),
                   threading.Thread(target=self.guard(self.sample))]
        for t in threads:
            t.start()
        # Polled while the threads run, and once more after: how many polls fit in a run
        # depends on the machine, so tests bound the offsets, not their number.
        while any(t.is_alive() for t in threads):
            self.offsets.append(self.client.stats()["total"]["buffer_rate_limiter"]["ratio_offset"])
            threads[0].join(0.05)
        self.offsets.append(self.client.stats()["total"]["buffer_rate_limiter"]["ratio_offset"])
        for t in threads:
            t.join(300)
        assert not self.errors, self.errors
        return self.client.stats()


def check_ratio(total: dict, inserted: int, sampled: int) -> None:
    wide = total["buffer_rate_limiter"]
    assert (wide["inserts"], wide["samples"]) == (inserted, sampled)
    # samples/inserts = SPI * (1 - MIN_SIZE / inserted) within MARGIN / inserted
    assert abs(sampled / inserted - SPI * (1 - MIN_SIZE / inserted)) <= MARGIN / inserted
    assert total["rate_limiter"]["sample_timeouts"] == 0


def test_samples_flow_while_every_insert_goes_to_shard_0(wide):
    _, client = wide
    # 1000 rows into shard 0; shard 1 stays empty. SPI * (1000 - 100) = 900 samples owed:
    # 22 of 40 rows. The client knew no sizes, so its first draw asks shard 1 too, which
    # has no row: it gives its admission back and the rows are drawn from shard 0.
    run = Run(client, [(0, INSERT * i) for i in range(20)], samples=22)
    stats = run()
    check_ratio(stats["total"], 1000, 880)
    assert max(abs(o) for o in run.offsets) <= MARGIN
    assert [s["size"] for s in stats["shards"]] == [1000, 0]
    assert [s["rate_limiter"]["samples"] for s in stats["shards"]] == [880, 0]
    assert set(run.sampled_shards) == {0}


def test_a_shard_that_gets_no_inserts_still_serves_its_share(wide):
    _, client = wide
    # shard 1 gets 1000 rows, then every insert goes to shard 0 (2000 rows). With a limiter
    # per shard, shard 1 would owe at most SPI * (1000 - 100) + MARGIN = 1000 samples and
    # then hold every sample sent its way until SampleTimeout.
    writes = [(1, 10_000 + INSERT * i) for i in range(20)] + [(0, 1000 + INSERT * i) for i in range(40)]
    run = Run(client, writes, samples=75)
    stats = run()
    check_ratio(stats["total"], 4000, 880 + 3000)
    assert max(abs(o) for o in run.offsets) <= MARGIN
    assert [s["size"] for s in stats["shards"]] == [3000, 1000]
    own = [s["rate_limiter"] for s in stats["shards"]]
    assert (own[0]["inserts"], own[1]["inserts"]) == (3000, 1000)
    assert own[0]["samples"] + own[1]["samples"] == 3880
    assert own[1]["samples"] == run.sampled_shards.count(1) > 0
    # the last 40 calls drew from shard 1 too: it never stopped serving
    assert 1 in run.sampled_shards[-40 * SAMPLE:]


def test_a_restarted_shard_0_rebuilds_the_buffer_wide_limiter_from_the_shards(wide):
    _, client = wide
    pid = ray.get(shard(0).ping.remote())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while True:  # Ray restarts it; calls in flight are retried
        try:
            if ray.get(shard(0).ping.remote(), timeout=60) != pid:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "shard 0 was not restarted"
        time.sleep(0.2)
    # the new owner starts centred on its own 3000 rows; shard 1's 1000 arrive with its
    # next forwarded call, credited as rows held before the restart
    run = Run(client, [(0, 3000 + INSERT * i) for i in range(10)], samples=12)
    stats = run()
    wide_state = stats["total"]["buffer_rate_limiter"]
    # counted since the restart, centred as if the 4000 rows had just been inserted
    assert (wide_state["size"], wide_state["inserts"], wide_state["samples"]) == (4500, 500, 480)
    assert wide_state["ratio_offset"] == 500 - 480
    assert max(abs(o) for o in run.offsets) <= MARGIN
    assert stats["total"]["rate_limiter"]["sample_timeouts"] == 0
