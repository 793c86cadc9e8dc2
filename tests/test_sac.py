"""SAC loss: action mapping, log-probabilities against the policy's own, terminated
targets, temperature direction, learning a 1-step continuous bandit, bad arguments."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer
from rlfleet.collector.config import PolicyConfig
from rlfleet.collector.policies import build_policy
from rlfleet.launch.learners.learner import Learner
from rlfleet.launch.learners.sac import SACLoss

OBS_SPACE = gym.spaces.Box(-1.0, 1.0, (3,))
ACT_SPACE = gym.spaces.Box(np.array([-2.0, 0.0], dtype=np.float32), np.array([2.0, 1.0], dtype=np.float32))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def make_sac(**kwargs) -> SACLoss:
    actor = build_policy(PolicyConfig(hidden=(32, 32)), OBS_SPACE, ACT_SPACE)
    return SACLoss(actor, OBS_SPACE, ACT_SPACE, hidden=(32, 32), **kwargs)


def rows(n: int, *, terminated: bool = True, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 3, generator=g) * 2 - 1
    unit = torch.rand(n, 2, generator=g) * 2 - 1
    action = unit * torch.tensor([2.0, 0.5]) + torch.tensor([0.0, 0.5])
    flags = torch.full((n,), terminated)
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            ("next", "observation"): obs,
            ("next", "reward"): -((unit - 0.5) ** 2).sum(1, keepdim=True),
            ("next", "terminated"): flags.unsqueeze(-1),
            ("next", "truncated"): torch.zeros(n, 1, dtype=torch.bool),
            ("next", "done"): flags.unsqueeze(-1),
        },
        [n],
    )


def test_box_actions_map_to_unit_range() -> None:
    sac = make_sac()
    box = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 0.5]])
    assert torch.equal(sac._to_unit(box), torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))


def test_log_prob_matches_the_policy_up_to_the_box_scale() -> None:
    # The policy's rsample includes log|scale| of the box rescaling; the loss leaves
    # that constant out. Same seed, same noise: they must differ by exactly that.
    sac = make_sac()
    obs = torch.rand(64, 3)
    torch.manual_seed(7)
    unit, log_prob = sac._sample_action(sac.actor, obs)
    torch.manual_seed(7)
    box, policy_log_prob = sac.actor.rsample(obs)
    assert torch.allclose(sac.actor.scale(unit), box, atol=1e-6)
    log_scale = math.log(2.0) + math.log(0.5)
    # Far from the tanh saturation the policy's 1e-6 guard is negligible.
    inside = (unit.abs() < 0.99).all(1)
    assert inside.sum() > 32
    assert torch.allclose(log_prob[inside] - log_scale, policy_log_prob[inside], atol=1e-3)


def test_terminated_rows_do_not_bootstrap() -> None:
    sac = make_sac()
    batch = rows(16, terminated=True)
    out = sac(batch)
    with torch.no_grad():
        q1, q2 = sac.critic(batch["observation"], sac._to_unit(batch["action"]))
    assert torch.allclose(out["td_error"], batch["next", "reward"][:, 0] - torch.min(q1, q2))


def test_temperature_moves_toward_the_target_entropy() -> None:
    low = make_sac(target_entropy=-50.0, lr=1e-2)  # entropy far above target: alpha falls
    high = make_sac(target_entropy=50.0, lr=1e-2)  # entropy far below target: alpha rises
    low.update(rows(32), step=1)
    high.update(rows(32), step=1)
    assert float(low.alpha) < 1.0 < float(high.alpha)


def test_update_changes_all_parts_and_soft_updates_targets() -> None:
    sac = make_sac(tau=0.5)
    before = {k: v.clone() for k, v in sac.state_dict().items()}
    metrics, td_error = sac.update(rows(32), step=1)
    after = sac.state_dict()
    assert set(metrics) == {"loss", "critic_loss", "actor_loss", "alpha", "entropy", "q_mean"}
    assert td_error.shape == (32,)
    for prefix in ("actor.", "critic.", "target_critic.", "log_alpha"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    # tau = 0.5: target = (old target + new critic) / 2, and the old target was the old critic.
    key = "critic.q1.0.weight"
    expected = (before["target_critic.q1.0.weight"] + after[key]) / 2
    assert torch.allclose(after["target_critic.q1.0.weight"], expected)


def test_learns_a_continuous_bandit(tmp_path: Path) -> None:
    # One-step episodes, one action in [-2, 2], reward -(a/2 - 0.5)^2: the best action is 1.
    space = gym.spaces.Box(-2.0, 2.0, (1,))
    g = torch.Generator().manual_seed(0)
    n = 2048
    obs = torch.rand(n, 3, generator=g) * 2 - 1
    action = torch.rand(n, 1, generator=g) * 4 - 2
    done = torch.ones(n, dtype=torch.bool)
    batch = TensorDict(
        {
            "observation": obs,
            "action": action,
            ("next", "observation"): obs,
            ("next", "reward"): -((action / 2 - 0.5) ** 2),
            ("next", "terminated"): done.unsqueeze(-1),
            ("next", "truncated"): ~done.unsqueeze(-1),
            ("next", "done"): done.unsqueeze(-1),
        },
        [n],
    )
    actor = build_policy(PolicyConfig(hidden=(32, 32)), OBS_SPACE, space)
    sac = SACLoss(actor, OBS_SPACE, space, hidden=(32, 32), lr=3e-3, init_alpha=0.01, target_entropy=-5.0)
    with ReplayBuffer.create(tmp_path / "rb", capacity=4096, seed=0) as rb:
        rb.extend(batch)
        learner = Learner(sac, rb, batch_size=128, prefetch=0)
        learner.step(300)
    with torch.no_grad():
        best = actor.deterministic(torch.rand(256, 3) * 2 - 1)
    # A random actor is off by about 1.3 on average; a learned one sits near 1.
    assert (best - 1.0).abs().mean() < 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"gamma": -0.1}, r"gamma=-0.1 is outside \[0, 1\]", id="gamma"),
        pytest.param({"tau": 0.0}, r"tau=0.0 must be in \(0, 1\]", id="tau"),
        pytest.param({"init_alpha": 0.0}, r"init_alpha=0.0 must be > 0", id="alpha"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_sac(**kwargs)


def test_image_observations_refused() -> None:
    actor = build_policy(PolicyConfig(hidden=(8,)), OBS_SPACE, ACT_SPACE)
    images = gym.spaces.Box(0, 255, (3, 16, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"observation shape \(3, 16, 16\) is not 1-D"):
        SACLoss(actor, images, ACT_SPACE)
