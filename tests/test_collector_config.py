"""Collector-side config dataclasses: defaults, coercions, and bad values."""

from __future__ import annotations

import pytest

from rlfleet.collector.config import CollectorConfig, EnvConfig, ExplorationConfig, PolicyConfig


def test_defaults_match_the_design():
    assert EnvConfig() == EnvConfig(id="CartPole-v1", kwargs={}, num_envs=16, vectorization="sync", wrappers=())
    c = CollectorConfig()
    assert (c.num_workers, c.frames_per_batch, c.device, c.num_gpus, c.init_random_frames) == (2, 1024, "cpu", 0, 5000)
    assert c.exploration == ExplorationConfig("epsilon_greedy", 1.0, 0.05, 50_000, 0.1)
    assert PolicyConfig() == PolicyConfig("mlp", (64, 64))


def test_lists_and_mappings_from_yaml_are_coerced():
    assert PolicyConfig(hidden=[32, 16]).hidden == (32, 16)
    assert EnvConfig(wrappers=["FlattenObservation"]).wrappers == ("FlattenObservation",)
    c = CollectorConfig(exploration={"type": "gaussian", "sigma": 0.2})
    assert c.exploration == ExplorationConfig(type="gaussian", sigma=0.2)
    assert CollectorConfig(device="cuda:1", num_gpus=0.25).device == "cuda:1"


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: EnvConfig(num_envs=0), r"env.num_envs = 0: must be an integer >= 1"),
        (lambda: EnvConfig(num_envs=2.5), r"env.num_envs = 2.5: must be an integer >= 1"),
        (lambda: EnvConfig(vectorization="threads"), r"env.vectorization = 'threads': must be one of \['sync', 'async', 'envpool'\]"),
        (lambda: EnvConfig(id=""), r"env.id = '': must be a gymnasium id"),
        (lambda: EnvConfig(wrappers=[{"max_episode_steps": 3}]), r"env.wrappers\[0\] = .*mapping with a 'type' key"),
        (lambda: CollectorConfig(num_workers=0), r"collector.num_workers = 0: must be an integer >= 1"),
        (lambda: CollectorConfig(frames_per_batch=0), r"collector.frames_per_batch = 0"),
        (lambda: CollectorConfig(device="tpu"), r"collector.device = 'tpu': must be 'cpu', 'cuda' or 'cuda:N'"),
        (lambda: CollectorConfig(device="cuda:x"), r"collector.device = 'cuda:x'"),
        (lambda: CollectorConfig(num_gpus=0.5), r"collector.num_gpus = 0.5 with collector.device = 'cpu'"),
        (lambda: CollectorConfig(num_gpus=-1), r"collector.num_gpus = -1: must be a number >= 0"),
        (lambda: CollectorConfig(init_random_frames=-5), r"collector.init_random_frames = -5"),
        (lambda: ExplorationConfig(type="boltzmann"), r"collector.exploration.type = 'boltzmann': must be one of"),
        (lambda: ExplorationConfig(start=1.5), r"collector.exploration.start = 1.5: must be a number in \[0.0, 1.0\]"),
        (lambda: ExplorationConfig(sigma=-0.1), r"collector.exploration.sigma = -0.1"),
        (lambda: PolicyConfig(type="transformer"), r"policy.type = 'transformer': must be one of \['mlp', 'cnn', 'nature_cnn'\]"),
        (lambda: PolicyConfig(hidden=(64, 0)), r"policy.hidden\[1\] = 0: must be an integer >= 1"),
    ],
)
def test_bad_values_name_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()
