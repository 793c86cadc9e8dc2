"""``torch.export`` of a trained policy: same actions, loadable by plain torch, re-exportable."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch

from rlfleet.collector.config import EnvConfig, PolicyConfig
from rlfleet.collector.policies import build_policy
from rlfleet.launch.cli import main
from rlfleet.launch.config import RunConfig
from rlfleet.launch.export import GreedyPolicy, export_policy, export_run, load_exported
from rlfleet.launch.rundir import RunDir

# Loads the program with torch alone and proves rlfleet was never imported.
LOADER = """
import sys, numpy as np, torch
policy = torch.export.load(sys.argv[1]).module()
obs = torch.as_tensor(np.load(sys.argv[2]))
np.save(sys.argv[3], policy(obs).numpy())
assert not [m for m in sys.modules if m.startswith("rlfleet")], "rlfleet was imported"
"""


def _spaces(env_id):
    env = gymnasium.make(env_id)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_exported_policy_acts_like_the_module_and_loads_without_rlfleet(tmp_path, env_id):
    torch.manual_seed(0)
    observation_space, action_space = _spaces(env_id)
    policy = build_policy(PolicyConfig(hidden=(16, 16)), observation_space, action_space)
    info = export_policy(policy, observation_space, action_space, tmp_path / "policy.pt2")
    observation_space.seed(1)
    obs = np.stack([observation_space.sample() for _ in range(5)])
    expected = GreedyPolicy(policy, action_space).eval()(torch.as_tensor(obs)).detach().numpy()
    if env_id == "Pendulum-v1":  # the same mode the built-in actor computes
        np.testing.assert_allclose(expected, policy.deterministic(torch.as_tensor(obs)).detach().numpy(), rtol=1e-6)

    np.save(tmp_path / "obs.npy", obs)
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path / "policy.pt2"), str(tmp_path / "obs.npy"),
         str(tmp_path / "act.npy")],
        check=True, cwd=tmp_path, timeout=120,
    )
    actions = np.load(tmp_path / "act.npy")
    np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-6)
    if env_id == "CartPole-v1":
        assert actions.dtype == np.int64 and actions.shape == (5,)
        assert set(actions.tolist()) <= {0, 1}
        assert info["output"] == "action int64 [B]"
    else:
        assert actions.dtype == np.float32 and actions.shape == (5, 1)
        assert np.all(np.abs(actions) <= 2.0)
        assert info["output"] == "action float32 [B, A]"
    assert info["input"]["shape"] == ["B", *observation_space.shape]


def test_exported_policy_takes_any_batch_size(tmp_path):
    observation_space, action_space = _spaces("CartPole-v1")
    policy = build_policy(PolicyConfig(hidden=(8,)), observation_space, action_space)
    export_policy(policy, observation_space, action_space, tmp_path / "p.pt2")
    program = torch.export.load(tmp_path / "p.pt2").module()
    for batch in (1, 3, 64):
        assert program(torch.zeros(batch, 4)).shape == (batch,)


def _run_dir_with_policy(tmp_path):
    config = RunConfig(name="exp", env=EnvConfig(id="CartPole-v1", num_envs=1), policy=PolicyConfig(hidden=(8,)))
    run_dir = RunDir.create(tmp_path, config.name)
    run_dir.write_config(config)
    observation_space, action_space = _spaces("CartPole-v1")
    torch.manual_seed(3)
    policy = build_policy(config.policy, observation_space, action_space)
    torch.save(policy.state_dict(), run_dir.policy_state_path)
    return run_dir, policy


def test_export_run_rebuilds_the_policy_from_the_run_directory(tmp_path):
    run_dir, policy = _run_dir_with_policy(tmp_path)
    path = export_run(run_dir.path)
    assert path == run_dir.policy_path
    obs = torch.randn(7, 4)
    program = torch.export.load(path).module()
    assert torch.equal(program(obs), policy(obs).argmax(-1))
    info = json.loads(run_dir.policy_info_path.read_text())
    assert info["action_space"] == {"type": "Discrete", "n": 2, "start": 0, "dtype": "int64"}
    assert info["policy"] == "QNetwork"


def test_export_command_reexports_and_reports_a_missing_policy(tmp_path, capsys):
    run_dir, _ = _run_dir_with_policy(tmp_path)
    assert main(["export", str(run_dir.path)]) == 0
    assert f"exported {run_dir.policy_path}" in capsys.readouterr().out
    run_dir.policy_state_path.unlink()
    assert main(["export", str(run_dir.path)]) == 1
    assert "policy_state.pt' does not exist: the run saved no policy yet" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere")]) == 1
    assert "run directory" in capsys.readouterr().err


def test_load_exported_takes_one_observation_or_a_batch_in_any_float_dtype(tmp_path):
    observation_space, action_space = _spaces("CartPole-v1")
    torch.manual_seed(5)
    policy = build_policy(PolicyConfig(hidden=(8,)), observation_space, action_space)
    export_policy(policy, observation_space, action_space, tmp_path / "policy.pt2")
    act = load_exported(tmp_path / "policy.pt2")
    assert (act.obs_shape, act.dtype) == ((4,), torch.float32)
    observation_space.seed(2)
    batch = np.stack([observation_space.sample() for _ in range(6)])
    expected = policy(torch.as_tensor(batch)).argmax(-1)
    assert torch.equal(act(batch), expected)
    assert torch.equal(act(batch.astype(np.float64)), expected)
    assert [int(act(obs)) for obs in batch] == expected.tolist()
    assert act(torch.as_tensor(batch[0], dtype=torch.float64)).shape == ()
    with pytest.raises(ValueError) as raised:
        act(np.zeros((2, 3)))
    assert str(raised.value) == ("policy.pt2: observation of shape [2, 3]: pass one observation of shape [4] "
                                 "or a batch [B, 4]")


def test_load_exported_refuses_floats_for_an_image_policy(tmp_path):
    image = gymnasium.spaces.Box(0, 255, (3, 8, 8), np.uint8)
    policy = build_policy(PolicyConfig(hidden=(8,)), image, gymnasium.spaces.Discrete(2))
    export_policy(policy, image, gymnasium.spaces.Discrete(2), tmp_path / "policy.pt2")
    act = load_exported(tmp_path)  # a directory holding policy.pt2 works too
    assert act(np.zeros((3, 8, 8), np.uint8)).shape == ()
    with pytest.raises(ValueError) as raised:
        act(np.zeros((3, 8, 8), np.float32))
    assert str(raised.value) == ("policy.pt2: observation of dtype torch.float32: the policy takes torch.uint8 "
                                 "observations, as the env gives them; pass those")


def test_export_of_a_users_own_network(tmp_path, monkeypatch):
    (tmp_path / "ex_nets.py").write_text(
        "from torch import nn\n"
        "class Actor(nn.Module):\n"
        "    def __init__(self, d, a):\n"
        "        super().__init__()\n"
        "        self.mean, self.log_std = nn.Linear(d, a), nn.Linear(d, a)\n"
        "    def forward(self, obs):\n"
        "        return self.mean(obs), self.log_std(obs)\n"
        "def make_actor(observation_space, action_space):\n"
        "    return Actor(observation_space.shape[0], action_space.shape[0])\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    observation_space, action_space = _spaces("Pendulum-v1")
    torch.manual_seed(4)
    actor = build_policy(PolicyConfig(type="ex_nets:make_actor"), observation_space, action_space)
    info = export_policy(actor, observation_space, action_space, tmp_path / "policy.pt2")
    assert info["policy"] == "Actor" and info["output"] == "action float32 [B, A]"
    obs = torch.randn(5, 3)
    program = torch.export.load(tmp_path / "policy.pt2").module()
    # the mode of the squashed Gaussian, rescaled to Pendulum's [-2, 2]
    torch.testing.assert_close(program(obs), torch.tanh(actor(obs)[0]) * 2.0)
