"""``LearnerGroup`` on the shared local Ray cluster: real gloo groups of 1 and 2 ranks
sampling from a real replay service; rank 0 publishing to a real fleet registry."""

from __future__ import annotations

import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import ray
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayService, actor_name
from rlfleet.collector import make_receiver
from rlfleet.collector.registry import FleetRegistry
from rlfleet.collector.config import PolicyConfig
from rlfleet.launch.config import LearnerConfig
from rlfleet.launch.learners import LearnerGroup, LearnerGroupError

OBS_SPACE = gym.spaces.Box(-1.0, 1.0, (4,))
ACT_SPACE = gym.spaces.Discrete(2)


def bandit_rows(n: int, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 4, generator=g) * 2 - 1
    action = torch.randint(0, 2, (n,), generator=g)
    ones = torch.ones(n, dtype=torch.bool)
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            ("next", "observation"): obs,
            ("next", "reward"): (action == 0).float().unsqueeze(-1),
            ("next", "terminated"): ones.unsqueeze(-1),
            ("next", "truncated"): ~ones.unsqueeze(-1),
            ("next", "done"): ones.unsqueeze(-1),
            "episode_id": torch.arange(n),
            "step": torch.zeros(n, dtype=torch.int64),
            "collector_id": torch.zeros(n, dtype=torch.int64),
            "policy_version": torch.zeros(n, dtype=torch.int64),
        },
        [n],
    )


def config(num_learners: int, **learner) -> LearnerConfig:
    params = {"batch_size": 32, "publish_every": 5, "checkpoint_every": 1000, "prefetch": 1}
    params.update(learner)
    return LearnerConfig(num_learners=num_learners, **params)


def make_group(name: str, learner: LearnerConfig, run_dir: Path, *, obs_space=OBS_SPACE, act_space=ACT_SPACE,
               **kwargs) -> LearnerGroup:
    """A group of run ``name`` sampling from the buffer of the same name."""
    return LearnerGroup(learner, PolicyConfig(hidden=(16,)), run_name=name, buffer=name,
                        observation_space=obs_space, action_space=act_space, run_dir=run_dir, **kwargs)


@pytest.fixture
def service(ray_cluster, tmp_path: Path, request):
    name = f"lg-{request.node.name.split('[')[0][-20:].replace('_', '-')}"
    svc = ReplayService.launch(name, tmp_path / "buffer", capacity=2000, detached=False, seed=0)
    svc.client().extend(bandit_rows(512))
    yield name
    ReplayService.shutdown(name)


def test_two_ranks_hold_identical_weights(service: str, tmp_path: Path) -> None:
    group = make_group(service, config(2), tmp_path / "run")
    try:
        before = group.rank_state_dicts()
        metrics = group.step(12)
        after = group.rank_state_dicts()
    finally:
        group.shutdown()
    assert metrics["learner/steps"] == 12.0
    assert metrics["learner/policy_version"] == 10.0  # published at steps 5 and 10
    # DDP starts every rank from rank 0's weights and keeps them equal...
    for state in (before, after):
        assert list(state[0]) == list(state[1])
        for key in state[0]:
            np.testing.assert_array_equal(state[0][key], state[1][key], err_msg=key)
    # ...while they did learn.
    assert any(not np.array_equal(before[0][k], after[0][k]) for k in before[0])


def pendulum_rows(n: int) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(n, 3, generator=g) * 2 - 1
    action = torch.rand(n, 1, generator=g) * 4 - 2
    flags = torch.zeros(n, dtype=torch.bool)
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            ("next", "observation"): obs,
            ("next", "reward"): -(action**2),
            ("next", "terminated"): flags.unsqueeze(-1),
            ("next", "truncated"): flags.unsqueeze(-1),
            ("next", "done"): flags.unsqueeze(-1),
            "episode_id": torch.zeros(n, dtype=torch.int64),
            "step": torch.arange(n),
            "collector_id": torch.zeros(n, dtype=torch.int64),
            "policy_version": torch.zeros(n, dtype=torch.int64),
        },
        [n],
    )


def test_two_sac_ranks_hold_identical_weights(ray_cluster, tmp_path: Path) -> None:
    name = "lg-sac"
    svc = ReplayService.launch(name, tmp_path / "buffer", capacity=1000, detached=False, seed=0)
    try:
        svc.client().extend(pendulum_rows(512))
        cfg = config(2, algorithm="sac", tau=0.1)
        obs_space = gym.spaces.Box(-1.0, 1.0, (3,))
        act_space = gym.spaces.Box(-2.0, 2.0, (1,))
        group = make_group(name, cfg, tmp_path / "run", obs_space=obs_space, act_space=act_space)
        try:
            before = group.rank_state_dicts()
            group.step(6)
            after = group.rank_state_dicts()
        finally:
            group.shutdown()
    finally:
        ReplayService.shutdown(name)
    # Actor, critics, target critics and the temperature agree across ranks.
    assert {k.split(".")[0] for k in after[0]} == {"actor", "critic", "target_critic", "log_alpha", "action_center", "action_half"}
    for key in after[0]:
        np.testing.assert_array_equal(after[0][key], after[1][key], err_msg=key)
    assert not np.array_equal(before[0]["log_alpha"], after[0]["log_alpha"])


def test_checkpoint_and_resume(service: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    group = make_group(service, config(1), run_dir)
    try:
        group.step(7)
        path = group.save_checkpoint()
        saved = group.policy_state_dict()
    finally:
        group.shutdown()
    assert path == run_dir / "checkpoints" / "learner-000000007.pt"
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert state["steps"] == 7 and state["policy_version"] == 5

    resumed = make_group(service, config(1), run_dir, resume=True)
    try:
        restored = resumed.policy_state_dict()
        metrics = resumed.step(3)
    finally:
        resumed.shutdown()
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    assert metrics["learner/steps"] == 10.0
    assert metrics["learner/policy_version"] == 10.0


def test_checkpoints_every_n_steps(service: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    group = make_group(service, config(1, checkpoint_every=4), run_dir)
    try:
        for _ in range(3):
            group.step(3)
    finally:
        group.shutdown()
    # Checked after each call of 3 steps: at 3 (3 < 4), 6 (6 >= 4: saved), 9 (9 - 6 < 4).
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest.pt", "learner-000000006.pt"]


def test_resume_without_checkpoint(ray_cluster, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"resume=True but .*latest.pt does not exist"):
        make_group("lg-none", config(1), tmp_path, resume=True)


def test_unplaceable_learner_count(ray_cluster, tmp_path: Path) -> None:
    with pytest.raises(LearnerGroupError, match=r"num_learners=64 needs 64 CPU .* the cluster has 8 CPU"):
        make_group("lg-big", config(64), tmp_path)


def test_prioritized_service_reports_priority_updates(ray_cluster, tmp_path: Path) -> None:
    """Rank 0's priority counters reach the group's metrics (what metrics.jsonl records)."""
    name = "lg-prioritized"
    sampler = {"type": "prioritized", "alpha": 0.6, "beta": 0.4}
    svc = ReplayService.launch(name, tmp_path / "buffer", capacity=2000, sampler=sampler, detached=False, seed=0)
    try:
        svc.client().extend(bandit_rows(512))
        group = make_group(name, config(1), tmp_path / "run")
        try:
            first = group.step(4)
            second = group.step(2)
        finally:
            group.shutdown()
        stats = svc.client().stats()
    finally:
        ReplayService.shutdown(name)
    # Nothing was overwritten (512 rows in 2000): every one of the 6 x 32 updates is stored.
    for metrics in (first, second):
        assert metrics["learner/priority_updates_skipped"] == 0.0
        assert metrics["learner/priority_stored_fraction"] == 1.0
    assert stats["total"]["priority_updates"] == 6 * 32


def test_actors_and_buffer_in_the_given_namespace(ray_cluster, tmp_path: Path) -> None:
    """Learner ranks are named in the run's namespace and sample the buffer there."""
    name, namespace = "lg-space", "lg-other-space"
    svc = ReplayService.launch(name, tmp_path / "buffer", capacity=2000, detached=False, seed=0, namespace=namespace)
    try:
        svc.client().extend(bandit_rows(512))
        group = make_group(name, config(1), tmp_path / "run", namespace=namespace)
        try:
            metrics = group.step(2)
            assert ray.get_actor(actor_name(name, "learner-0"), namespace=namespace) is not None
            with pytest.raises(ValueError):
                ray.get_actor(actor_name(name, "learner-0"), namespace="rlfleet")
        finally:
            group.shutdown()
    finally:
        ReplayService.shutdown(name, namespace=namespace)
    assert metrics["learner/steps"] == 2.0


class RegistryOnlyFleet:
    """The fleet side a ``LearnerGroup`` talks to: a real registry actor, no collectors.
    Records (and checks) every ``attach_weight_receiver`` call."""

    def __init__(self, name: str, namespace: str = "rlfleet") -> None:
        self.name, self.namespace, self.num_workers = name, namespace, 1
        self.registry = ray.remote(FleetRegistry).options(
            name=actor_name(name, "collectors"), namespace=namespace, num_cpus=0).remote(name, 1)
        self.attached: list[tuple[str, dict]] = []

    def attach_weight_receiver(self, kind: str, **kwargs) -> None:
        assert kind in ("object_store", "distributed"), kind
        self.attached.append((kind, kwargs))

    def close(self) -> None:
        ray.kill(self.registry)


@pytest.mark.parametrize("transport", ["object_store", "distributed"])
def test_rank_zero_publishes_without_the_driver(service: str, tmp_path: Path, transport: str) -> None:
    """Rank 0 publishes straight to the fleet (the broadcast, with no receiver joined,
    falls back to the registry); a version already published moves nothing."""
    fleet = RegistryOnlyFleet(f"{service}-{transport.replace('_', '-')}")
    group = make_group(service, config(1, weight_transport=transport), tmp_path / "run", fleet=fleet)
    receiver = make_receiver("object_store", fleet=fleet.name, namespace=fleet.namespace,
                             collector_index=0, num_collectors=1)
    try:
        # The driver only passed on how to reach the broadcast group, once.
        if transport == "distributed":
            assert [kind for kind, _ in fleet.attached] == ["distributed"]
            assert {"host", "port"} <= set(fleet.attached[0][1])
        else:
            assert fleet.attached == []
        state, version = _poll(receiver)
        assert version == 0
        for key, value in group.policy_state_dict().items():
            assert torch.equal(state[key], value), key
        group.step(3)  # publish_every=5: nothing due
        assert receiver.poll() is None
        assert group.publish() == 3
        assert _poll(receiver)[1] == 3
        assert group.publish() == 3  # unchanged: nothing moves
        assert receiver.poll() is None
        metrics = group.step(2)  # step 5 publishes
        assert metrics["learner/policy_version"] == 5.0
        assert metrics["weights/version"] == 5.0
        assert _poll(receiver)[1] == 5
    finally:
        receiver.close()
        group.shutdown()
        fleet.close()


def _poll(receiver, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = receiver.poll()
        if got is not None:
            return got
        time.sleep(0.01)
    raise AssertionError(f"no weights within {timeout_s}s")
