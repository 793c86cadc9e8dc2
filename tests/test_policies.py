"""Policies built from config and spaces: shapes, bounds, weight checks, devices."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch

from rlfleet.collector.config import PolicyConfig
from rlfleet.collector.policies import (
    GaussianActor, QNetwork, acting_forward, build_policy, check_state_dict, resolve_device,
)

Box, Discrete = gymnasium.spaces.Box, gymnasium.spaces.Discrete
VECTOR = Box(-1.0, 1.0, (4,), np.float32)
IMAGE = Box(0, 255, (3, 20, 24), np.uint8)


def test_cartpole_qnetwork_is_4_64_64_2():
    q = build_policy(PolicyConfig(), VECTOR, Discrete(2))
    assert isinstance(q, QNetwork)
    shapes = {k: tuple(v.shape) for k, v in q.state_dict().items()}
    assert shapes == {
        "head.0.weight": (64, 4), "head.0.bias": (64,),
        "head.2.weight": (64, 64), "head.2.bias": (64,),
        "head.4.weight": (2, 64), "head.4.bias": (2,),
    }
    assert q(torch.zeros(5, 4)).shape == (5, 2)
    # int64 observations (the counting env) are cast, not refused
    assert q(torch.zeros(5, 4, dtype=torch.int64)).shape == (5, 2)


@pytest.mark.parametrize(("obs_space", "obs"), [
    (VECTOR, torch.zeros(3, 4)),
    (IMAGE, torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)),
])
def test_gaussian_actor_shapes_and_bounds(obs_space, obs):
    actions = Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    torch.manual_seed(0)
    actor = build_policy(PolicyConfig(hidden=(32,)), obs_space, actions)
    assert isinstance(actor, GaussianActor)
    mean, log_std = actor(obs)
    assert mean.shape == log_std.shape == (3, 2)
    assert ((log_std >= -5.0) & (log_std <= 2.0)).all()
    a, logp = actor.rsample(obs)
    assert a.shape == (3, 2) and logp.shape == (3,)
    assert ((a[:, 0] >= -2) & (a[:, 0] <= 2) & (a[:, 1] >= 0) & (a[:, 1] <= 1)).all()
    assert torch.allclose(actor.unscale(actor.scale(torch.tensor([[0.5, -0.5]]))), torch.tensor([[0.5, -0.5]]))
    assert torch.allclose(actor.deterministic(obs), actor.scale(torch.tanh(mean)))
    # the bounds come from the space, not from the weights
    assert set(actor.state_dict()) == {k for k, _ in actor.named_parameters()}


def test_image_policy_uses_the_cnn():
    q = build_policy(PolicyConfig(type="cnn", hidden=(16,)), IMAGE, Discrete(3))
    assert any(isinstance(m, torch.nn.Conv2d) for m in q.modules())
    assert q(torch.zeros(2, 3, 20, 24, dtype=torch.uint8)).shape == (2, 3)


def test_learner_and_collector_builds_share_state_dicts():
    a = build_policy(PolicyConfig(hidden=(8, 8)), VECTOR, Discrete(2))
    b = build_policy(PolicyConfig(hidden=(8, 8)), VECTOR, Discrete(2))
    check_state_dict(b, a.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 4)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    ("policy", "obs_space", "act_space", "match"),
    [
        (PolicyConfig(), Discrete(5), Discrete(2), r"observation space Discrete\(5\) is not supported.*FlattenObservation"),
        (PolicyConfig(), Box(0, 1, (2, 3)), Discrete(2), r"observation space Box\(0.0, 1.0, \(2, 3\), float32\) is not supported"),
        (PolicyConfig(), gymnasium.spaces.Dict({"a": VECTOR}), Discrete(2), r"observation space Dict.*is not supported"),
        (PolicyConfig(), Box(0, 255, (64, 64, 3), np.uint8), Discrete(2), r"looks channels-last \[H, W, C\]"),
        (PolicyConfig(type="cnn"), VECTOR, Discrete(2), r"policy.type 'cnn' needs \[C, H, W\] uint8 image observations"),
        (PolicyConfig(type="nature_cnn"), VECTOR, Discrete(2), r"policy.type 'nature_cnn' needs \[C, H, W\] uint8 image"),
        (PolicyConfig(type="nature_cnn"), Box(0, 255, (4, 32, 32), np.uint8), Discrete(2),
         r"policy.type 'nature_cnn' needs images of at least 36x36, got \[4, 32, 32\]"),
        (PolicyConfig(), VECTOR, gymnasium.spaces.MultiDiscrete([2, 2]), r"action space MultiDiscrete\(\[2 2\]\) is not supported"),
        (PolicyConfig(), VECTOR, Box(-np.inf, np.inf, (2,)), r"has infinite bounds.*ClipAction"),
        (PolicyConfig(), VECTOR, Box(-1, 1, (2, 2)), r"a Box action space must be 1-D"),
    ],
)
def test_unsupported_spaces_are_refused_with_the_fix(policy, obs_space, act_space, match):
    with pytest.raises(ValueError, match=match):
        build_policy(policy, obs_space, act_space)


def test_check_state_dict_names_keys_and_shapes():
    q = build_policy(PolicyConfig(hidden=(8,)), VECTOR, Discrete(2))
    other = build_policy(PolicyConfig(hidden=(16,)), VECTOR, Discrete(2)).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch head.0.weight: got \(16, 4\), policy has \(8, 4\); head.0.bias"):
        check_state_dict(q, other)
    actor = build_policy(PolicyConfig(hidden=(8,)), VECTOR, Box(-1, 1, (1,))).state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['head.0.bias'.*unexpected keys \['log_std.bias'"):
        check_state_dict(q, actor)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device = 'gpu': must be 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device = 'cuda:99' but only \d+ CUDA device"):
            resolve_device("cuda:99")
    else:
        with pytest.raises(ValueError, match=r"device = 'cuda' but CUDA is not available in this process"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_policy_on_cuda_matches_cpu():
    torch.manual_seed(0)
    q = build_policy(PolicyConfig(), VECTOR, Discrete(2))
    x = torch.randn(8, 4)
    expected = q(x)
    q_cuda = q.to(resolve_device("cuda:0"))
    assert torch.allclose(q_cuda(x.cuda()).cpu(), expected, atol=1e-5)


@pytest.mark.parametrize(("obs_space", "act_space", "obs"), [
    (VECTOR, Discrete(3, start=-1), torch.randn(7, 4)),
    (IMAGE, Discrete(2), torch.randint(0, 256, (7, 3, 20, 24), dtype=torch.uint8)),
    (VECTOR, Box(-2.0, 2.0, (2,), np.float32), torch.randn(7, 4)),
    (IMAGE, Box(-1.0, 1.0, (3,), np.float32), torch.randint(0, 256, (7, 3, 20, 24), dtype=torch.uint8)),
])
def test_acting_forward_computes_exactly_the_module_and_follows_loaded_weights(obs_space, act_space, obs):
    torch.manual_seed(0)
    policy = build_policy(PolicyConfig(hidden=(16, 8)), obs_space, act_space).eval()
    fast = acting_forward(policy)
    assert fast is not policy  # the fast path, not the fallback

    def same(a, b):
        if isinstance(a, tuple):
            return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        return torch.equal(a, b)

    with torch.inference_mode():
        assert same(fast(obs), policy(obs))
    torch.manual_seed(1)
    other = build_policy(PolicyConfig(hidden=(16, 8)), obs_space, act_space)
    policy.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert same(fast(obs), other.eval()(obs))


def test_acting_forward_returns_other_modules_unchanged():
    module = torch.nn.Linear(4, 2)
    assert acting_forward(module) is module

    class Tweaked(QNetwork):
        def forward(self, obs):
            return super().forward(obs) * 2

    q = build_policy(PolicyConfig(), VECTOR, Discrete(2))
    tweaked = Tweaked(q.encoder, (64, 64), 2)
    assert acting_forward(tweaked) is tweaked


def test_nature_cnn_is_the_nature_dqn_stack_and_acts_as_its_module_does():
    space = Box(0, 255, (4, 84, 84), np.uint8)
    net = build_policy(PolicyConfig(type="nature_cnn", hidden=(512,)), space, Discrete(6))
    convs = [m for m in net.encoder.convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(32, (8, 8), (4, 4)), (64, (4, 4), (2, 2)),
                                                                           (64, (3, 3), (1, 1))]
    assert net.encoder.out_dim == 64 * 7 * 7
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(acting_forward(net)(obs), net(obs)) and net(obs).shape == (3, 6)
