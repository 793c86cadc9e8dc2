"""Env construction from ``EnvConfig``: ids, callables, wrappers, seeds, vector envs."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

from rlfleet.collector.config import EnvConfig
from rlfleet.collector.envs import VectorStepper, derive_seeds, make_env, make_vector_env, reset_vector_env
from rlfleet.collector.testing import CountingEnv

COUNTING = "rlfleet.collector.testing:CountingEnv"


def not_an_env(**kwargs):
    return {"kwargs": kwargs}


def test_registered_id_with_kwargs_and_seed():
    env = make_env(EnvConfig(id="CartPole-v1", kwargs={"max_episode_steps": 7}), seed=3)
    try:
        assert env.spec.id == "CartPole-v1" and env.spec.max_episode_steps == 7
        first, _ = env.reset(seed=3)
        again = make_env(EnvConfig(id="CartPole-v1"), seed=3)
        assert np.array_equal(first, again.reset(seed=3)[0])
    finally:
        env.close()


def test_module_callable_with_kwargs():
    env = make_env(EnvConfig(id=COUNTING, kwargs={"max_length": 3, "num_actions": 4}))
    assert isinstance(env, CountingEnv)
    assert env.max_length == 3 and env.action_space == gymnasium.spaces.Discrete(4)


def test_wrappers_by_name_mapping_and_path():
    cfg = EnvConfig(
        id="CartPole-v1",
        wrappers=["RecordEpisodeStatistics", {"type": "TimeLimit", "max_episode_steps": 4},
                  "gymnasium.wrappers:FlattenObservation"],
    )
    env = make_env(cfg, seed=0)
    assert isinstance(env, gymnasium.wrappers.FlattenObservation)
    assert isinstance(env.env, gymnasium.wrappers.TimeLimit)
    assert isinstance(env.env.env, gymnasium.wrappers.RecordEpisodeStatistics)
    steps = 0
    truncated = terminated = False
    while not (truncated or terminated):
        _, _, terminated, truncated, _ = env.step(0)
        steps += 1
    assert steps <= 4


@pytest.mark.parametrize(
    ("env_id", "wrappers", "match"),
    [
        ("CartPole-v9000", (), r"env.id 'CartPole-v9000' is not a registered gymnasium id \(close matches: \[.*'CartPole-v1'.*\]\); use a registered id"),
        ("cartpole-V1", (), r"'cartpole-V1' is not a registered gymnasium id \(close matches: \['CartPole-v1', 'CartPole-v0'"),
        ("xyzzy_nothing", (), r"'xyzzy_nothing' is not a registered gymnasium id \(no close match"),
        ("no_such_module_xyz:Env", (), r"env.id 'no_such_module_xyz:Env': cannot import module 'no_such_module_xyz'"),
        ("rlfleet.collector.testing:Missing", (), r"the module has no callable 'Missing'"),
        ("tests.test_envs:not_an_env", (), r"returned dict, not a gymnasium.Env"),
        ("CartPole-v1", ("FlattenObservaton",), r"env.wrappers\[0\] = 'FlattenObservaton' is not in gymnasium.wrappers \(close matches: \['FlattenObservation'"),
    ],
)
def test_bad_env_config_names_the_problem(env_id, wrappers, match):
    with pytest.raises(ValueError, match=match):
        make_env(EnvConfig(id=env_id, wrappers=wrappers))


def test_derive_seeds_distinct_and_reproducible():
    a = derive_seeds(0, 64)
    assert a == derive_seeds(0, 64) and len(set(a)) == 64
    assert derive_seeds(0, 4, salt=(1, 0)) != derive_seeds(0, 4, salt=(0, 1))
    assert all(0 <= s < 2**32 for s in a)
    with pytest.raises(ValueError, match=r"seed = -1: must be an integer >= 0"):
        derive_seeds(-1, 2)


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_vector_env_seeds_each_env_distinctly(vectorization):
    cfg = EnvConfig(id=COUNTING, num_envs=3, vectorization=vectorization)
    venv, obs = reset_vector_env(cfg, seed=5)
    try:
        assert obs[:, 0].tolist() == derive_seeds(5, 3)
        assert obs[:, 1:].tolist() == [[0, 0]] * 3
        assert venv.autoreset_mode == gymnasium.vector.AutoresetMode.SAME_STEP
    finally:
        venv.close()
    venv = make_vector_env(EnvConfig(num_envs=2), seed=1)
    try:
        assert venv.num_envs == 2
        _, _, _, _, _ = venv.step(np.array([0, 1]))
    finally:
        venv.close()


def test_same_step_autoreset_reports_true_final_observation():
    venv, obs = reset_vector_env(EnvConfig(id=COUNTING, kwargs={"max_length": 1}, num_envs=2), seed=0)
    try:
        # every episode lasts one step: the step returns the reset obs and the final obs in infos
        nxt, _, term, trunc, infos = venv.step(np.array([0, 0]))
        assert (term | trunc).all()
        assert nxt[:, 1:].tolist() == [[1, 0], [1, 0]]
        assert [o[1:].tolist() for o in infos["final_obs"]] == [[0, 1], [0, 1]]
    finally:
        venv.close()


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_vector_stepper_matches_the_vector_env_step_for_step(vectorization):
    kwargs = {"max_length": 3}
    reference, ref_obs = reset_vector_env(EnvConfig(id=COUNTING, kwargs=kwargs, num_envs=3), seed=4)
    venv, obs = reset_vector_env(
        EnvConfig(id=COUNTING, kwargs=kwargs, num_envs=3, vectorization=vectorization), seed=4)
    try:
        stepper = VectorStepper(venv)
        assert np.array_equal(obs, ref_obs)
        ends = 0
        for _ in range(12):
            want_obs, want_reward, want_term, want_trunc, infos = reference.step(np.array([0, 1, 0]))
            got_next = np.empty_like(obs)
            reward, term, trunc, resets = stepper.step([0, 1, 0], got_next)
            assert reward.dtype == np.float64 and reward.tolist() == want_reward.tolist()
            assert term.tolist() == want_term.tolist() and trunc.tolist() == want_trunc.tolist()
            done = want_term | want_trunc
            assert sorted(resets) == np.flatnonzero(done).tolist()
            for j in range(3):
                # next holds the true final observation; resets the first of the next episode
                want_next = infos["final_obs"][j] if done[j] else want_obs[j]
                assert got_next[j].tolist() == want_next.tolist()
                if done[j]:
                    assert resets[j].tolist() == want_obs[j].tolist() and resets[j][2] == 0
            ends += int(done.sum())
        assert ends >= 12  # episodes of 1-3 steps: many resets were checked
    finally:
        venv.close()
        reference.close()


def test_vector_stepper_refuses_a_next_step_vector_env():
    venv = gymnasium.vector.SyncVectorEnv([lambda: CountingEnv()])
    try:
        with pytest.raises(ValueError, match=r"VectorStepper: the vector env autoresets in "
                           r"AutoresetMode.NEXT_STEP mode; build it with reset_vector_env \(SAME_STEP\)"):
            VectorStepper(venv)
    finally:
        venv.close()
