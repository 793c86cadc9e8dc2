"""The plain ``CollectorWorker`` without Ray: a real ``FleetRegistry`` used directly, a real
local ``ReplayBuffer`` as its sink, and the deterministic counting env.

Every test waits for a state with a deadline (never for a duration) and then asserts
exact counts: rows stored = frames collected = frames reported = frames granted.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import waiting
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer
from rlfleet.collector.config import CollectorConfig, EnvConfig, PolicyConfig
from rlfleet.collector.policies import build_policy
from rlfleet.collector.registry import FleetRegistry
from rlfleet.collector.testing import CountingEnv, check_counting_stream
from rlfleet.collector.worker import CollectorWorker

COUNTING = "rlfleet.collector.testing:CountingEnv"
MAX_LEN = 5
NUM_ENVS = 3
BATCH = 30  # frames_per_batch: 3 envs x 10 steps


def make_worker(registry: FleetRegistry, sink: Any, *, index: int = 0, num_workers: int = 1,
                **kwargs: Any) -> CollectorWorker:
    env = EnvConfig(id=COUNTING, kwargs={"max_length": MAX_LEN}, num_envs=NUM_ENVS)
    # reports after every batch, so the registry's counts are exact at any halt
    collector = CollectorConfig(num_workers=num_workers, frames_per_batch=BATCH, init_random_frames=0,
                                report_interval_s=0.0)
    return CollectorWorker(fleet="plain", index=index, seed=0, env=env, collector=collector,
                           policy=PolicyConfig(hidden=(8,)), sink=sink, registry=registry, **kwargs)



def wait_for(predicate, timeout_s=60.0, what="condition"):
    return waiting.wait_for(predicate, timeout_s, what, poll_s=0.02)


def reported(registry: FleetRegistry, index: int, state: str) -> dict[str, Any] | None:
    report = registry.snapshot()["reports"][index]
    return report if report is not None and report["state"] == state else None


def rows(rb: ReplayBuffer) -> TensorDict:
    return rb[0:len(rb)]


@pytest.fixture
def rb(tmp_path):
    buffer = ReplayBuffer.create(tmp_path / "rb", capacity=10_000)
    yield buffer
    buffer.close()


# Collectors run one torch thread per actor; so do these tests (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_budget_is_granted_and_collected_exactly(rb):
    """Two workers share a 1000-frame budget: they stop by themselves at 34 batches of 30."""
    registry = FleetRegistry("plain", num_collectors=2, max_frames=1000, receiver=None)
    registry.set_state("running")
    workers = [make_worker(registry, rb, index=i, num_workers=2) for i in range(2)]
    try:
        reports = [wait_for(lambda i=i: reported(registry, i, "done"), what=f"worker {i} done") for i in range(2)]
        assert [w.status()["state"] for w in workers] == ["done", "done"]
        assert registry.allocated == 1020 and registry.budget_spent()  # ceil(1000 / 30) batches
        # each worker collected exactly what it was granted, and all of it was stored
        assert [r["frames"] for r in reports] == registry.granted
        assert [r["batches"] * BATCH for r in reports] == registry.granted
        assert len(rb) == sum(registry.granted) == 1020
        counts = check_counting_stream(rows(rb), max_length=MAX_LEN)
        assert len(counts) == 2 * NUM_ENVS and sum(counts.values()) == 1020
        workers[0].resume()  # resuming does not lift the budget
        assert registry.grant(0, 1, BATCH) == 0
        assert workers[0].status()["state"] == "done" and len(rb) == 1020
    finally:
        assert all(w.stop(timeout_s=30.0) for w in workers)
    assert [r["state"] for r in registry.snapshot()["reports"]] == ["stopped", "stopped"]
    assert len(rb) == 1020


def test_pause_holds_every_row_and_resume_goes_on(rb):
    registry = FleetRegistry("plain", num_collectors=1, receiver=None)
    registry.set_state("running")
    worker = make_worker(registry, rb)
    try:
        wait_for(lambda: len(rb) >= 3 * BATCH, what="three batches")
        assert worker.pause(timeout_s=30.0)
        report = wait_for(lambda: reported(registry, 0, "paused"), what="the paused report")
        size = len(rb)
        # nothing in flight: every collected frame is stored and reported
        assert report["frames"] == report["batches"] * BATCH == size
        assert worker.status()["state"] == "paused"
        assert worker.pause(timeout_s=30.0)  # pausing again changes nothing
        assert len(rb) == size and registry.snapshot()["reports"][0]["frames"] == size
        worker.resume()
        wait_for(lambda: len(rb) >= size + 2 * BATCH, what="rows after resume")
    finally:
        assert worker.stop(timeout_s=30.0)
    final = reported(registry, 0, "stopped")
    assert final is not None and final["frames"] == final["batches"] * BATCH == len(rb)
    counts = check_counting_stream(rows(rb), max_length=MAX_LEN)
    assert len(counts) == NUM_ENVS and sum(counts.values()) == len(rb)
    assert worker.status()["state"] == "stopped" and worker.join(timeout_s=0)


def test_a_paused_fleet_starts_its_workers_paused(rb):
    registry = FleetRegistry("plain", num_collectors=1, receiver=None)
    registry.set_state("paused")
    worker = make_worker(registry, rb)
    try:
        wait_for(lambda: reported(registry, 0, "paused"), what="the paused report")
        assert len(rb) == 0 and worker.status()["stats"]["frames"] == 0
        worker.resume()
        wait_for(lambda: len(rb) >= BATCH, what="a batch after resume")
    finally:
        assert worker.stop(timeout_s=30.0)
    assert reported(registry, 0, "stopped")["frames"] == len(rb)


def test_an_idle_worker_collects_nothing_until_started(rb):
    registry = FleetRegistry("plain", num_collectors=1, receiver=None)  # state "created"
    worker = make_worker(registry, rb)
    assert worker.status()["state"] == "idle" and registry.snapshot()["registrations"] == [1]
    worker.start()
    wait_for(lambda: len(rb) >= BATCH, what="a batch")
    assert worker.stop(timeout_s=30.0)
    assert worker.stop(timeout_s=30.0)  # idempotent
    assert reported(registry, 0, "stopped")["frames"] == len(rb)


def test_a_second_registration_is_a_new_incarnation_that_resumes_the_count(tmp_path):
    """What a Ray restart does: the same index registers again and carries on counting."""
    registry = FleetRegistry("plain", num_collectors=1, max_frames=300, receiver=None)
    registry.set_state("running")
    first_rb = ReplayBuffer.create(tmp_path / "a", capacity=1_000)
    first = make_worker(registry, first_rb)
    wait_for(lambda: reported(registry, 0, "done"), what="the budget spent")
    assert first.stop(timeout_s=30.0)
    first_rb.close()
    frames = registry.snapshot()["reports"][0]["frames"]
    assert frames == 300 == registry.allocated
    second_rb = ReplayBuffer.create(tmp_path / "b", capacity=1_000)
    try:
        second = make_worker(registry, second_rb)
        assert second.incarnation == 1 and registry.snapshot()["registrations"] == [2]
        assert second.status()["stats"]["frames"] == 300  # resumed from the last report
        # its index used all it was granted: nothing goes back, and nothing is left
        assert registry.allocated == 300
        wait_for(lambda: reported(registry, 0, "done"), what="the second incarnation done")
        assert len(second_rb) == 0
        assert second.stop(timeout_s=30.0)
    finally:
        second_rb.close()
    assert registry.snapshot()["carried_episodes"][0] > 0


class OneShotReceiver:
    """Hands out one ``(state_dict, version)`` once, as a weight receiver would."""

    def __init__(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.item: tuple[dict[str, torch.Tensor], int] | None = (state_dict, version)
        self.closed = False

    def poll(self) -> tuple[dict[str, torch.Tensor], int] | None:
        item, self.item = self.item, None
        return item

    def close(self) -> None:
        self.closed = True


def test_weights_from_the_receiver_stamp_later_rows(rb):
    registry = FleetRegistry("plain", num_collectors=1, receiver=("one-shot", {"version": 7}))
    registry.set_state("running")
    built: list[OneShotReceiver] = []

    def build_receiver(kind: str, kwargs: dict[str, Any]) -> OneShotReceiver:
        assert kind == "one-shot"
        env = CountingEnv(max_length=MAX_LEN)  # the worker's policy, with weights of its own
        state = build_policy(PolicyConfig(hidden=(8,)), env.observation_space, env.action_space).state_dict()
        built.append(OneShotReceiver(state, kwargs["version"]))
        return built[-1]

    worker = make_worker(registry, rb, build_receiver=build_receiver)
    try:
        wait_for(lambda: registry.snapshot()["reports"][0] is not None
                 and registry.snapshot()["reports"][0]["policy_version"] == 7, what="version 7 in use")
        size = len(rb)
        wait_for(lambda: len(rb) >= size + 2 * BATCH, what="rows after the weights")
    finally:
        assert worker.stop(timeout_s=30.0)
    versions = rows(rb)["policy_version"]
    assert set(versions.tolist()) <= {0, 7} and (versions[-BATCH:] == 7).all()
    # rows keep their order: once version 7 appears, no row goes back to 0
    first = int((versions == 7).nonzero()[0])
    assert (versions[first:] == 7).all()
    assert len(built) == 1 and built[0].closed


def test_a_worker_without_a_receiver_factory_refuses_one(rb):
    registry = FleetRegistry("plain", num_collectors=1, receiver=None)
    worker = make_worker(registry, rb)
    with pytest.raises(RuntimeError, match=r"attach_receiver\('object_store'\) needs a worker built with build_receiver"):
        worker.attach_receiver("object_store", {})
    worker.stop(timeout_s=30.0)


def test_a_sink_error_fails_the_loop_and_is_reported(rb):
    # The buffer's schema is fixed by a first write the collector's rows do not match.
    rb.extend(TensorDict({"observation": torch.zeros(2, 7)}, batch_size=[2]))
    registry = FleetRegistry("plain", num_collectors=1, receiver=None)
    registry.set_state("running")
    worker = make_worker(registry, rb)
    try:
        report = wait_for(lambda: reported(registry, 0, "failed"), what="the failure report")
        status = worker.status()
        assert status["state"] == "failed" and "SchemaMismatch" in status["error"]
        assert report["batches"] == 0 and len(rb) == 2
        assert worker.join(timeout_s=30.0)
    finally:
        worker.stop(timeout_s=30.0)
    assert worker.status()["state"] == "failed"
