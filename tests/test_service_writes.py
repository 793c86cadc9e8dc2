"""Writes spread over the writer's node's shards, on the session's real local Ray cluster:
one extend of 1,000 Atari-sized rows (56 MB) fills both shards of a 2-shard service, the
cut falls at an episode's end, every returned index names exactly the row it stored;
small batches go whole to the emptier shard, so neither sits empty."""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer, ReplayService
from rlfleet.buffer.indices import counter_of, shard_of

FRAMES = (4, 84, 84)  # uint8 frame stacks, as Atari rows carry (twice: next observation)


def rows(ids, episode_length: int) -> TensorDict:
    """Rows whose id is ``step`` and every byte of the frames (``id % 251``)."""
    ids = torch.as_tensor(list(ids), dtype=torch.int64)
    frames = (ids % 251).to(torch.uint8)[:, None, None, None].expand(-1, *FRAMES).contiguous()
    return TensorDict({"observation": frames, "next": {"observation": frames}, "step": ids,
                       "episode_id": ids // episode_length}, batch_size=[len(ids)])


def test_one_large_extend_fills_both_shards_and_its_indices_name_its_rows(ray_cluster, tmp_path):
    svc = ReplayService.launch("svc-spread", tmp_path, capacity=2400, num_shards=2, seed=0)
    try:
        client = svc.client(seed=0, split="rows")  # a batch from both shards
        # 1,000 rows of 56 kB: cut in two; episodes of 480 rows end at rows 480 and 960,
        # so the even cut at 500 moves to 480
        first = client.extend(rows(range(1000), episode_length=480))
        assert [s["size"] for s in client.stats()["shards"]] == [480, 520]
        assert shard_of(first.numpy()).tolist() == [0] * 480 + [1] * 520
        # small batches (100 rows, 5.6 MB) go whole to the shard that holds fewer rows
        second = client.extend(rows(range(1000, 1100), episode_length=480))
        third = client.extend(rows(range(1100, 1200), episode_length=480))
        assert (set(shard_of(second.numpy()).tolist()), set(shard_of(third.numpy()).tolist())) == ({0}, {1})
        assert [s["size"] for s in client.stats()["shards"]] == [580, 620]
        batch = client.sample(300)
        assert set(shard_of(batch["index"].numpy()).tolist()) == {0, 1}
        assert (batch["observation"][:, 0, 0, 0].long() == batch["step"] % 251).all()
    finally:
        ReplayService.shutdown("svc-spread")  # closes the shards: their files are complete
    # the first batch was cut at an episode's end: each of its episodes is on one shard
    for episode in range(3):
        assert len(set(shard_of(first.numpy()[np.arange(1000) // 480 == episode]).tolist())) == 1
    index = torch.cat([first, second, third]).numpy()
    ids = np.arange(1200)
    for k in (0, 1):
        with ReplayBuffer.open(tmp_path / f"shard-{k}") as rb:
            stored = rb[:]
        mine = shard_of(index) == k
        # a fresh shard stores its rows in counter order: position == counter
        assert len(stored) == int(mine.sum())
        np.testing.assert_array_equal(stored["step"].numpy()[counter_of(index[mine])], ids[mine])
        frames = stored["observation"].numpy()
        assert (frames == (stored["step"].numpy() % 251).astype(np.uint8)[:, None, None, None]).all()
        np.testing.assert_array_equal(stored["next", "observation"].numpy(), frames)
