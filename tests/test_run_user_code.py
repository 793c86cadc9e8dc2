"""A user's own env and own network, in the working directory, without ``PYTHONPATH``.

The unit tests build them the way every process does (``make_env``, ``build_policy``)
from a temporary working directory, and check the errors a wrong factory gets. The slow
test writes README's example files (an env, a Q-network factory, a config) into a
directory and runs ``rlfleet run``, ``rlfleet run --resume`` and ``rlfleet export`` from it
as a user would: the driver and every Ray actor import the two files from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch

from rlfleet.collector.config import EnvConfig, PolicyConfig
from rlfleet.collector.envs import make_env
from rlfleet.collector.policies import build_policy
from test_readme_python import readme_blocks

ENV_FILE = '''
import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    """Walk right to the end of a corridor: reward 1 there, 30 steps at most."""

    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)  # 0: left, 1: right

    def __init__(self, length=5):
        self.length, self.pos, self.t = length, 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = 0, 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.pos, self.t = max(0, self.pos + (1 if action == 1 else -1)), self.t + 1
        done = self.pos == self.length
        return np.array([self.pos / self.length], np.float32), float(done), done, self.t >= 30, {}
'''

NETS_FILE = '''
from torch import nn


def make_q(observation_space, action_space, width=32):
    """Q-values [B, n] from observations [B, D]."""
    return nn.Sequential(nn.Linear(observation_space.shape[0], width), nn.ReLU(),
                         nn.Linear(width, int(action_space.n)))


def make_wrong(observation_space, action_space):
    return nn.Linear(observation_space.shape[0], 3)


def make_actor(observation_space, action_space):
    return Actor(observation_space.shape[0], action_space.shape[0])


def not_a_module(observation_space, action_space):
    return "a string"


class Actor(nn.Module):
    def __init__(self, d, a):
        super().__init__()
        self.mean, self.log_std = nn.Linear(d, a), nn.Linear(d, a)

    def forward(self, obs):
        obs = obs.float()
        return self.mean(obs), self.log_std(obs)
'''


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    """A working directory holding ``uc_corridor.py`` and ``uc_nets.py``, and nothing on sys.path."""
    (tmp_path / "uc_corridor.py").write_text(ENV_FILE)
    (tmp_path / "uc_nets.py").write_text(NETS_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in ("uc_corridor", "uc_nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def test_env_and_network_of_the_working_directory_are_found_without_pythonpath(user_dir):
    env = make_env(EnvConfig(id="uc_corridor:Corridor", kwargs={"length": 3}), seed=0)
    assert env.unwrapped.length == 3
    q = build_policy(PolicyConfig(type="uc_nets:make_q", kwargs={"width": 8}), env.observation_space, env.action_space)
    assert {k: tuple(v.shape) for k, v in q.state_dict().items()} == {
        "0.weight": (8, 1), "0.bias": (8,), "2.weight": (2, 8), "2.bias": (2,)}
    assert q(torch.zeros(5, 1)).shape == (5, 2)
    assert q.action_start == 0  # set for DQN and the exported program


def test_a_continuous_factory_returns_mean_and_log_std(user_dir):
    box = gymnasium.spaces.Box(-2.0, 2.0, (2,), np.float32)
    actor = build_policy(PolicyConfig(type="uc_nets:make_actor"), gymnasium.spaces.Box(-1, 1, (3,), np.float64), box)
    mean, log_std = actor(torch.zeros(4, 3, dtype=torch.float64))
    assert mean.shape == log_std.shape == (4, 2)


BAD_FACTORIES = [
    ("wrong_shape", "uc_nets:make_wrong", {},
     "policy.type 'uc_nets:make_wrong': for Discrete(2) the module must map observations [B, 1] to "
     "Q-values [B, 2]; on B=2 it returned a tensor of shape [2, 3], expected a tensor of shape [2, 2]"),
    ("not_a_module", "uc_nets:not_a_module", {},
     "policy.type 'uc_nets:not_a_module' returned str, not a torch.nn.Module"),
    ("bad_kwargs", "uc_nets:make_q", {"depth": 3},
     "policy.type 'uc_nets:make_q': calling it as factory(observation_space, action_space, "
     "**policy.kwargs) with kwargs {'depth': 3} failed: make_q() got an unexpected keyword argument 'depth'"),
    ("no_such_callable", "uc_nets:make_nothing", {},
     "policy.type 'uc_nets:make_nothing': the module has no callable 'make_nothing'; name a function "
     "(or class) returning an nn.Module"),
]


@pytest.mark.parametrize("policy_type, kwargs, message", [c[1:] for c in BAD_FACTORIES],
                         ids=[c[0] for c in BAD_FACTORIES])
def test_a_factory_that_does_not_fit_is_refused_with_what_it_returned(user_dir, policy_type, kwargs, message):
    env = make_env(EnvConfig(id="uc_corridor:Corridor"))
    with pytest.raises(ValueError) as raised:
        build_policy(PolicyConfig(type=policy_type, kwargs=kwargs), env.observation_space, env.action_space)
    assert str(raised.value) == message


def test_a_module_that_is_nowhere_names_the_working_directory(user_dir):
    with pytest.raises(ValueError) as raised:
        make_env(EnvConfig(id="uc_missing:Env"))
    assert str(raised.value).startswith(
        "env.id 'uc_missing:Env': cannot import module 'uc_missing' (No module named 'uc_missing'); "
        f"it is searched in the working directory ({user_dir}) first")


def test_policy_config_refuses_unknown_types_and_stray_kwargs():
    with pytest.raises(ValueError) as raised:
        PolicyConfig(type="transformer")
    assert str(raised.value) == ("policy.type = 'transformer': must be one of ['mlp', 'cnn', 'nature_cnn'] or "
                                 "'package.module:factory' naming a function that returns your own nn.Module")
    with pytest.raises(ValueError) as raised:
        PolicyConfig(type="mlp", kwargs={"width": 3})
    assert str(raised.value) == ("policy.kwargs = {'width': 3}: only a policy.type of your own "
                                 "('package.module:factory') takes kwargs; 'mlp' takes policy.hidden")


def _rlfleet(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # no PYTHONPATH, no RAY_ADDRESS: the files are found because they are in the working directory
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_resume_and_export_with_the_readme_env_and_network(tmp_path):
    # README's own files (my_corridor.py, my_nets.py, corridor.yaml), as a reader writes them
    for _, _, code, name in readme_blocks():
        if name is not None:
            (tmp_path / name).write_text(code)

    first = _rlfleet(tmp_path, "run", "corridor.yaml", "run.dir=runs", "ray.include_dashboard=false", "--plain")
    assert first.returncode == 0, first.stdout + first.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "total_frames" and summary["learner_steps"] > 0

    resumed = _rlfleet(tmp_path, "run", "--resume", str(run_dir.relative_to(tmp_path)), "run.total_frames=1200",
                       "ray.include_dashboard=false", "--plain")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "total_frames" and summary["frames"] >= 1200

    # the checkpoint and the final weights are the user's module's own state_dict
    keys = {"0.weight", "0.bias", "2.weight", "2.bias"}
    state = torch.load(run_dir / "policy_state.pt", weights_only=True)
    assert set(state) == keys
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert latest["steps"] == summary["learner_steps"]
    assert {k for k in keys if any(name.endswith("." + k) for name in latest["algorithm"])} == keys

    (run_dir / "policy.pt2").unlink()
    exported = _rlfleet(tmp_path, "export", str(run_dir.relative_to(tmp_path)))
    assert exported.returncode == 0, exported.stderr
    program = torch.export.load(run_dir / "policy.pt2").module()
    obs = torch.tensor([[0.0], [0.4], [0.8]])
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    net.load_state_dict(state)
    assert torch.equal(program(obs), net(obs).argmax(-1))

