"""``env.vectorization: envpool``: real EnvPool envs behind the collector's SAME_STEP contract.

Skipped where envpool is not installed (the default CI). EnvPool ships the Atari ROMs
(``envpool_assets``), so Pong runs offline.
"""

from __future__ import annotations

import sys

import gymnasium
import numpy as np
import pytest
import torch
from tensordict import TensorDict

envpool = pytest.importorskip("envpool")

from rlfleet.collector.collector import Collector  # noqa: E402
from rlfleet.collector.config import EnvConfig, ExplorationConfig, PolicyConfig  # noqa: E402
from rlfleet.collector.envpool_env import EnvPoolVectorEnv  # noqa: E402
from rlfleet.collector.envpool_record import record_envpool  # noqa: E402
from rlfleet.collector.envs import VectorStepper, derive_seeds, make_env, reset_vector_env  # noqa: E402

# CartPole: an episode terminates once |x| > 2.4 or |theta| > 12 degrees; resets draw
# every component uniformly from [-0.05, 0.05].
X_LIMIT, THETA_LIMIT, RESET_LIMIT = 2.4, 12 * 2 * np.pi / 360, 0.05
MAX_STEPS = 25  # short CartPole episodes, so truncations occur next to terminations

pytestmark = [pytest.mark.atari, pytest.mark.usefixtures("one_torch_thread")]


def cartpole_fell(obs: np.ndarray) -> np.ndarray:
    return (np.abs(obs[..., 0]) > X_LIMIT) | (np.abs(obs[..., 2]) > THETA_LIMIT)


def check_trajectories(rec: dict[str, np.ndarray], num_envs: int) -> None:
    """Per env, in order: each row follows the previous one (same episode: obs is the
    previous next_obs; after an end: next episode, step 0)."""
    for j in range(num_envs):
        rows = np.flatnonzero(rec["env"] == j)
        for a, b in zip(rows[:-1], rows[1:]):
            if rec["terminated"][a] or rec["truncated"][a]:
                assert (rec["episode"][b], rec["step"][b]) == (rec["episode"][a] + 1, 0), (j, a)
            else:
                assert (rec["episode"][b], rec["step"][b]) == (rec["episode"][a], rec["step"][a] + 1), (j, a)
                assert np.array_equal(rec["observation"][b], rec["next_observation"][a]), (j, a)


def test_cartpole_stepper_gives_same_step_transitions():
    k, steps = 4, 150
    rec = record_envpool("CartPole-v1", k, steps, seed=11, max_episode_steps=MAX_STEPS)
    assert rec["observation"].shape == (k * steps, 4) and rec["observation"].dtype == np.float32
    # one transition per env and step, in step order
    assert rec["env"].tolist() == list(range(k)) * steps
    check_trajectories(rec, k)
    term, trunc = rec["terminated"], rec["truncated"]
    assert not (term & trunc).any()
    # every terminated row holds the true final observation: the pole is down
    assert term.sum() >= 10 and cartpole_fell(rec["next_observation"][term]).all()
    # truncations come at the time limit (where the pole may fall too: EnvPool then
    # reports truncated, not terminated)
    assert trunc.sum() >= 1 and (rec["step"][trunc] == MAX_STEPS - 1).all()
    # no row but an end has a fallen pole, and no episode outlasts the limit
    assert not cartpole_fell(rec["next_observation"][~(term | trunc)]).any()
    assert rec["step"].max() == MAX_STEPS - 1
    # each episode starts from a reset observation
    starts = rec["step"] == 0
    assert starts.sum() >= k + 10 and (np.abs(rec["observation"][starts]) <= RESET_LIMIT).all()
    # CartPole pays 1 per step
    assert (rec["reward"] == 1.0).all()


def test_stepper_matches_envpool_stepped_env_by_env():
    """The shim's stream is EnvPool's own, with its reset steps taken out."""
    k, steps, seed = 3, 80, 5
    rec = record_envpool("CartPole-v1", k, steps, seed=seed, max_episode_steps=MAX_STEPS)
    env_seeds = np.asarray(derive_seeds(seed, k), dtype=np.uint32).view(np.int32).tolist()
    raw = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=k, seed=env_seeds,
                       max_episode_steps=MAX_STEPS, num_threads=1)
    try:
        first, _ = raw.reset()
        resets = 0
        for j in range(k):
            rows = np.flatnonzero(rec["env"] == j)
            assert np.array_equal(rec["observation"][rows[0]], first[j])
            for a in rows:
                obs, reward, term, trunc, _ = raw.step(np.array([rec["action"][a]]), np.array([j]))
                assert np.array_equal(obs[0], rec["next_observation"][a])
                assert (reward[0], term[0], trunc[0]) == (rec["reward"][a], rec["terminated"][a], rec["truncated"][a])
                if term[0] or trunc[0]:
                    # EnvPool's next step of env j is its reset, which the shim took for us
                    obs, _, _, _, info = raw.step(np.array([0]), np.array([j]))
                    assert info["elapsed_step"][0] == 0
                    if a != rows[-1]:
                        assert np.array_equal(obs[0], rec["observation"][a + k])
                        resets += 1
        assert resets >= 5
    finally:
        raw.close()


def test_gymnasium_step_reports_final_and_reset_observations():
    venv, obs = reset_vector_env(EnvConfig(id="CartPole-v1", num_envs=3, vectorization="envpool"), seed=2)
    try:
        assert isinstance(venv, EnvPoolVectorEnv)
        assert venv.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.SAME_STEP
        assert venv.single_observation_space.shape == (4,) and venv.single_action_space == gymnasium.spaces.Discrete(2)
        assert obs.shape == (3, 4) and (np.abs(obs) <= RESET_LIMIT).all()
        ended = 0
        for _ in range(60):
            nxt, reward, term, trunc, infos = venv.step(np.zeros(3, dtype=np.int64))
            for j in np.flatnonzero(term | trunc):
                assert cartpole_fell(infos["final_obs"][j]) and (np.abs(nxt[j]) <= RESET_LIMIT).all()
                ended += 1
        assert ended >= 3  # always pushing left: every episode ends within ~10 steps
        with pytest.raises(ValueError, match=r"reset\(seed=3, options=None\): EnvPool fixes its seeds"):
            venv.reset(seed=3)
    finally:
        venv.close()
    assert venv.closed


class ListSink:
    def __init__(self) -> None:
        self.batches: list[TensorDict] = []

    def extend(self, td: TensorDict) -> None:
        self.batches.append(td)


def test_collector_stores_every_transition_with_true_final_observations():
    k, frames_per_batch, batches = 4, 64, 6
    env = EnvConfig(id="CartPole-v1", kwargs={"max_episode_steps": MAX_STEPS}, num_envs=k, vectorization="envpool")
    sink = ListSink()
    c = Collector(env, PolicyConfig(hidden=(8,)), sink, seed=1, frames_per_batch=frames_per_batch,
                  init_random_frames=64, exploration=ExplorationConfig(start=0.5, end=0.1, frames=100))
    try:
        assert c.venv.single_action_space == gymnasium.spaces.Discrete(2)
        assert c.policy(torch.zeros(1, 4)).shape == (1, 2)  # Q-values of the 2 actions
        for _ in range(batches):
            assert c.run_batch() == frames_per_batch
    finally:
        c.close()
    rows = torch.cat(sink.batches)
    assert rows.shape == (frames_per_batch * batches,)
    obs, nxt = rows["observation"].numpy(), rows["next", "observation"].numpy()
    step, eid = rows["step"].numpy(), rows["episode_id"].numpy()
    term, trunc = rows["next", "terminated"][:, 0].numpy(), rows["next", "truncated"][:, 0].numpy()
    assert (rows["next", "done"][:, 0].numpy() == (term | trunc)).all()
    assert term.sum() >= 3 and (term | trunc).sum() >= 12 and cartpole_fell(nxt[term]).all()
    assert trunc.sum() >= 1 and (step[trunc] == MAX_STEPS - 1).all()
    assert not cartpole_fell(nxt[~(term | trunc)]).any()
    # each episode: steps 0, 1, ... in order, each obs the previous next obs, ended at most once
    episodes = 0
    for e in np.unique(eid):
        (i,) = np.nonzero(eid == e)  # batches are env-major: an episode's rows are in order
        assert step[i].tolist() == list(range(len(i)))
        assert np.array_equal(obs[i[1:]], nxt[i[:-1]])
        assert (np.abs(obs[i[0]]) <= RESET_LIMIT).all()
        assert not (term | trunc)[i[:-1]].any()
        episodes += 1
    stats = c.stats()
    assert episodes == k + stats["episodes"]  # the first of each env, then one per end
    assert stats["episodes"] == int((term | trunc).sum())
    assert sum(stats["recent_lengths"]) == int((step[term | trunc] + 1).sum())


def test_pong_frames_are_stacked_and_resets_are_fresh():
    k, steps, limit = 2, 250, 100
    rec = record_envpool("Pong-v5", k, steps, seed=7, max_episode_steps=limit)
    assert rec["observation"].shape == (k * steps, 4, 84, 84) and rec["observation"].dtype == np.uint8
    assert set(np.unique(rec["action"]).tolist()) <= set(range(6))
    check_trajectories(rec, k)
    # within an episode each stack shifts by one frame: next[:-1] == obs[1:]
    assert np.array_equal(rec["next_observation"][:, :-1], rec["observation"][:, 1:])
    # random Pong lasts far longer than `limit`: every episode is truncated at it
    ends = rec["terminated"] | rec["truncated"]
    assert not rec["terminated"].any() and (rec["step"][ends] == limit - 1).all() and ends.sum() == 2 * k
    # a reset stack repeats its first frame
    first = rec["observation"][rec["step"] == 0]
    assert len(first) == 3 * k and (first == first[:, :1]).all()


def test_pong_collector_builds_a_cnn_from_envpool_spaces():
    env = EnvConfig(id="Pong-v5", num_envs=2, vectorization="envpool")
    sink = ListSink()
    c = Collector(env, PolicyConfig(type="nature_cnn"), sink, seed=0, frames_per_batch=16)
    try:
        assert c.venv.single_observation_space == gymnasium.spaces.Box(0, 255, (4, 84, 84), np.uint8)
        assert c.venv.single_action_space == gymnasium.spaces.Discrete(6)
        assert c.run_batch() == 16
    finally:
        c.close()
    (batch,) = sink.batches
    assert batch["observation"].dtype == torch.uint8 and batch["observation"].shape == (16, 4, 84, 84)
    assert np.array_equal(batch["next", "observation"][:, :-1].numpy(), batch["observation"][:, 1:].numpy())
    single = make_env(env, seed=0)  # what the driver builds to read the spaces
    try:
        assert single.observation_space == c.venv.single_observation_space
        assert single.action_space == c.venv.single_action_space
        obs, _ = single.reset(seed=3)
        assert obs.shape == (4, 84, 84)
        assert single.step(1)[0].shape == (4, 84, 84)
    finally:
        single.close()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: EnvConfig(id="Pong-v5", vectorization="envpool", wrappers=["FrameStackObservation"]),
         r"env.wrappers = \['FrameStackObservation'\] with env.vectorization = 'envpool': EnvPool envs take "
         r"no gymnasium wrappers; set env.wrappers to \[\]"),
        (lambda: reset_vector_env(EnvConfig(id="Pong-v9", vectorization="envpool"), seed=0),
         r"env.id 'Pong-v9' is not an envpool task id \(close matches: \['Pong-v5'"),
        (lambda: reset_vector_env(EnvConfig(id="cartpole-v1", vectorization="envpool"), seed=0),
         r"env.id 'cartpole-v1' is not an envpool task id \(close matches: \['CartPole-v1'"),
        (lambda: reset_vector_env(EnvConfig(id="xyzzy_nothing", vectorization="envpool"), seed=0),
         r"'xyzzy_nothing' is not an envpool task id \(no close match; see envpool.list_all_envs\(\)\)"),
        (lambda: make_env(EnvConfig(id="Pong-v5", vectorization="envpool", kwargs={"stack_size": 2})),
         r"env.kwargs = \{'stack_size': 2\}: envpool task 'Pong-v5' rejects them .*its kwargs are \[.*'stack_num'"),
        (lambda: reset_vector_env(EnvConfig(id="CartPole-v1", vectorization="envpool", kwargs={"num_envs": 8}), seed=0),
         r"env.kwargs\['num_envs'\] = 8: not allowed with env.vectorization 'envpool' \(set env.num_envs\)"),
        (lambda: reset_vector_env(EnvConfig(id="CartPole-v1", vectorization="envpool", kwargs={"seed": 1}), seed=0),
         r"env.kwargs\['seed'\] = 1: not allowed .*seeds derive from the run's seed"),
        (lambda: record_envpool("CartPole-v1", 2, 0, seed=0), r"record_envpool: steps = 0: must be an integer >= 1"),
    ],
)
def test_bad_envpool_config_names_the_problem(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_missing_envpool_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "envpool", None)  # a real ImportError from the import system
    with pytest.raises(ValueError, match=r"env.vectorization = 'envpool' needs the envpool package, which "
                       r"does not import \(.*\); install it with: pip install \"rlfleet\[envpool\]\""):
        reset_vector_env(EnvConfig(id="CartPole-v1", vectorization="envpool"), seed=0)


def test_vector_stepper_steps_envpool_in_one_call():
    venv, obs = reset_vector_env(EnvConfig(id="CartPole-v1", num_envs=2, vectorization="envpool"), seed=0)
    try:
        stepper = VectorStepper(venv)
        nxt = np.empty_like(obs)
        reward, term, trunc, resets = stepper.step([np.int64(0), np.int64(1)], nxt)
        assert reward.dtype == np.float64 and reward.tolist() == [1.0, 1.0]
        assert term.dtype == bool and trunc.dtype == bool and resets == {}
        assert not np.array_equal(nxt, obs)
    finally:
        venv.close()
