"""n-step transitions rebuilt at sample time (``buffer/nstep.py``).

Every sampled transition is checked against a brute-force rebuild from the rows as they
were inserted: the reward sum, the discount, the flags and observation of the last step,
the row's own keys. Episodes of random lengths (some terminated, some truncated, one
still running at the write cursor), a ring that wrapped, every sampler type, a caller's
``out=`` batch, a sharded service (real Ray, two shards), and the DQN/SAC targets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer, ReplayService
from rlfleet.buffer.indices import counter_of, shard_of

N, GAMMA = 3, 0.9


def episodes(rows: int, first_episode: int, rng: np.random.Generator, *, open_end: bool = True) -> TensorDict:
    """``rows`` rows of consecutive episodes (lengths 1..7; even lengths terminate, odd
    ones truncate). With ``open_end`` the last episode is cut: it goes on past the batch."""
    episode, step, done, terminated = [], [], [], []
    e = first_episode
    while len(episode) < rows:
        length = int(rng.integers(1, 8))
        for s in range(length):
            episode.append(e)
            step.append(s)
            done.append(s == length - 1)
            terminated.append(s == length - 1 and length % 2 == 0)
        e += 1
    cut = rows if open_end else len(episode)
    if open_end:
        done[rows - 1] = terminated[rows - 1] = False
    episode, step = np.array(episode[:cut]), np.array(step[:cut])
    done, terminated = np.array(done[:cut]), np.array(terminated[:cut])
    obs = (episode * 100 + step).astype(np.float32)[:, None]
    n = len(episode)
    return TensorDict({
        "observation": torch.from_numpy(obs),
        "action": torch.from_numpy(rng.integers(0, 4, n)),
        "episode_id": torch.from_numpy(episode),
        "step": torch.from_numpy(step),
        "next": {
            "observation": torch.from_numpy(obs + 0.5),
            "reward": torch.from_numpy(rng.random((n, 1)).astype(np.float32)),
            "done": torch.from_numpy(done[:, None]),
            "terminated": torch.from_numpy(terminated[:, None]),
            "truncated": torch.from_numpy((done & ~terminated)[:, None]),
        },
    }, [n])


def expected(rows: TensorDict, counter: int) -> dict | None:
    """The n-step transition of row ``counter`` of ``rows`` (all rows inserted, in
    order), or None when its window is not complete."""
    episode = int(rows["episode_id"][counter])
    total, k = 0.0, 0
    for j in range(N):
        r = counter + j
        if r >= len(rows) or int(rows["episode_id"][r]) != episode:
            return None
        total += GAMMA ** j * float(rows["next", "reward"][r, 0])
        k = j + 1
        if bool(rows["next", "done"][r, 0]):
            break
    else:
        if k < N:
            return None
    last = counter + k - 1
    return {"reward": total, "discount": np.float32(GAMMA ** k), "k": k,
            "next_observation": float(rows["next", "observation"][last, 0]),
            "terminated": bool(rows["next", "terminated"][last, 0]),
            "truncated": bool(rows["next", "truncated"][last, 0]),
            "done": bool(rows["next", "done"][last, 0]),
            "observation": float(rows["observation"][counter, 0]),
            "action": int(rows["action"][counter]), "step": int(rows["step"][counter])}


def check_batch(batch: TensorDict, rows: TensorDict, counters: np.ndarray) -> list[int]:
    """Assert every sampled transition equals its brute-force rebuild; returns the k's."""
    flat = batch.reshape(-1)
    ks = []
    for j, c in enumerate(counters.reshape(-1)):
        want = expected(rows, int(c))
        assert want is not None, f"row {c} was returned though its {N}-step window is not complete"
        assert float(flat["next", "reward"][j, 0]) == pytest.approx(want["reward"], rel=1e-6)
        assert flat["next", "discount"][j, 0].item() == want["discount"]
        assert float(flat["next", "observation"][j, 0]) == want["next_observation"]
        for flag in ("terminated", "truncated", "done"):
            assert bool(flat["next", flag][j, 0]) == want[flag], (c, flag)
        assert float(flat["observation"][j, 0]) == want["observation"]
        assert int(flat["action"][j]) == want["action"] and int(flat["step"][j]) == want["step"]
        ks.append(want["k"])
    return ks


@pytest.mark.parametrize("sampler", [
    {"type": "uniform"},
    {"type": "prioritized", "alpha": 0.7, "beta": 0.5},
    {"type": "without_replacement"},
    {"type": "sequence", "length": 4},
])
def test_every_sampled_transition_equals_the_brute_force_rebuild_across_a_ring_wrap(tmp_path, sampler):
    rng = np.random.default_rng(0)
    rb = ReplayBuffer.create(tmp_path / "b", capacity=500, sampler={**sampler, "n_step": {"n": N, "gamma": GAMMA}},
                             seed=1)
    first = episodes(400, 0, rng, open_end=False)
    second = episodes(300, int(first["episode_id"][-1]) + 1, rng)  # wraps; its last episode is open
    rb.extend(first)
    rb.extend(second)
    rows = torch.cat([first, second])
    assert len(rb) == 500
    ks = []
    for _ in range(20):
        batch = rb.sample(64)
        assert batch["next", "discount"].shape == batch["next", "reward"].shape
        assert batch["next", "discount"].dtype == torch.float32
        counters = counter_of(batch["index"].numpy())
        assert (counters >= len(rows) - 500).all()  # never an overwritten row
        ks += check_batch(batch, rows, counters)
    # the windows were cut short by episode ends as well as taken whole
    assert {1, 2, 3} <= set(ks)
    # the open episode's last rows (their windows reach past the write cursor) are never returned
    open_tail = set(range(len(rows) - N + 1, len(rows)))
    assert not open_tail & set(counters.reshape(-1).tolist())


def test_the_open_tail_becomes_sampleable_once_the_episode_goes_on(tmp_path):
    rb = ReplayBuffer.create(tmp_path / "b", capacity=100, sampler={"type": "uniform", "n_step": {"n": N, "gamma": GAMMA}})
    one = TensorDict({
        "observation": torch.arange(4, dtype=torch.float32)[:, None], "action": torch.zeros(4, dtype=torch.int64),
        "episode_id": torch.zeros(4, dtype=torch.int64), "step": torch.arange(4),
        "next": {"observation": torch.arange(1, 5, dtype=torch.float32)[:, None],
                 "reward": torch.ones(4, 1), "done": torch.zeros(4, 1, dtype=torch.bool),
                 "terminated": torch.zeros(4, 1, dtype=torch.bool), "truncated": torch.zeros(4, 1, dtype=torch.bool)},
    }, [4])
    rb.extend(one)
    seen = set(counter_of(rb.sample(200)["index"].numpy()).tolist())
    assert seen == {0, 1}  # rows 2 and 3 need rows 4 and 5
    more = one.clone()
    more["step"] += 4
    more["observation"] += 4
    more["next", "observation"] += 4
    more["next", "done"][-1] = more["next", "terminated"][-1] = True
    rb.extend(more)
    batch = rb.sample(400)
    seen = set(counter_of(batch["index"].numpy()).tolist())
    assert seen == set(range(8))
    by_row = dict(zip(counter_of(batch["index"].numpy()).tolist(), batch["next", "discount"][:, 0].tolist()))
    assert by_row[7] == pytest.approx(GAMMA) and by_row[6] == pytest.approx(GAMMA ** 2)
    assert by_row[0] == pytest.approx(GAMMA ** 3)


def test_no_complete_window_is_a_clear_error_and_out_batches_are_refilled(tmp_path):
    rb = ReplayBuffer.create(tmp_path / "b", capacity=100, sampler={"type": "uniform", "n_step": {"n": N, "gamma": GAMMA}})
    rows = episodes(2, 0, np.random.default_rng(0))  # made one open episode of two rows:
    rows["episode_id"][:] = 0
    rows["step"] = torch.arange(2)
    rows["next", "done"][:] = False
    rows["next", "terminated"][:] = False
    rows["next", "truncated"][:] = False
    rb.extend(rows)
    with pytest.raises(ValueError, match=r"sample: found no rows with a complete 3-step window in 100 redraws: "
                                         r"each needs the next 2 rows of its episode stored after it"):
        rb.sample(4)

    rb2 = ReplayBuffer.create(tmp_path / "c", capacity=300, sampler={"type": "prioritized", "n_step": {"n": N, "gamma": GAMMA}})
    stored = episodes(300, 0, np.random.default_rng(5), open_end=False)[:300]
    rb2.extend(stored)
    out = rb2.sample(32)
    first = out["next", "reward"].clone()
    again = rb2.sample(32, out=out)
    assert again is out
    check_batch(out, stored, counter_of(out["index"].numpy()))
    assert not torch.equal(first, out["next", "reward"])


def test_a_schema_without_what_n_step_reads_is_refused_naming_the_keys(tmp_path):
    rb = ReplayBuffer.create(tmp_path / "b", capacity=10, sampler={"type": "uniform", "n_step": {"n": 2, "gamma": 0.5}})
    bare = TensorDict({"observation": torch.zeros(4, 1), "next": {"reward": torch.zeros(4, 1)}}, [4])
    with pytest.raises(ValueError, match=r"sampler n_step=\{'n': 2, \.\.\.\} reads episode_id, step, next.done of "
                                         r"every row, which the buffer schema lacks"):
        rb.extend(bare)
    assert len(rb) == 0


@pytest.mark.parametrize("n_step, match", [
    (3, r"sampler n_step=3: expected a mapping such as \{'n': 3, 'gamma': 0.99\}, or None"),
    ({"n": 3}, r"sampler n_step=\{'n': 3\}: needs exactly the keys 'n' and 'gamma'"),
    ({"n": 0, "gamma": 0.9}, r"sampler n_step n=0: must be an integer >= 1"),
    ({"n": 2, "gamma": 1.5}, r"sampler n_step gamma=1.5: must be a number in \[0, 1\]"),
])
def test_bad_n_step_options_are_refused(tmp_path, n_step, match):
    with pytest.raises(ValueError, match=match):
        ReplayBuffer.create(tmp_path / "b", capacity=10, sampler={"type": "uniform", "n_step": n_step})
    assert not (tmp_path / "b").exists()


def test_reopening_with_n_step_keeps_the_rows_and_without_it_gives_one_step_rows(tmp_path):
    rows = episodes(200, 0, np.random.default_rng(7), open_end=False)[:200]
    rb = ReplayBuffer.create(tmp_path / "b", capacity=200, sampler="prioritized")
    rb.extend(rows)
    rb.close()
    rb = ReplayBuffer.open(tmp_path / "b", sampler={"type": "prioritized", "n_step": {"n": N, "gamma": GAMMA}})
    batch = rb.sample(64)
    check_batch(batch, rows, counter_of(batch["index"].numpy()))
    assert rb.sampler["n_step"] == {"n": N, "gamma": GAMMA}
    rb.close()
    rb = ReplayBuffer.open(tmp_path / "b", sampler="prioritized")
    batch = rb.sample(8)
    assert ("next", "discount") not in batch.keys(True)
    c = counter_of(batch["index"].numpy())
    assert torch.equal(batch["next", "reward"], rows["next", "reward"][torch.from_numpy(c)])


def test_a_sharded_service_samples_n_step_transitions_from_both_shards(ray_cluster, tmp_path):
    rng = np.random.default_rng(11)
    svc = ReplayService.launch("svc-nstep", tmp_path / "svc", capacity=1000, num_shards=2, seed=0,
                               sampler={"type": "prioritized", "n_step": {"n": N, "gamma": GAMMA}})
    try:
        client = svc.client(seed=2)
        batches = [episodes(200, 1000 * b, rng, open_end=False)[:200] for b in range(4)]
        indices = [client.extend(b).numpy() for b in batches]
        by_index = {int(i): (b, r) for b, idx in enumerate(indices) for r, i in enumerate(idx)}
        shards = set()
        for _ in range(5):
            batch = client.sample(64)
            assert batch["weight"].shape == (64,)
            for j, index in enumerate(batch["index"].tolist()):
                b, r = by_index[index]
                want = expected(batches[b], r)
                assert want is not None
                assert float(batch["next", "reward"][j, 0]) == pytest.approx(want["reward"], rel=1e-6)
                assert batch["next", "discount"][j, 0].item() == want["discount"]
                assert float(batch["next", "observation"][j, 0]) == want["next_observation"]
                assert bool(batch["next", "terminated"][j, 0]) == want["terminated"]
            shards |= set(shard_of(batch["index"].numpy()).tolist())
        assert len(shards) == 2
    finally:
        ReplayService.shutdown("svc-nstep", delete=True)


def test_dqn_and_sac_bootstrap_with_the_batch_discount():
    from rlfleet.launch.learners.dqn import DQNLoss
    from rlfleet.launch.learners.sac import SACLoss

    torch.manual_seed(0)
    q = torch.nn.Linear(2, 3)
    loss = DQNLoss(q, gamma=0.5, double_dqn=False)
    batch = TensorDict({
        "observation": torch.zeros(2, 2), "action": torch.zeros(2, dtype=torch.int64),
        "next": {"observation": torch.ones(2, 2), "reward": torch.tensor([[1.0], [2.0]]),
                 "terminated": torch.tensor([[False], [True]]), "discount": torch.tensor([[0.125], [0.25]])},
    }, [2])
    next_value = q(torch.ones(1, 2)).max().item()
    target = loss._target(batch)
    assert target.tolist() == pytest.approx([1.0 + 0.125 * next_value, 2.0])
    del batch["next", "discount"]
    assert loss._target(batch).tolist() == pytest.approx([1.0 + 0.5 * next_value, 2.0])

    import gymnasium
    from rlfleet.collector.policies import build_policy
    from rlfleet.launch.config import PolicyConfig
    obs_space = gymnasium.spaces.Box(-1, 1, (2,), np.float32)
    act_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)
    sac = SACLoss(build_policy(PolicyConfig(type="mlp", hidden=(8,)), obs_space, act_space), obs_space, act_space,
                  hidden=(8,), gamma=0.99)
    rows = TensorDict({
        "observation": torch.zeros(2, 2), "action": torch.zeros(2, 1),
        "next": {"observation": torch.ones(2, 2), "reward": torch.tensor([[1.0], [2.0]]),
                 "terminated": torch.tensor([[False], [False]]), "discount": torch.zeros(2, 1)},
    }, [2])
    # a discount of 0 leaves the reward alone as the target: td_error = reward - min(Q1, Q2)
    q1, q2 = sac._critic_forward(rows["observation"], sac._to_unit(rows["action"]))
    td = sac(rows)["td_error"]
    assert td.tolist() == pytest.approx((torch.tensor([1.0, 2.0]) - torch.min(q1, q2)).tolist(), abs=1e-6)
    del rows["next", "discount"]
    assert sac(rows)["td_error"].tolist() != pytest.approx(td.tolist(), abs=1e-6)
