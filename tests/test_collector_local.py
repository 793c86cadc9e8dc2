"""The plain ``Collector`` without Ray: transitions from env to sink, weights, exploration."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from rlfleet.collector.collector import Collector, episode_id
from rlfleet.collector.config import EnvConfig, ExplorationConfig, PolicyConfig
from rlfleet.collector.testing import check_counting_rows, check_counting_stream

COUNTING = "rlfleet.collector.testing:CountingEnv"
MAX_LEN = 5


class ListSink:
    """Keeps every batch it receives, as the buffer would."""

    def __init__(self) -> None:
        self.batches: list[TensorDict] = []

    def extend(self, td: TensorDict) -> None:
        self.batches.append(td)

    def rows(self) -> TensorDict:
        return torch.cat(self.batches)


def counting_collector(sink, *, num_envs=3, frames_per_batch=12, collector_id=0, incarnation=0,
                       seed=0, init_random_frames=0, exploration=None, num_actions=2, vectorization="sync"):
    env = EnvConfig(id=COUNTING, kwargs={"max_length": MAX_LEN, "num_actions": num_actions},
                    num_envs=num_envs, vectorization=vectorization)
    return Collector(env, PolicyConfig(hidden=(8,)), sink, collector_id=collector_id,
                     incarnation=incarnation, seed=seed, frames_per_batch=frames_per_batch,
                     init_random_frames=init_random_frames,
                     exploration=exploration or ExplorationConfig(start=0.5, end=0.1, frames=50))


# Collectors run one torch thread per actor; so do these tests (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_no_step_lost_duplicated_or_reordered(vectorization):
    sink = ListSink()
    c = counting_collector(sink, num_envs=3, frames_per_batch=12, vectorization=vectorization)
    try:
        for _ in range(6):
            assert c.run_batch() == 12
    finally:
        c.close()
    rows = sink.rows()
    assert rows.shape == (72,)
    counts = check_counting_stream(rows, max_length=MAX_LEN)
    assert sorted(counts.values()) == [24, 24, 24]
    done = rows["next", "done"][:, 0]
    assert rows["next", "terminated"][done].any() and rows["next", "truncated"][done].any()
    # one-step episodes (length 1) occur and end with the true final observation
    assert ((rows["step"] == 0) & done).any()
    assert (rows["collector_id"] == 0).all() and (rows["policy_version"] == 0).all()
    stats = c.stats()
    assert stats["frames"] == 72 and stats["batches"] == 6
    assert stats["episodes"] == int(done.sum())
    assert sum(stats["recent_lengths"]) == sum(int(s) + 1 for s in rows["step"][done])


def test_batches_are_env_major_and_rounded_up():
    sink = ListSink()
    c = counting_collector(sink, num_envs=3, frames_per_batch=10)
    try:
        assert c.steps_per_batch == 4
        c.run_batch()
    finally:
        c.close()
    (batch,) = sink.batches
    assert batch.shape == (12,)
    tags = batch["observation"][:, 0].reshape(3, 4)
    # all 4 rows of env 0, then env 1, then env 2
    assert (tags == tags[:, :1]).all() and len(set(tags[:, 0].tolist())) == 3
    # TorchRL's layout (buffer format 2): reward and flags under "next", [N, 1]
    layout = {key: (tuple(v.shape), v.dtype) for key, v in batch.items(include_nested=True, leaves_only=True)}
    assert layout == {
        "observation": ((12, 3), torch.int64),
        "action": ((12,), torch.int64),
        ("next", "observation"): ((12, 3), torch.int64),
        ("next", "reward"): ((12, 1), torch.float32),
        ("next", "terminated"): ((12, 1), torch.bool),
        ("next", "truncated"): ((12, 1), torch.bool),
        ("next", "done"): ((12, 1), torch.bool),
        "episode_id": ((12,), torch.int64),
        "step": ((12,), torch.int64),
        "collector_id": ((12,), torch.int64),
        "policy_version": ((12,), torch.int64),
    }
    assert torch.equal(batch["next", "done"], batch["next", "terminated"] | batch["next", "truncated"])


def test_episode_ids_unique_across_collectors_and_restarts():
    sink = ListSink()
    for cid, inc in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        c = counting_collector(sink, collector_id=cid, incarnation=inc, num_envs=2, frames_per_batch=8)
        try:
            for _ in range(3):
                c.run_batch()
        finally:
            c.close()
    rows = sink.rows()
    # each incarnation starts fresh envs (fresh tags): every env's trajectory is whole
    counts = check_counting_stream(rows, max_length=MAX_LEN)
    assert len(counts) == 8 and set(counts.values()) == {12}
    eids = rows["episode_id"]
    assert set((eids >> 48).tolist()) == {0, 1}
    assert set(((eids >> 32) & 0xFFFF).tolist()) == {0, 1}
    assert episode_id(1, 1, 0) == (1 << 48) | (1 << 32)


def test_same_seed_same_data_other_seed_other_data():
    def run(seed):
        sink = ListSink()
        c = counting_collector(sink, seed=seed, init_random_frames=6)
        try:
            c.run_batch()
            c.run_batch()
        finally:
            c.close()
        return sink.rows()

    a, b, other = run(3), run(3), run(4)
    assert (a == b).all()
    assert not (a["observation"][:, 0] == other["observation"][:, 0]).any()


def test_weights_change_actions_and_stamp_version():
    sink = ListSink()
    c = counting_collector(sink, num_actions=3, exploration=ExplorationConfig(type="greedy"))
    try:
        state = {k: torch.zeros_like(v) for k, v in c.policy.state_dict().items()}
        last_bias = [k for k in state if k.endswith("bias")][-1]
        state[last_bias] = torch.tensor([0.0, 0.0, 1.0])
        c.set_weights({k: v.numpy() for k, v in state.items()}, version=7)
        c.run_batch()
        bad = dict(state)
        bad.pop(last_bias)
        bad["extra.weight"] = torch.zeros(1)
        with pytest.raises(ValueError, match=r"missing keys \['head.2.bias'\], unexpected keys \['extra.weight'\]"):
            c.set_weights(bad, version=8)
        wrong_shape = dict(state, **{last_bias: torch.zeros(4)})
        with pytest.raises(ValueError, match=r"head.2.bias: got \(4,\), policy has \(3,\)"):
            c.set_weights(wrong_shape, version=8)
        assert c.policy_version == 7
    finally:
        c.close()
    (batch,) = sink.batches
    assert (batch["action"] == 2).all()
    assert (batch["policy_version"] == 7).all()


def test_epsilon_schedule_and_random_phase():
    sink = ListSink()
    c = counting_collector(sink, init_random_frames=12,
                           exploration=ExplorationConfig(start=0.8, end=0.2, frames=112))
    try:
        e = c.explorer
        assert [e.epsilon(f) for f in (0, 11)] == [1.0, 1.0]
        assert e.epsilon(12) == pytest.approx(0.8 - 0.6 * 12 / 112)
        assert e.epsilon(56) == pytest.approx(0.5)
        assert e.epsilon(112) == pytest.approx(0.2) and e.epsilon(10_000) == pytest.approx(0.2)
    finally:
        c.close()


def test_epsilon_greedy_action_frequencies():
    """Epsilon 0.3 over Discrete(3, start=1) with a policy that always prefers action 2:
    2 with probability 0.7 + 0.3 / 3, actions 1 and 3 with 0.1 each (chi-square, p=0.001)."""
    import gymnasium
    import numpy as np

    from rlfleet.collector.exploration import Explorer

    explorer = Explorer(ExplorationConfig(start=0.3, end=0.3, frames=0), gymnasium.spaces.Discrete(3, start=1),
                        num_envs=64, init_random_frames=0, seed=11)
    q = torch.tensor([[0.0, 1.0, 0.5]]).expand(64, 3)
    actions = np.concatenate([explorer.act(lambda obs: q, torch.zeros(64, 4), 100) for _ in range(500)])
    assert actions.dtype == np.int64 and actions.shape == (32_000,)
    counts = np.array([(actions == a).sum() for a in (1, 2, 3)])
    assert counts.sum() == 32_000
    expected = np.array([0.1, 0.8, 0.1]) * 32_000
    assert ((counts - expected) ** 2 / expected).sum() < 13.82, counts  # 2 degrees of freedom
    greedy_only = Explorer(ExplorationConfig(type="greedy"), gymnasium.spaces.Discrete(3, start=1),
                           num_envs=64, init_random_frames=0, seed=11)
    assert (greedy_only.act(lambda obs: q, torch.zeros(64, 4), 100) == 2).all()


@pytest.mark.parametrize("kind", ["gaussian", "sample"])
def test_box_actions_stay_in_bounds(kind):
    sink = ListSink()
    env = EnvConfig(id="Pendulum-v1", num_envs=4)
    c = Collector(env, PolicyConfig(hidden=(16,)), sink, frames_per_batch=40, init_random_frames=20,
                  exploration=ExplorationConfig(type=kind, sigma=0.05))
    try:
        c.run_batch()
        c.run_batch()
    finally:
        c.close()
    actions = sink.rows()["action"]
    assert actions.shape == (80, 1) and actions.dtype == torch.float32
    assert (actions.abs() <= 2.0).all()
    assert len(set(actions.flatten().tolist())) == 80


def test_exploration_must_fit_action_space():
    with pytest.raises(ValueError, match=r"exploration.type = 'epsilon_greedy' does not fit the action space Box"):
        Collector(EnvConfig(id="Pendulum-v1", num_envs=1), PolicyConfig(), ListSink())
    with pytest.raises(ValueError, match=r"exploration.type = 'sample' does not fit the action space Discrete\(2\)"):
        Collector(EnvConfig(num_envs=1), PolicyConfig(), ListSink(),
                  exploration=ExplorationConfig(type="sample"))


def test_cartpole_rows_chain_within_each_env():
    sink = ListSink()
    c = Collector(EnvConfig(num_envs=4), PolicyConfig(), sink, frames_per_batch=200,
                  init_random_frames=100)
    try:
        c.run_batch()
    finally:
        c.close()
    rows = sink.rows()
    obs, nxt, done = rows["observation"], rows["next", "observation"], rows["next", "done"][:, 0]
    for j in range(4):
        seg = slice(50 * j, 50 * (j + 1))
        o, n, d = obs[seg], nxt[seg], done[seg]
        # inside an episode the next observation is the following row's observation
        assert torch.equal(n[:-1][~d[:-1]], o[1:][~d[:-1]])
        # after an end the following row is a fresh reset (|x| <= 0.05), not the final obs
        assert (o[1:][d[:-1]].abs() <= 0.05).all()
        assert not (n[d].abs() <= 0.05).all(dim=1).any()
    assert int(done.sum()) == c.episodes
    assert sorted(int(s) + 1 for s in rows["step"][done]) == sorted(c.stats()["recent_lengths"])


def test_collector_feeds_a_local_replay_buffer(tmp_path):
    rb_module = pytest.importorskip("rlfleet.buffer.replay_buffer")
    rb = rb_module.ReplayBuffer.create(tmp_path / "rb", capacity=1000, seed=0)
    c = counting_collector(rb, num_envs=4, frames_per_batch=40)
    try:
        for _ in range(5):
            c.run_batch()
    finally:
        c.close()
    assert len(rb) == 200
    counts = check_counting_stream(rb[0:200], max_length=MAX_LEN)
    assert sorted(counts.values()) == [50] * 4
    sample = rb.sample(64)
    check_counting_rows(sample, max_length=MAX_LEN)
    rb.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collector_on_cuda_produces_the_same_rows_as_on_cpu():
    def run(device):
        sink = ListSink()
        env = EnvConfig(id=COUNTING, kwargs={"max_length": MAX_LEN}, num_envs=4)
        c = Collector(env, PolicyConfig(hidden=(8,)), sink, frames_per_batch=40, device=device,
                      exploration=ExplorationConfig(type="greedy"))
        try:
            assert next(c.policy.parameters()).device.type == device.split(":")[0]
            for _ in range(3):
                c.run_batch()
        finally:
            c.close()
        return sink.rows()

    on_cuda = run("cuda:0")
    check_counting_stream(on_cuda, max_length=MAX_LEN)
    assert on_cuda["observation"].device.type == "cpu"
    assert (on_cuda == run("cpu")).all()


def _format_1(rows: TensorDict) -> TensorDict:
    """The same rows in the old layout: reward and flags at the root, shape [N]."""
    out = rows.exclude(*[("next", k) for k in ("reward", "terminated", "truncated", "done")])
    for k in ("reward", "terminated", "truncated", "done"):
        out[k] = rows["next", k][:, 0]
    return out


LAYOUT_CASES = {
    "format 1": (_format_1, r"rows lack key 'next.reward' \(found at the root\); buffer format 2"),
    "missing": (lambda td: td.exclude(("next", "done")), r"rows lack key 'next.done' \(found nowhere\)"),
    "flat reward": (lambda td: td.set(("next", "reward"), td["next", "reward"][:, 0]),
                    r"key 'next.reward' is float32 \[12\]; format 2 stores it as float32 \[12, 1\]"),
    "float flag": (lambda td: td.set(("next", "truncated"), td["next", "truncated"].float()),
                   r"key 'next.truncated' is float32 \[12, 1\]; format 2 stores it as bool \[12, 1\]"),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_counting_checks_refuse_another_layout(case):
    sink = ListSink()
    c = counting_collector(sink, num_envs=3, frames_per_batch=12)
    try:
        c.run_batch()
    finally:
        c.close()
    (batch,) = sink.batches
    check_counting_stream(batch, max_length=MAX_LEN)
    change, match = LAYOUT_CASES[case]
    with pytest.raises(AssertionError, match=match):
        check_counting_rows(change(batch.clone()), max_length=MAX_LEN)
