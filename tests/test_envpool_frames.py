"""A record of real EnvPool Pong through frame-stack buffers: every read equals the record.

EnvPool cannot host a custom env, so this records what a real EnvPool Atari game handed
the collector step by step (``record_envpool``: 4 envs, episodes cut by
``max_episode_steps`` so that ends and truncations come often; EnvPool's own stack of 4
grey 84x84 frames), lays the rows out as collectors send them (env-major batches), and
stores them one frame per row. Every sampled and read stack, next stack and 3-step tuple
must equal the record: across episode starts and ends, a wrapped ring, a reopen, and a
2-shard service written by two clients.
"""

from __future__ import annotations

import pytest

pytest.importorskip("envpool", reason='needs the atari extra: pip install -e ".[atari]"')

from rlfleet.buffer import ReplayBuffer, ReplayService  # noqa: E402
from rlfleet.buffer.indices import shard_of  # noqa: E402
from rlfleet.collector.envpool_record import record_envpool  # noqa: E402
from test_frames import Envs, to_td  # noqa: E402

pytestmark = pytest.mark.atari
ENVS, STEPS, T = 4, 150, 10


@pytest.fixture(scope="module")
def pong():
    """``(batches, truth)``: env-major batches of T steps per env, as collector ``env // 2``
    would send them, and the record keyed by ``(episode_id, step)``."""
    rec = record_envpool("Pong-v5", ENVS, STEPS, seed=7, max_episode_steps=40)
    assert rec["observation"].shape[1:] == (4, 84, 84)
    assert rec["truncated"].sum() >= 8 and (rec["step"] == 0).sum() >= 8 + ENVS
    rows = [{"obs": rec["observation"][i], "next": rec["next_observation"][i], "reward": float(rec["reward"][i]),
             "terminated": bool(rec["terminated"][i]), "truncated": bool(rec["truncated"][i]),
             "episode": int(rec["env"][i] * 1000 + rec["episode"][i]), "step": int(rec["step"][i]),
             "collector": int(rec["env"][i] // 2)} for i in range(len(rec["step"]))]
    truth = {(r["episode"], r["step"]): r for r in rows}
    batches = []
    for first in range(0, STEPS, T):
        for collector in (0, 1):
            envs = (2 * collector, 2 * collector + 1)
            picked = [rows[t * ENVS + j] for j in envs for t in range(first, first + T)]
            batches.append((collector, to_td(picked)))
    return batches, truth


def checker(truth) -> Envs:
    envs = Envs(count=1)
    envs.truth = truth
    return envs


@pytest.mark.parametrize("sampler", [{"type": "uniform", "n_step": {"n": 3, "gamma": 0.9}},
                                     {"type": "prioritized", "n_step": {"n": 3, "gamma": 0.9}}])
def test_local_buffer_returns_exactly_what_envpool_emitted(tmp_path, pong, sampler):
    batches, truth = pong
    check = checker(truth)
    rb = ReplayBuffer.create(tmp_path / "b", capacity=400, sampler=sampler, frame_stack="observation", seed=0)
    for _, batch in batches[: len(batches) // 2]:
        rb.extend(batch)
    rb.close()
    rb = ReplayBuffer.open(tmp_path / "b", seed=1)  # a reopen between batches of the same episodes
    for _, batch in batches[len(batches) // 2:]:
        rb.extend(batch)
    assert rb.total_inserted > rb.capacity  # 600 transitions and their reset rows: the ring wrapped
    check.check(rb.sample(256), n_step=3, gamma=0.9)
    rows = rb[:]
    check.check(rows)
    assert len(rows) > 300
    rb.close()


def test_two_shards_two_clients_return_exactly_what_envpool_emitted(ray_cluster, tmp_path, pong):
    batches, truth = pong
    service = ReplayService.launch("envpool-frames", tmp_path / "svc", capacity=800, num_shards=2, detached=False,
                                   seed=0, sampler={"type": "uniform", "n_step": {"n": 3, "gamma": 0.9}},
                                   frame_stack="observation")
    try:
        clients = [service.client(seed=k) for k in range(2)]
        for collector, batch in batches:
            clients[collector].extend(batch)
        reader = service.client(seed=5, split="rows")
        batch = reader.sample(256)
        checker(truth).check(batch, n_step=3, gamma=0.9)
        # each client (one per collector) wrote all its batches to one shard
        assert set(batch["collector_id"].tolist()) == {0, 1}
        assert shard_of(batch["index"].numpy()).tolist() == batch["collector_id"].tolist()
    finally:
        ReplayService.shutdown("envpool-frames", delete=True)
