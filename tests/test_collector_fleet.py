"""``CollectorFleet`` on the real local Ray cluster, streaming into a real replay service."""

from __future__ import annotations

import re
import time
import numpy as np
import pytest

import waiting
import torch

from rlfleet.buffer import ReplayService
from rlfleet.collector import CollectorConfig, CollectorError, CollectorFleet, EnvConfig, PolicyConfig
from rlfleet.collector.testing import check_counting_stream

COUNTING = "rlfleet.collector.testing:CountingEnv"
MAX_LEN = 6
KEYS = {
    ("observation",): ((4,), torch.float32), ("action",): ((), torch.int64),
    ("next", "reward"): ((1,), torch.float32), ("next", "terminated"): ((1,), torch.bool),
    ("next", "truncated"): ((1,), torch.bool), ("next", "done"): ((1,), torch.bool),
    ("next", "observation"): ((4,), torch.float32), ("episode_id",): ((), torch.int64),
    ("step",): ((), torch.int64), ("collector_id",): ((), torch.int64),
    ("policy_version",): ((), torch.int64),
}


def make_fleet(name, buffer, env, *, max_frames=None, namespace="rlfleet", **collector):
    collector = {"num_workers": 2, "frames_per_batch": 64, "init_random_frames": 256, **collector}
    return CollectorFleet(name, buffer, env=env, collector=CollectorConfig(**collector),
                          policy=PolicyConfig(hidden=(16,)), seed=0, max_frames=max_frames, namespace=namespace)



def wait_for(predicate, timeout_s=90.0, what="condition"):
    return waiting.wait_for(predicate, timeout_s, what, poll_s=0.2)


@pytest.fixture(scope="module")
def cartpole(ray_cluster, tmp_path_factory):
    svc = ReplayService.launch("collect-cartpole", tmp_path_factory.mktemp("cartpole"),
                               capacity=200_000, detached=False)
    client = svc.client()
    fleet = make_fleet("fleet-cartpole", client, EnvConfig(num_envs=4))
    fleet.start()
    yield fleet, client
    fleet.stop()
    ReplayService.shutdown("collect-cartpole", delete=True)


def test_fleet_fills_the_service_with_complete_transitions(cartpole):
    fleet, client = cartpole
    wait_for(lambda: len(client) >= 2048, what="2048 rows")
    wait_for(lambda: all(c is not None for c in fleet.stats()["collectors"]), what="reports from both")
    batch = client.sample(512)
    for key, (shape, dtype) in KEYS.items():
        assert batch[key].shape == (512, *shape) and batch[key].dtype == dtype, key
    assert set(batch["collector_id"].tolist()) <= {0, 1}
    assert torch.equal(batch["next", "done"], batch["next", "terminated"] | batch["next", "truncated"])
    ids = batch["episode_id"]
    assert set((ids >> 48).tolist()) == set(batch["collector_id"].tolist())
    # reports reach the registry at most every report_interval_s: they catch up with the rows
    stats = wait_for(lambda: (lambda s: s if s["frames"] >= 2048 else None)(fleet.stats()),
                     what="reports counting 2048 frames")
    assert stats["frames"] >= 2048 and stats["episodes"] > 0
    assert len(stats["recent_returns"]) == len(stats["recent_lengths"]) <= 100
    assert stats["recent_returns"] == [float(n) for n in stats["recent_lengths"]]  # CartPole: +1 per step
    assert [c["collector_id"] for c in stats["collectors"]] == [0, 1]


def test_weights_reach_every_collector_and_stamp_rows(cartpole):
    fleet, client = cartpole
    template = fleet._template.state_dict()
    with pytest.raises(ValueError, match=r"weights do not match the policy \(missing keys \['head.2.bias'\]"):
        fleet.set_weights({k: v for k, v in template.items() if k != "head.2.bias"}, 1)
    fleet.set_weights(template, 3)
    wait_for(lambda: fleet.stats()["policy_version"] == 3, what="version 3 everywhere")
    before = client.stats()["total"]["total_inserted"]
    wait_for(lambda: client.stats()["total"]["total_inserted"] >= before + 512, what="new rows")
    newest = client.sample(2048)
    assert (newest["policy_version"] == 3).any()
    assert set(newest["policy_version"].tolist()) <= {0, 3}


def test_pause_stops_inserts_and_resume_restarts_them(cartpole):
    fleet, client = cartpole
    fleet.pause()
    n = client.stats()["total"]["total_inserted"]
    time.sleep(1.0)
    assert client.stats()["total"]["total_inserted"] == n
    assert [c["state"] for c in fleet.stats()["collectors"]] == ["paused", "paused"]
    fleet.resume()
    wait_for(lambda: client.stats()["total"]["total_inserted"] > n, what="inserts after resume")


def test_metrics_reach_the_prometheus_endpoint(cartpole, ray_cluster):
    import urllib.request

    url = f"http://127.0.0.1:{ray_cluster.metrics_export_port}/metrics"
    wanted = [f"ray_rlfleet_collector_{m}" for m in (
        "frames", "fps", "episode_return", "episode_length", "policy_version",
        "env_time_s", "policy_time_s", "send_time_s")]

    def scraped():
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        lines = [line for line in text.splitlines() if 'collector="fleet-cartpole:0"' in line]
        return all(any(line.startswith(w) for line in lines) for w in wanted) and lines

    lines = wait_for(scraped, what="collector metrics on the endpoint")
    frames = [line for line in lines if line.startswith("ray_rlfleet_collector_frames")]
    assert float(frames[0].rsplit(" ", 1)[1]) > 0


def test_killed_collector_is_restarted_and_episode_ids_stay_unique(cartpole, ray_cluster):
    import ray

    fleet, client = cartpole
    fleet.health_check()
    victim = ray.get_actor("rlfleet:fleet-cartpole:collector-0", namespace="rlfleet")
    ray.kill(victim, no_restart=False)  # a crash: Ray restarts it

    def restarted():
        fleet.health_check()
        return fleet.stats()["restarts"] == 1 and fleet.stats()["collectors"][0]["incarnation"] == 1

    wait_for(restarted, what="collector 0 back as incarnation 1")
    assert fleet.stats()["collectors"][0]["frames"] > 0
    n = client.stats()["total"]["total_inserted"]
    wait_for(lambda: client.stats()["total"]["total_inserted"] >= n + 1024, what="the run going on")
    rows = client.sample(4096)
    ids = rows["episode_id"].numpy()
    incarnations = {(int(i) >> 48, (int(i) >> 32) & 0xFFFF) for i in ids}
    assert (0, 1) in incarnations and incarnations <= {(0, 0), (0, 1), (1, 0)}
    # an episode id belongs to one collector and one incarnation, and its steps are consistent
    by_episode: dict[int, set[int]] = {}
    for eid, cid in zip(ids, rows["collector_id"].numpy()):
        by_episode.setdefault(int(eid), set()).add(int(cid))
    assert all(len(c) == 1 for c in by_episode.values())


def test_dead_collector_is_recreated_by_health_check(cartpole):
    import ray

    fleet, client = cartpole
    fleet.health_check()
    before = fleet.stats()["restarts"]
    ray.kill(fleet._actors[1], no_restart=True)  # Ray will not bring this one back

    def recreated():
        fleet.health_check()
        c = fleet.stats()["collectors"][1]
        return c["incarnation"] == 1 and c["state"] == "running"

    wait_for(recreated, what="collector 1 re-created")
    assert fleet.stats()["restarts"] == before + 1


@pytest.mark.slow  # about 45 s of Ray actors; the default run keeps the plain-class tests
def test_counting_env_rows_survive_a_restart_intact(ray_cluster, tmp_path):
    import ray

    svc = ReplayService.launch("collect-counting", tmp_path / "buf", capacity=100_000, detached=False)
    client = svc.client()
    env = EnvConfig(id=COUNTING, kwargs={"max_length": MAX_LEN}, num_envs=3)
    # reports after every batch: the restarted collector's carried frame count is exact
    # to a batch (with the default interval it may lag the rows by up to one interval)
    fleet = make_fleet("fleet-counting", "collect-counting", env, num_workers=1, frames_per_batch=30,
                       init_random_frames=0, report_interval_s=0.0)
    try:
        fleet.start()
        wait_for(lambda: all(c is not None and c["batches"] >= 3 for c in fleet.stats()["collectors"]),
                 what="the collector sending")
        ray.kill(ray.get_actor("rlfleet:fleet-counting:collector-0", namespace="rlfleet"), no_restart=False)

        def restarted():
            c = fleet.stats()["collectors"][0]
            return c["incarnation"] == 1 and c["batches"] >= 3

        wait_for(restarted, what="collector 0 restarted and collecting")
        fleet.pause()
        size = len(client)
        rows = svc_rows(tmp_path / "buf", size)
    finally:
        fleet.stop()
        ReplayService.shutdown("collect-counting")
    counts = check_counting_stream(rows, max_length=MAX_LEN)
    # 3 envs of the first incarnation, 3 fresh envs (new seeds) of the restarted one
    assert len(counts) == 6
    assert sum(counts.values()) == size and size % 30 == 0
    incarnations = {(int(i) >> 48, (int(i) >> 32) & 0xFFFF) for i in rows["episode_id"]}
    assert incarnations == {(0, 0), (0, 1)}
    # after stop, stats() answers from the final snapshot. The kill can fall between a
    # batch's commit and the arrival of the report that counted it (or between a report
    # and a commit that never happened), so the carried count may be one batch off
    final = fleet.stats()
    assert abs(final["frames"] - size) <= 30 and final["frames"] % 30 == 0
    assert final["restarts"] == 1
    # a later fleet writing into the same buffer (a resumed run) starts from here
    assert fleet.stats()["next_incarnation"] == 2


def svc_rows(path, size):
    """All rows of the (paused) service's only shard, oldest first, read from disk."""
    from rlfleet.buffer import ReplayBuffer

    rb = ReplayBuffer.open(path / "shard-0")
    try:
        if size is not None:
            assert len(rb) == size
        return rb[0:len(rb)]
    finally:
        rb.close()


def test_registry_grants_whole_batches_until_the_budget_is_covered():
    """FleetRegistry on its own (a plain class): grants, the even share near the end, and
    a restarted collector's unused grant going back to the budget."""
    from rlfleet.collector.registry import FleetRegistry

    reg = FleetRegistry("grants", num_collectors=2, max_frames=1000)
    assert reg.register(0)["budget"] is True and reg.register(1)["budget_spent"] is False
    assert reg.grant(0, 5, 64) == 5            # 320 frames; 680 left: 11 batches
    assert reg.grant(1, 100, 64) == 5          # an even share of the 11
    assert reg.grant(0, 100, 64) == 3          # 360 left: 6 batches, 3 each
    assert reg.grant(1, 100, 64) == 1          # 168 left: 3 batches
    assert reg.grant(0, 100, 64) == 1          # 104 left: 2 batches
    assert reg.allocated == 960 and not reg.budget_spent()
    assert reg.grant(1, 100, 64) == 1          # 40 left: the last batch
    assert reg.allocated == 1024 and reg.budget_spent()
    assert reg.grant(0, 3, 64) == 0
    # collector 1 was granted 7 batches (448 frames), reported 256, then died: 192 go back
    reg.report(1, {"frames": 256, "episodes": 3})
    again = reg.register(1)
    assert again["start_frames"] == 256 and again["incarnation"] == 1
    assert reg.allocated == 832 and not again["budget_spent"]
    assert reg.grant(1, 10, 64) == 1 and reg.granted == [576, 320]
    no_budget = FleetRegistry("free", num_collectors=1)
    assert no_budget.grant(0, 7, 64) == 7 and not no_budget.budget_spent()


@pytest.mark.slow  # about 45 s of Ray actors; the default run keeps the plain-class tests
def test_max_frames_stops_the_fleet_by_itself(ray_cluster, tmp_path):
    """The budget holds with no driver call after start: no pause, stop or stats."""
    import ray

    svc = ReplayService.launch("collect-budget", tmp_path, capacity=20_000, detached=False)
    client = svc.client()
    # in a namespace of its own: every actor of the fleet lives there (the buffer's client
    # keeps its own namespace)
    fleet = make_fleet("fleet-budget", client, EnvConfig(num_envs=4), max_frames=1000, namespace="rlfleet-budget")
    batch = 64  # 4 envs x 16 steps
    try:
        fleet.start()
        wait_for(lambda: [c and c["state"] for c in fleet.stats()["collectors"]] == ["done", "done"],
                 what="both collectors done")
        found = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("rlfleet:fleet-budget:")}
        assert found == {("rlfleet-budget", f"rlfleet:fleet-budget:{c}")
                         for c in ("collectors", "collector-0", "collector-1")}
        stats = fleet.stats()
        assert stats["max_frames"] == 1000
        # the registry granted whole batches until they covered 1000 frames: 16 of 64
        assert stats["frames"] == 1024, stats["frames"]
        # every collected batch was stored: nothing was in flight when they reported done
        assert len(client) == client.stats()["total"]["total_inserted"] == stats["frames"]
        fleet.resume()  # resuming does not lift the budget
        time.sleep(1.0)
        assert fleet.stats()["frames"] == len(client) == stats["frames"]
    finally:
        fleet.stop()
        ReplayService.shutdown("collect-budget", delete=True)


def test_object_store_receiver_can_be_attached_again(cartpole):
    fleet, _ = cartpole
    with pytest.raises(ValueError, match=r"weight transport kind = 'carrier-pigeon': must be one of \['object_store', 'distributed'\]"):
        fleet.attach_weight_receiver("carrier-pigeon")
    with pytest.raises(ValueError, match=r"attach_weight_receiver: fleet = 'other', but this fleet's fleet is 'fleet-cartpole'"):
        fleet.attach_weight_receiver("object_store", fleet="other")
    fleet.attach_weight_receiver("object_store", fleet=fleet.name, timeout_s=2.0)  # its own name: fine
    version = fleet.stats()["policy_version"] + 1
    assert fleet.set_weights(fleet._template.state_dict(), version)
    assert not fleet.set_weights(fleet._template.state_dict(), version)  # not newer: nothing moves
    wait_for(lambda: fleet.stats()["policy_version"] == version, what="weights through the new receiver")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fleet_collects_on_cuda(ray_cluster, tmp_path):
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray cluster has no GPU")
    ReplayService.launch("collect-gpu", tmp_path / "buf", capacity=10_000, detached=False)
    env = EnvConfig(id=COUNTING, kwargs={"max_length": MAX_LEN}, num_envs=4)
    fleet = make_fleet("fleet-gpu", "collect-gpu", env, device="cuda", num_gpus=0.25, init_random_frames=0)
    try:
        fleet.start()
        wait_for(lambda: fleet.stats()["frames"] >= 512, what="frames from GPU collectors")
        fleet.pause()
        size = fleet.stats()["frames"]
    finally:
        fleet.stop()
        ReplayService.shutdown("collect-gpu")
    rows = svc_rows(tmp_path / "buf", None)
    counts = check_counting_stream(rows, max_length=MAX_LEN)
    assert len(counts) == 8 and sum(counts.values()) == len(rows) <= size


def test_bad_input_is_refused_before_any_actor_starts(ray_cluster):
    import ray

    good = {"env": EnvConfig(), "collector": CollectorConfig(num_workers=1), "policy": PolicyConfig(hidden=(16,))}
    cases = {
        "unknown env": ({"env": EnvConfig(id="CartPol-v1")},
                        r"env.id 'CartPol-v1' is not a registered gymnasium id \(close matches: \['CartPole-v1'"),
        "observation space": ({"env": EnvConfig(id="FrozenLake-v1")}, r"observation space Discrete\(16\) is not supported"),
        "exploration": ({"env": EnvConfig(id="Pendulum-v1")},
                        r"exploration.type = 'epsilon_greedy' does not fit the action space Box"),
        "name": ({"name": "bad-name/x"}, r"name = 'bad-name/x': use 1-64 letters, digits, '_', '.' or '-'"),
        "dotted name": ({"name": "bad..x"}, r"name = 'bad..x': use 1-64 letters"),
        "namespace": ({"namespace": "no space"}, r"namespace = 'no space': use 1-64 letters"),
        "seed": ({"seed": -1}, r"seed = -1: must be an integer >= 0"),
        "env type": ({"env": {"id": "CartPole-v1"}}, r"env must be of type EnvConfig, got dict"),
        "incarnation": ({"first_incarnation": 2**16}, r"first_incarnation = 65536: must be an int in \[0, 65536\)"),
        **{f"max_frames {bad!r}": ({"max_frames": bad}, rf"max_frames = {re.escape(repr(bad))}: must be an int >= 1")
           for bad in (0, -5, 2.5, True, "1000")},
    }
    if not torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) == 0:
        cases["device"] = ({"collector": CollectorConfig(num_workers=1, device="cuda", num_gpus=0.5)},
                           r"collector.device = 'cuda' but the Ray cluster has no GPU")
    for case, (changes, match) in cases.items():
        kwargs = {"name": "bad-fleet", **good, **changes}
        with pytest.raises(ValueError, match=match):
            CollectorFleet(kwargs.pop("name"), "no-buffer-needed", **kwargs)
            pytest.fail(f"case {case!r} was accepted")
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not any(n.startswith("rlfleet:bad") for n in names)
    with pytest.raises(ValueError, match=r"env.num_envs = 0: must be an integer >= 1"):
        EnvConfig(num_envs=0)


def test_a_name_is_taken_within_its_namespace_only(ray_cluster):
    import ray

    kwargs = {"env": EnvConfig(num_envs=2), "collector": CollectorConfig(num_workers=1),
              "policy": PolicyConfig(hidden=(16,))}
    fleets = [CollectorFleet("fleet-ns", "no-buffer-needed", **kwargs),
              CollectorFleet("fleet-ns", "no-buffer-needed", namespace="rlfleet-other", **kwargs)]
    try:
        with pytest.raises(ValueError, match=r"name = 'fleet-ns': a collector fleet of that name is running "
                           r"in namespace 'rlfleet-other'; stop it or pick another name"):
            CollectorFleet("fleet-ns", "no-buffer-needed", namespace="rlfleet-other", **kwargs)
        found = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("rlfleet:fleet-ns:")}
        assert found == {("rlfleet", "rlfleet:fleet-ns:collectors"), ("rlfleet-other", "rlfleet:fleet-ns:collectors")}
        assert [f.namespace for f in fleets] == ["rlfleet", "rlfleet-other"]
    finally:
        for f in fleets:
            f.stop()


def test_actor_construction_failure_is_reported_and_cleaned_up(ray_cluster):
    import ray

    # The driver can build the env; the buffer does not exist, so each actor's
    # BufferClient.connect fails inside the actor.
    fleet = make_fleet("fleet-nobuf", "no-such-buffer", EnvConfig(num_envs=1), num_workers=1)
    with pytest.raises(CollectorError, match=r"collector fleet 'fleet-nobuf': an actor failed to start: "
                       r"rlfleet.buffer.errors.BufferNotFound: no replay buffer named 'no-such-buffer'"):
        fleet.start()
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not any(n.startswith("rlfleet:fleet-nobuf:") for n in names)
    np.testing.assert_equal(fleet._actors, [])
