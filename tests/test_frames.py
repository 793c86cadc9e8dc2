"""Frame stacks stored once (``rlfleet.buffer.frames``), checked against what real envs emitted.

Rows come from real gymnasium envs: ``PixelCountingEnv`` (grey frames that encode env,
episode and step) wrapped in gymnasium's ``FrameStackObservation``, stepped here into
env-major batches as a collector writes them, with episodes of 1 to 7 steps ending
terminated or truncated. Every transition the envs emitted is recorded; every sampled or
read row must equal its record: observation stack, next stack (the true final one at an
episode's end) and, with n-step, the reward sum, discount, flags and bootstrap stack.
"""

from __future__ import annotations

import json

import gymnasium
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer, ReplayService, SchemaMismatch
from rlfleet.buffer.frames import FRAME_KEY, NEXT_KEY, PREV_KEY, UNKNOWN
from rlfleet.buffer.indices import shard_of
from rlfleet.collector.testing import PixelCountingEnv, decode_pixels

STACK = 4
FRAME = (4, 8)  # grey [H, W]


class Envs:
    """``count`` stacked pixel envs stepped into env-major batches; ``truth`` records each
    transition by ``(episode_id, step)``."""

    def __init__(self, count: int = 3, padding: str = "reset", seed: int = 0, first_episode: int = 0,
                 max_length: int = 7, collector: int = 0) -> None:
        self.collector = collector
        self.envs = [gymnasium.wrappers.FrameStackObservation(
            PixelCountingEnv(max_length, shape=FRAME), STACK, padding_type=padding) for _ in range(count)]
        self.obs = [env.reset(seed=seed + 101 * j)[0] for j, env in enumerate(self.envs)]
        self.steps = [0] * count
        self.episodes = [first_episode + j for j in range(count)]
        self.next_episode = first_episode + count
        self.truth: dict[tuple[int, int], dict] = {}

    def batch(self, steps: int) -> TensorDict:
        rows = []
        for j, env in enumerate(self.envs):
            for _ in range(steps):
                nxt, reward, terminated, truncated, _ = env.step(0)
                row = {"obs": self.obs[j].copy(), "next": nxt.copy(), "reward": reward, "terminated": terminated,
                       "truncated": truncated, "episode": self.episodes[j], "step": self.steps[j], "collector": self.collector}
                self.truth[(row["episode"], row["step"])] = row
                rows.append(row)
                if terminated or truncated:
                    self.obs[j] = env.reset()[0]
                    self.steps[j], self.episodes[j] = 0, self.next_episode
                    self.next_episode += 1
                else:
                    self.obs[j], self.steps[j] = nxt, self.steps[j] + 1
        return to_td(rows)

    def check(self, td: TensorDict, n_step: int | None = None, gamma: float = 0.9) -> None:
        """Every row of ``td`` (``[n]``, or ``[n, L]`` slices) equals the record of what the
        env emitted."""
        if td.batch_dims == 2:  # slices: consecutive steps of one episode
            assert (td["episode_id"] == td["episode_id"][:, :1]).all()
            assert (td["step"][:, 1:] - td["step"][:, :-1] == 1).all()
            td = td.reshape(-1)
        for i in range(len(td)):
            episode, step = int(td["episode_id"][i]), int(td["step"][i])
            row = self.truth[(episode, step)]
            where = f"row {i} (episode {episode}, step {step})"
            assert np.array_equal(td["observation"][i].numpy(), row["obs"]), where
            last, total, k = row, 0.0, 0
            while True:  # the n-step window: n rows, fewer where the episode ends
                total += gamma ** k * last["reward"]
                k += 1
                if last["terminated"] or last["truncated"] or k == (n_step or 1):
                    break
                last = self.truth[(episode, step + k)]
            assert np.array_equal(td["next", "observation"][i].numpy(), last["next"]), where
            assert bool(td["next", "terminated"][i]) == last["terminated"], where
            assert bool(td["next", "truncated"][i]) == last["truncated"], where
            if n_step is None:
                assert float(td["next", "reward"][i]) == last["reward"], where
                assert "discount" not in td["next"].keys()
            else:
                assert float(td["next", "reward"][i]) == pytest.approx(total, rel=1e-6), where
                assert float(td["next", "discount"][i]) == pytest.approx(gamma ** k, rel=1e-6), where


def to_td(rows: list[dict]) -> TensorDict:
    n = len(rows)

    def column(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([r[name] for r in rows], dtype=dtype)

    terminated, truncated = column("terminated", torch.bool)[:, None], column("truncated", torch.bool)[:, None]
    return TensorDict({
        "observation": torch.from_numpy(np.stack([r["obs"] for r in rows])),
        "action": torch.zeros(n, dtype=torch.int64),
        "episode_id": column("episode", torch.int64),
        "step": column("step", torch.int64),
        "collector_id": column("collector", torch.int64),
        "next": {"observation": torch.from_numpy(np.stack([r["next"] for r in rows])),
                 "reward": column("reward", torch.float32)[:, None],
                 "terminated": terminated, "truncated": truncated, "done": terminated | truncated},
    }, batch_size=[n])


def readable_transitions(envs: Envs, rb: ReplayBuffer) -> int:
    """How many of the rows in ``rb``'s window are transitions whose chains lie in it."""
    return len(rb[:])


@pytest.mark.parametrize("padding", ["reset", "zero"])
@pytest.mark.parametrize("sampler", [
    "uniform",
    {"type": "prioritized", "alpha": 0.6, "beta": 0.4},
    {"type": "uniform", "n_step": {"n": 3, "gamma": 0.9}},
    {"type": "prioritized", "n_step": {"n": 3, "gamma": 0.9}},
    {"type": "sequence", "length": 3},
    {"type": "sequence", "length": 3, "n_step": {"n": 3, "gamma": 0.9}},
    "without_replacement",
], ids=["uniform", "prioritized", "uniform-3step", "prioritized-3step", "sequence", "sequence-3step",
        "without-replacement"])
def test_every_sampled_and_read_row_equals_what_the_env_emitted(tmp_path, padding, sampler):
    envs = Envs(padding=padding)
    rb = ReplayBuffer.create(tmp_path / "b", capacity=60, sampler=sampler, seed=1,
                             frame_stack={"key": "observation", "padding": padding})
    n_step = 3 if isinstance(sampler, dict) and "n_step" in sampler else None
    for _ in range(12):  # 180 transitions and their reset rows through a ring of 60: it wraps
        index = rb.extend(envs.batch(5))
        assert index.shape == (15,)
    assert rb.total_inserted > 180  # the reset rows count
    assert rb.frame_stack == {"key": ["observation"], "padding": padding, "size": STACK}
    draws = 20 if sampler == "without_replacement" else 300  # without replacement: fewer than the rows
    batch = rb.sample(draws)
    lead = (draws, 3) if isinstance(sampler, dict) and sampler["type"] == "sequence" else (draws,)
    assert batch["observation"].shape == (*lead, STACK, *FRAME) and batch["observation"].dtype == torch.uint8
    envs.check(batch, n_step)
    assert (batch["step"] >= 0).all()  # reset rows are never sampled
    rows = rb[:]
    envs.check(rows)
    # every transition whose stacks reach only rows still stored reads back, in order
    assert len(rows) > 20
    order = rows["episode_id"].numpy() * 100 + rows["step"].numpy()
    assert len(set(order.tolist())) == len(rows)
    envs.check(rb[-1:])
    rb.close()
    rb = ReplayBuffer.open(tmp_path / "b", seed=2)
    envs.check(rb.sample(draws // 3), n_step)
    for _ in range(3):
        rb.extend(envs.batch(5))
    envs.check(rb.sample(draws), n_step)
    envs.check(rb[:])


def test_rows_store_the_newest_frame_once_and_link_to_the_row_before(tmp_path):
    envs = Envs(count=1, max_length=3)
    rb = ReplayBuffer.create(tmp_path / "b", capacity=100, frame_stack="observation")
    index = rb.extend(envs.batch(6)).numpy()
    rb.close()
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    keys = {".".join(e["key"]) for e in meta["schema"]}
    assert "observation" not in keys and "next.observation" not in keys
    assert {"frame_stack.frame", "frame_stack.prev"} <= keys
    data = TensorDict.load_memmap(tmp_path / "b" / "data")  # plain tensordict opens the stored frames
    count = rb.total_inserted
    steps = data["step"][:count].tolist()
    # env tag 0: episodes of 1, 2, 3, 1, ... steps; a reset row (step -1) before each step 0
    assert steps == [-1, 0, -1, 0, 1, -1, 0, 1, 2]
    assert (index & ((1 << 44) - 1)).tolist() == [1, 3, 4, 6, 7, 8]  # the counters, tag bits off
    assert data[PREV_KEY][:count].tolist() == [-1, 0, -1, 2, 3, -1, 5, 6, 7]
    # each row's frame is its next observation's newest; the reset row's, the reset frame
    decoded = decode_pixels(data[FRAME_KEY][:count].numpy(), grey=True)[:, 1:]
    assert decoded.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2], [2, 3]]
    row_bytes = sum(int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(e["dtype"]).itemsize
                    for e in meta["schema"])
    assert data[NEXT_KEY][:count].tolist() == [1, -1, 3, 4, -1, 6, 7, 8, -1]
    assert row_bytes == 4 * 8 + 8 * 6 + 4 + 3  # frame; prev, next, action, episode_id, step, collector_id; reward; flags


def test_n_step_windows_go_on_across_a_collectors_batches(tmp_path):
    # batches of 2 steps per env: most 3-step windows reach into the env's next batch,
    # which lies after the other envs' rows; the forward links carry the window there
    envs = Envs(count=3)
    rb = ReplayBuffer.create(tmp_path / "b", capacity=1000, frame_stack="observation", seed=0,
                             sampler={"type": "uniform", "n_step": {"n": 3, "gamma": 0.9}})
    for _ in range(30):
        rb.extend(envs.batch(2))
    seen: set[tuple[int, int]] = set()
    for _ in range(20):
        batch = rb.sample(500)
        envs.check(batch, n_step=3)
        seen |= set(zip(batch["episode_id"].tolist(), batch["step"].tolist()))

    def complete(episode: int, step: int) -> bool:
        for j in range(3):
            row = envs.truth.get((episode, step + j))
            if row is None:
                return False  # goes on past the write cursor
            if row["terminated"] or row["truncated"]:
                return True
        return True

    expected = {key for key in envs.truth if complete(*key)}
    assert len(expected) == len(envs.truth) - sum(len({s for e, s in envs.truth if e == ep and not complete(ep, s)})
                                                  for ep in envs.episodes)
    assert seen == expected  # every row with a complete window, and no other


def test_a_batch_that_is_not_a_frame_stack_is_refused_and_nothing_is_stored(tmp_path):
    envs = Envs()
    rb = ReplayBuffer.create(tmp_path / "b", capacity=100, frame_stack="observation")
    good = envs.batch(4)
    rb.extend(good)
    before = rb.total_inserted
    broken = envs.batch(4)
    broken["next", "observation"][2, 0] += 1  # no longer the observation shifted by a frame
    with pytest.raises(SchemaMismatch, match=r"row 2 of the batch .*next stack is not its observation stack shifted"):
        rb.extend(broken)
    restarted = envs.batch(4)
    first = int(torch.nonzero(restarted["step"] == 0)[0])
    restarted["observation"][first, 0] = 255  # a step 0 stack that is not padded as the env pads
    with pytest.raises(SchemaMismatch, match=f"row {first} of the batch .*step 0 but its stack is not padded"):
        rb.extend(restarted)
    assert rb.total_inserted == before
    envs.check(rb[:])


def test_a_stack_that_does_not_continue_the_stored_episode_is_refused(tmp_path):
    envs = Envs(count=1, max_length=7, seed=5)  # tag 5: episode 0 lasts 6 steps
    rb = ReplayBuffer.create(tmp_path / "b", capacity=100, frame_stack="observation")
    rb.extend(envs.batch(2))
    batch = envs.batch(1)
    assert int(batch["step"][0]) == 2
    other = Envs(count=1, max_length=7, seed=5)
    other.batch(1)
    batch["observation"][0] = torch.from_numpy(other.batch(1)["observation"][0].numpy())  # step 1's stack
    batch["next", "observation"][0, :-1] = batch["observation"][0, 1:]
    with pytest.raises(SchemaMismatch, match="row 0 of the batch .*not the next stack of the stored row before it"):
        rb.extend(batch)
    assert rb.total_inserted == 3


def test_episodes_that_go_on_across_a_reopen_lose_only_their_first_rows(tmp_path):
    envs = Envs(count=2, max_length=7)
    rb = ReplayBuffer.create(tmp_path / "b", capacity=500, frame_stack="observation", seed=0)
    rb.extend(envs.batch(3))
    rb.close()
    rb = ReplayBuffer.open(tmp_path / "b", seed=0)
    batch = envs.batch(3)
    rb.extend(batch)
    # the rows of the episodes that went on cannot link to the rows before the reopen
    counters = rb.extend(envs.batch(3)).numpy()
    data = TensorDict.load_memmap(tmp_path / "b" / "data")
    rows = rb[:]
    envs.check(rows)
    envs.check(rb.sample(200))
    unknown = int((data[PREV_KEY][:rb.total_inserted] == UNKNOWN).sum())
    assert unknown == int(((batch["step"][[0, 3]]) > 0).sum())
    assert len(counters) == 6


def test_bad_frame_stack_options_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="padding='edge': must be 'reset'"):
        ReplayBuffer.create(tmp_path / "a", capacity=10, frame_stack={"key": "observation", "padding": "edge"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['axis'\]"):
        ReplayBuffer.create(tmp_path / "a", capacity=10, frame_stack={"axis": 0})
    assert not (tmp_path / "a").exists()
    rb = ReplayBuffer.create(tmp_path / "b", capacity=10, frame_stack="observation")
    flat = Envs().batch(2)
    flat["observation"] = flat["observation"].reshape(6, -1)
    flat["next", "observation"] = flat["next", "observation"].reshape(6, -1)
    with pytest.raises(SchemaMismatch, match=r"per-row shape \[128\]: a frame stack needs \[k >= 2, \*frame\]"):
        rb.extend(flat)
    rb.close()


def test_priority_updates_reach_the_rows_sampled(tmp_path):
    envs = Envs()
    rb = ReplayBuffer.create(tmp_path / "b", capacity=200, sampler={"type": "prioritized", "alpha": 1.0, "beta": 1.0},
                             frame_stack="observation", seed=0)
    index = rb.extend(envs.batch(10))
    batch = rb.sample(64)
    assert rb.update_priority(batch["index"], torch.full((64,), 1e-6)) == 0
    favourite = index[7]
    rb.update_priority(favourite[None], torch.tensor([1e6]))
    again = rb.sample(64)
    assert (again["index"] == favourite).float().mean() > 0.9
    envs.check(again)


def test_a_sharded_service_samples_exact_stacks_written_by_two_clients(ray_cluster, tmp_path):
    service = ReplayService.launch("frames-two-shards", tmp_path / "svc", capacity=400, num_shards=2,
                                   sampler={"type": "prioritized", "n_step": {"n": 3, "gamma": 0.9}},
                                   frame_stack={"key": "observation", "padding": "reset"}, detached=False, seed=0)
    try:
        writers = [service.client(seed=k) for k in range(2)]
        envs = [Envs(count=3, seed=1000 * k, first_episode=1000 * k, collector=k) for k in range(2)]
        for _ in range(6):
            for client, source in zip(writers, envs):
                index = client.extend(source.batch(6))
                assert index.shape == (18,)
        truth = {**envs[0].truth, **envs[1].truth}
        merged = Envs(count=1)
        merged.truth = truth
        reader = service.client(seed=3, split="rows")
        batch = reader.sample(256)
        merged.check(batch, n_step=3)
        # each client wrote to one shard: all its rows carry that shard's bits
        homes = {}
        for episode, shard in zip(batch["episode_id"].tolist(), shard_of(batch["index"].numpy()).tolist()):
            homes.setdefault(episode // 1000, set()).add(shard)
        assert sorted(homes) == [0, 1] and sorted(min(s) for s in homes.values()) == [0, 1], homes
        assert all(len(s) == 1 for s in homes.values()), homes
    finally:
        ReplayService.shutdown("frames-two-shards", delete=True)
