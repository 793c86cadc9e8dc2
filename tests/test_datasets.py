"""Offline datasets out of a buffer and back in: ``rlfleet export-dataset``,
``rlfleet import-dataset`` and ``ReplayBuffer.from_dataset``, with the real minari and
datasets libraries on real buffers.

Rows come from real collectors (``Collector`` stepping gymnasium's CartPole, or the pixel
env below; ``rlfleet run`` for the end-to-end test), in the exact format they write. The
expected whole, cut and unfinished episodes are worked out here in plain Python from the
rows on disk, independently of ``rlfleet.buffer.episodes``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer
from rlfleet.collector import Collector, EnvConfig, PolicyConfig
from rlfleet.launch.dataset_export import export_dataset

minari = pytest.importorskip("minari")
datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parent.parent
FRAME = (4, 84, 84)


class Frames(gymnasium.Env):
    """Random uint8 frames ``[4, 84, 84]``; episodes of 3 to 9 steps, ending terminated or
    truncated in turn. Importable as ``"test_datasets:Frames"``."""

    metadata: dict = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = gymnasium.spaces.Box(0, 255, FRAME, np.uint8)
        self.action_space = gymnasium.spaces.Discrete(3)
        self.episode = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.length = 0, 3 + int(self.np_random.integers(7))
        self.episode += 1
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.length
        return self._frame(), float(action), end and self.episode % 2 == 0, end and self.episode % 2 == 1, {}

    def _frame(self) -> np.ndarray:
        return self.np_random.integers(0, 256, FRAME, dtype=np.uint8)


def collect(sink, env_id: str, *, batches: int, num_envs: int = 4, frames_per_batch: int = 128,
            collector_id: int = 0, seed: int = 0) -> None:
    """Real collector rows into ``sink`` (random actions: no learner in these tests)."""
    c = Collector(EnvConfig(id=env_id, num_envs=num_envs), PolicyConfig(hidden=(8,)), sink,
                  collector_id=collector_id, seed=seed, frames_per_batch=frames_per_batch,
                  init_random_frames=10**9)
    try:
        for _ in range(batches):
            c.run_batch()
    finally:
        c.close()


class ShardedSink:
    """Batches to the shard that stored the fewest rows, as ``write_plan`` sends them."""

    def __init__(self, shards: list[ReplayBuffer]) -> None:
        self.shards = shards

    def extend(self, td: TensorDict) -> None:
        min(self.shards, key=lambda rb: rb.total_inserted).extend(td)


def rows_of(path: Path) -> TensorDict:
    """Every committed row of a buffer or a sharded buffer's directory."""
    dirs = [path] if (path / "meta.json").exists() else sorted(path.glob("shard-*"))
    parts = []
    for d in dirs:
        rb = ReplayBuffer.open(d)
        parts.append(rb[:])
        rb.close()
    return torch.cat(parts)


def canonical(rows: TensorDict) -> TensorDict:
    """Rows ordered by (episode_id, step)."""
    order = np.lexsort((rows["step"].numpy(), rows["episode_id"].numpy()))
    return rows[torch.from_numpy(order)]


def reference(rows: TensorDict) -> tuple[TensorDict, int, int]:
    """The rows of the whole episodes, and the cut and unfinished counts, by plain Python."""
    by_episode = defaultdict(list)
    for i, e in enumerate(rows["episode_id"].tolist()):
        by_episode[e].append(i)
    step, done = rows["step"].tolist(), rows["next", "done"][:, 0].tolist()
    whole, cut, unfinished = [], 0, 0
    for idx in by_episode.values():
        idx.sort(key=lambda i: step[i])
        if [step[i] for i in idx] != list(range(len(idx))):
            cut += 1  # step 0 (or a later step) was overwritten
        elif not done[idx[-1]]:
            unfinished += 1
        else:
            assert sum(done[i] for i in idx) == 1
            whole += idx
    return canonical(rows[torch.tensor(whole)]), cut, unfinished


def assert_same_rows(got: TensorDict, want: TensorDict) -> None:
    keys = sorted(want.keys(True, True), key=str)
    assert sorted(got.keys(True, True), key=str) == keys
    assert got.batch_size == want.batch_size
    for key in keys:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), key


def imported(dataset: Path, path: Path, **kwargs) -> TensorDict:
    rb = ReplayBuffer.from_dataset(dataset, path, **kwargs)
    try:
        return canonical(rb[:])
    finally:
        rb.close()


# ------------------------------------------------------------------------ round trips


@pytest.fixture(scope="module")
def cartpole_shards(tmp_path_factory):
    """A 2-shard CartPole buffer on disk, two collectors, rings wrapped (2 x 700 rows
    hold the newest of 3,072)."""
    path = tmp_path_factory.mktemp("cartpole") / "buffer"
    shards = [ReplayBuffer.create(path / f"shard-{k}", capacity=700) for k in range(2)]
    sink = ShardedSink(shards)
    for collector_id in (0, 1):
        collect(sink, "CartPole-v1", batches=12, collector_id=collector_id, seed=collector_id)
    assert all(rb.total_inserted > rb.capacity for rb in shards)
    for rb in shards:
        rb.close()
    return path


def test_cartpole_round_trip_through_minari_and_hf_keeps_every_key_of_every_whole_episode(
        cartpole_shards, tmp_path, monkeypatch):
    want, cut, unfinished = reference(rows_of(cartpole_shards))
    assert cut > 0 and unfinished > 0  # the ring wrapped; 8 envs were mid-episode
    episodes = len(set(want["episode_id"].tolist()))

    out = tmp_path / "minari" / "cartpole-v0"
    result = export_dataset(cartpole_shards, "minari", out, env="CartPole-v1", chunk_rows=100)
    assert (result.episodes, result.rows_exported, result.cut, result.unfinished) == (episodes, len(want), cut, unfinished)
    assert (result.inconsistent, result.missing, result.rows_read) == (0, 0, 1400)
    assert result.spaces == "env 'CartPole-v1'"
    # the documented way to load it: MINARI_DATASETS_PATH and the dataset id
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assert f"MINARI_DATASETS_PATH={(tmp_path / 'minari').resolve()}" in result.load[0]
    ds = minari.load_dataset("cartpole-v0")
    env = gymnasium.make("CartPole-v1")
    assert (ds.total_episodes, ds.total_steps) == (episodes, len(want))
    assert ds.observation_space == env.observation_space and ds.action_space == env.action_space
    first = next(ds.iterate_episodes())
    assert first.observations.shape == (len(first.rewards) + 1, 4) and first.observations.dtype == np.float32
    assert_same_rows(imported("cartpole-v0", tmp_path / "from-minari", format="minari"), want)

    result = export_dataset(cartpole_shards, "hf", tmp_path / "hf", max_shard_size="20KB")
    assert (result.episodes, result.rows_exported, result.cut, result.unfinished) == (episodes, len(want), cut, unfinished)
    hf = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(hf) == len(want)
    assert len(list((tmp_path / "hf").glob("*.arrow"))) > 1  # several Arrow shards
    assert hf.features["next.observation"] == datasets.Sequence(datasets.Value("float32"), length=4)
    assert hf.features["next.done"] == datasets.Sequence(datasets.Value("bool"), length=1)
    assert hf.features["episode_id"] == datasets.Value("int64")
    assert_same_rows(imported(tmp_path / "hf", tmp_path / "from-hf"), want)

    result = export_dataset(cartpole_shards, "hf", tmp_path / "hf-all", all_rows=True)
    assert (result.rows_exported, result.cut, result.unfinished) == (1400, None, None)
    assert_same_rows(imported(tmp_path / "hf-all", tmp_path / "from-hf-all"), canonical(rows_of(cartpole_shards)))


def test_pixel_frames_stay_uint8_both_ways(tmp_path, monkeypatch):
    buffer = tmp_path / "buffer"
    rb = ReplayBuffer.create(buffer, capacity=1000)
    collect(rb, "test_datasets:Frames", batches=3, num_envs=2, frames_per_batch=64)
    rb.close()
    want, cut, unfinished = reference(rows_of(buffer))
    assert want["observation"].dtype == torch.uint8 and cut == 0

    out = tmp_path / "minari" / "frames-v1"
    result = export_dataset(buffer, "minari", out, env="test_datasets:Frames")
    assert (result.rows_exported, result.unfinished) == (len(want), unfinished)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    ds = minari.load_dataset("frames-v1")
    assert ds.observation_space == Frames().observation_space
    episode = next(ds.iterate_episodes())
    assert episode.observations.dtype == np.uint8 and episode.observations.shape[1:] == FRAME
    assert_same_rows(imported(out, tmp_path / "from-minari"), want)

    export_dataset(buffer, "hf", tmp_path / "hf")
    hf = datasets.load_from_disk(str(tmp_path / "hf"))
    feature = hf.features["observation"]
    for dim in FRAME:  # nested fixed-size lists of uint8, not floats
        assert feature.length == dim
        feature = feature.feature
    assert feature == datasets.Value("uint8")
    column = hf.with_format("arrow")[:3]["observation"]
    assert str(column.type) == "fixed_size_list<item: fixed_size_list<item: fixed_size_list<item: uint8>[84]>[84]>[4]"
    assert_same_rows(imported(tmp_path / "hf", tmp_path / "from-hf"), want)


def test_inferred_spaces_of_a_bare_buffer(cartpole_shards, tmp_path):
    result = export_dataset(cartpole_shards, "minari", tmp_path / "cp-v3")
    assert result.spaces.startswith("inferred from the buffer's schema")
    ds = minari.MinariDataset(str(tmp_path / "cp-v3" / "data"))
    assert ds.observation_space == gymnasium.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    int64 = np.iinfo(np.int64)
    assert ds.action_space == gymnasium.spaces.Box(int64.min, int64.max, (), np.int64)


def test_rlfleet_run_then_export_and_import_on_the_command_line_row_for_row(ray_cluster, tmp_path, capsys):
    """``rlfleet run``'s job (``run(config)``, on the session's cluster), then the two
    commands through ``rlfleet``'s own ``main``."""
    from rlfleet.launch import load_config, run
    from rlfleet.launch.cli import main

    config = load_config(ROOT / "configs" / "smoke.yaml",
                         {"run.dir": str(tmp_path / "runs"), "run.total_frames": 2000, "buffer.capacity": 1500})
    run_dir = run(config).run_dir
    want, cut, unfinished = reference(rows_of(run_dir / "buffer"))
    assert cut > 0  # 2,048 frames through 1,500 slots
    episodes = len(set(want["episode_id"].tolist()))
    capsys.readouterr()

    out = tmp_path / "datasets" / "smoke-v0"
    assert main(["export-dataset", str(run_dir), "--format", "minari", str(out), "--plain"]) == 0
    printed = capsys.readouterr().out
    assert f"exported {episodes} episodes ({len(want)} rows) to {out} (minari)" in printed
    assert f"skipped episodes: {cut} cut by the ring (first rows overwritten), {unfinished} unfinished" in printed
    assert "rows/s; from disk (1 shard(s), this process)" in printed  # the run's service has stopped
    assert "spaces: env 'CartPole-v1' (the run's)" in printed
    assert f"MINARI_DATASETS_PATH={out.parent.resolve()} python -c" in printed

    back = tmp_path / "back"
    assert main(["import-dataset", str(out), str(back), "--format", "minari"]) == 0
    assert f"imported {len(want)} rows into {back} (holds {len(want)}, capacity {len(want)})" in capsys.readouterr().out
    assert_same_rows(canonical(rows_of(back)), want)


@pytest.mark.slow  # a second run on the session's cluster; the CartPole run above covers the path
def test_a_pixel_run_goes_out_to_minari_and_hf_and_back_row_for_row(ray_cluster, tmp_path, monkeypatch):
    """``rlfleet run`` on pixel frames (``PixelCountingEnv``: each frame says which env,
    episode and step it is; the learner's CNN trains on them), through both formats and
    back; the exported episodes are the env's own trajectories, frame by frame."""
    from rlfleet.collector.testing import decode_pixels
    from rlfleet.launch import load_config, run

    env_id = "rlfleet.collector.testing:PixelCountingEnv"
    config = load_config(ROOT / "configs" / "smoke.yaml", {
        "env.id": env_id, "env.kwargs": {"max_length": 9, "shape": [6, 12, 12]},
        "run.dir": str(tmp_path / "runs"), "run.total_frames": 1200, "buffer.capacity": 1000,
        "collector.init_random_frames": 300, "buffer.rate_limiter.min_size_to_sample": 300,
    })
    run_dir = run(config).run_dir
    want, cut, unfinished = reference(rows_of(run_dir / "buffer"))
    assert want["observation"].dtype == torch.uint8 and want["observation"].shape[1:] == (6, 12, 12)
    assert cut > 0 and len(want) > 0  # 1,280 frames through 1,000 slots

    out = tmp_path / "datasets" / "pixels-v0"
    result = export_dataset(run_dir, "minari", out)
    assert (result.rows_exported, result.cut, result.unfinished) == (len(want), cut, unfinished)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out.parent))
    ds = minari.load_dataset("pixels-v0")
    assert ds.observation_space == gymnasium.spaces.Box(0, 255, (6, 12, 12), np.uint8)
    assert ds.total_steps == len(want)
    for episode in ds.iterate_episodes():
        seen = decode_pixels(episode.observations)  # [T+1, (tag, episode, step)]
        assert episode.observations.dtype == np.uint8
        assert (seen[:, :2] == seen[0, :2]).all()  # one env's one episode
        assert seen[:, 2].tolist() == list(range(len(seen)))  # every step, the true final one last
        assert episode.rewards.tolist() == list(range(1, len(seen)))  # the step leaving s pays s + 1
    assert_same_rows(imported(out, tmp_path / "from-minari"), want)

    export_dataset(run_dir, "hf", tmp_path / "hf")
    assert_same_rows(imported(tmp_path / "hf", tmp_path / "from-hf"), want)


def test_export_through_a_running_service_matches_the_export_from_disk(ray_cluster, tmp_path):
    from rlfleet.buffer import BufferClient, ReplayService

    name = f"dsexport-{os.getpid()}"
    ReplayService.launch(name=name, path=tmp_path / "buffer", capacity=1400, num_shards=2, placement="pack")
    try:
        collect(BufferClient.connect(name), "CartPole-v1", batches=16)
        want, cut, unfinished = reference(rows_of(tmp_path / "buffer"))
        # one task per shard: a batch goes whole to one shard, so episodes span both and
        # come to the driver from a generator task per shard
        result = export_dataset(tmp_path / "buffer", "hf", tmp_path / "hf", use_service=True, task_per="shard")
        assert result.where.startswith(f"replay service {name!r}: 2 Ray task(s), one per shard; ")
        assert "episode(s) spanning shards assembled on the driver" in result.where
        assert (result.cut, result.unfinished, result.inconsistent, result.missing) == (cut, unfinished, 0, 0)
        assert_same_rows(imported(tmp_path / "hf", tmp_path / "back-hf"), want)
        # one task per node: both shards interleaved in one task
        result = export_dataset(tmp_path / "buffer", "minari", tmp_path / "m" / "svc-v0", env="CartPole-v1")
        assert result.where == f"replay service {name!r}: 1 Ray task(s), one per node"
        assert result.episodes == len(set(want["episode_id"].tolist()))
        assert_same_rows(imported(tmp_path / "m" / "svc-v0", tmp_path / "back-minari"), want)
    finally:
        ReplayService.shutdown(name)


def test_export_beside_a_live_writer_reads_no_torn_row(tmp_path):
    """A writer overwrites half of a small ring in a burst the moment the export's
    second pass starts, then keeps writing: the export drops the rows it overwrote
    (``evicted`` > 0), every exported row is one the writer wrote whole (all its fields
    agree), and none was committed after the export began (its episode ids are all
    below the ones the writer added)."""
    import threading

    rb = ReplayBuffer.create(tmp_path / "buffer", capacity=3000)
    length, batch = 10, 50
    total = [0]

    def rows(first: int) -> dict:
        n = np.arange(first, first + batch)
        eid, step = n // length, n % length
        done = (step == length - 1)[:, None]
        obs = np.stack([eid, step] * 32, 1).astype(np.float32)  # 256 bytes a row: copies take a while
        nxt = np.stack([eid, step + 1] * 32, 1).astype(np.float32)
        return {("observation",): obs, ("next", "observation"): nxt, ("action",): eid * 7 + step,
                ("next", "reward"): (eid * 3 + step)[:, None].astype(np.float32), ("next", "terminated"): done,
                ("next", "truncated"): np.zeros_like(done), ("next", "done"): done, ("episode_id",): eid,
                ("step",): step, ("collector_id",): eid % 5, ("policy_version",): eid}

    for first in range(0, 3000, batch):
        rb.extend_arrays(rows(first))
    total[0] = 3000
    last_before = (total[0] - 1) // length  # the highest episode id committed before the export
    stop = threading.Event()
    second_pass = tmp_path / ".hf.rlfleet-parts"  # made after pass 1 read the windows, before pass 2 reads rows

    def write() -> None:
        while not second_pass.exists():
            if stop.wait(0.0001):
                return
        for _ in range(30):  # 1,500 rows at once: far ahead of a reader 7 rows at a time
            rb.extend_arrays(rows(total[0]))
            total[0] += batch
        while not stop.wait(0.02):
            rb.extend_arrays(rows(total[0]))
            total[0] += batch

    writer = threading.Thread(target=write)
    writer.start()
    try:
        result = export_dataset(tmp_path / "buffer", "hf", tmp_path / "hf", chunk_rows=7)
    finally:
        stop.set()
        writer.join()
        rb.close()
    got = imported(tmp_path / "hf", tmp_path / "back")
    eid, step = got["episode_id"].numpy(), got["step"].numpy()
    assert len(got) == result.rows_exported == result.episodes * length > 0
    assert (got["observation"].numpy() == np.stack([eid, step] * 32, 1)).all()
    assert (got["next", "observation"].numpy() == np.stack([eid, step + 1] * 32, 1)).all()
    assert (got["action"].numpy() == eid * 7 + step).all() and (got["collector_id"].numpy() == eid % 5).all()
    assert (got["next", "reward"].numpy()[:, 0] == eid * 3 + step).all()
    assert total[0] >= 4500 and result.evicted > 0 and result.missing > 0
    assert result.rows_read + result.evicted == 3000  # the window at the start, each row read or dropped
    assert eid.max() <= last_before
    print(f"live writer: {total[0] - 3000} rows written during the export, {result.evicted} rows evicted, "
          f"{result.missing} planned episodes overwritten before they were read, {result.episodes} exported")


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_with_a_clear_message_and_nothing_written(cartpole_shards, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "empty-dir").mkdir()
    cases = [
        (dict(source=cartpole_shards, format="parquet", out=tmp_path / "a"), ValueError,
         "export-dataset: format='parquet': choose one of minari, hf"),
        (dict(source=cartpole_shards, format="hf", out=tmp_path / "full"), FileExistsError,
         f"export-dataset: OUT {str(tmp_path / 'full')!r} exists and is not empty; choose a new path (nothing was written)"),
        (dict(source=tmp_path / "empty-dir", format="hf", out=tmp_path / "b"), ValueError,
         f"export-dataset: {str(tmp_path / 'empty-dir')!r} is not a buffer: it holds neither meta.json nor shard-<k> "
         f"buffer directories; pass a run directory, a buffer directory or a sharded buffer's directory"),
        (dict(source=tmp_path / "nowhere", format="hf", out=tmp_path / "c"), FileNotFoundError,
         f"export-dataset: {str(tmp_path / 'nowhere')!r} does not exist; pass a run directory or a buffer directory"),
        (dict(source=cartpole_shards, format="minari", out=tmp_path / "cartpole"), ValueError,
         "export-dataset: Minari dataset id 'cartpole' is not of the form [namespace/]<name>-v<N>; name OUT after "
         f"the id (e.g. {str(tmp_path / 'cartpole-v0')!r}) or pass --dataset-id"),
        (dict(source=cartpole_shards, format="minari", out=tmp_path / "cp-v0", all_rows=True), ValueError,
         "export-dataset: all_rows (--all-rows) is for format 'hf'; Minari datasets hold whole episodes"),
        (dict(source=cartpole_shards, format="minari", out=tmp_path / "cp-v0", env="Pendulum-v1"), ValueError,
         "export-dataset: env 'Pendulum-v1' has observation space Box([-1. -1. -8.], [1. 1. 8.], (3,), float32), "
         "but the buffer stores observation as float32 [4]; pass the env the rows came from (--env ID)"),
    ]
    before = rows_of(cartpole_shards)
    for kwargs, error, message in cases:
        with pytest.raises(error) as raised:
            export_dataset(**kwargs)
        assert str(raised.value) == message, kwargs
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "cp-v0").exists() and not (tmp_path / "a").exists()
    assert_same_rows(rows_of(cartpole_shards), before)  # the buffer is untouched

    export_dataset(cartpole_shards, "hf", tmp_path / "hf")
    rows = len(datasets.load_from_disk(str(tmp_path / "hf")))
    with pytest.raises(ValueError) as raised:
        ReplayBuffer.from_dataset(tmp_path / "hf", tmp_path / "small", capacity=100)
    assert str(raised.value) == (
        f"from_dataset: capacity=100 holds 100 rows but dataset {str(tmp_path / 'hf')!r} has {rows}; pass "
        f"capacity >= {rows} (or None: the dataset's size), or truncate=True (--truncate) to keep only the "
        f"newest 100 rows")
    assert not (tmp_path / "small").exists()
    rb = ReplayBuffer.from_dataset(tmp_path / "hf", tmp_path / "small", capacity=100, truncate=True)
    assert (len(rb), rb.total_inserted) == (100, rows)
    rb.close()
    with pytest.raises(ValueError, match=r"format='csv': choose one of minari, hf"):
        ReplayBuffer.from_dataset(tmp_path / "hf", tmp_path / "x", format="csv")
    with pytest.raises(ValueError, match=r"neither a Minari dataset \(data/metadata.json\) nor a Hugging Face"):
        ReplayBuffer.from_dataset(tmp_path / "empty-dir", tmp_path / "x")


def test_bad_chunk_rows_and_columns_a_buffer_cannot_hold_are_refused_with_the_fix(cartpole_shards, tmp_path):
    cases = [
        (lambda: export_dataset(cartpole_shards, "hf", tmp_path / "a", chunk_rows=0),
         "export-dataset: chunk_rows=0: must be a positive int (rows read at a time); pass e.g. 4096, or None "
         "for about 16 MB of rows"),
        (lambda: export_dataset(cartpole_shards, "hf", tmp_path / "a", chunk_rows=2.5),
         "export-dataset: chunk_rows=2.5: must be a positive int (rows read at a time); pass e.g. 4096, or None "
         "for about 16 MB of rows"),
    ]
    for name, column, fix in [
        ("index", [1, 2], "is reserved: a buffer's samples add 'index' and 'weight'; drop it (dataset = "
                          "dataset.remove_columns(['index'])) or rename it (dataset = dataset.rename_column("
                          "'index', 'new_name')), then dataset.save_to_disk(...)"),
        ("weight", [0.5, 1.0], "is reserved: a buffer's samples add 'index' and 'weight'; drop it (dataset = "
                               "dataset.remove_columns(['weight'])) or rename it (dataset = dataset.rename_column("
                               "'weight', 'new_name')), then dataset.save_to_disk(...)"),
        ("text", ["a", "b"], "holds string values; buffers hold numbers and bools: drop it (dataset = "
                             "dataset.remove_columns(['text'])) or encode it as numbers, then dataset.save_to_disk(...)"),
    ]:
        path = tmp_path / f"hf-{name}"
        datasets.Dataset.from_dict({"action": [0, 1], name: column}).save_to_disk(str(path))
        cases.append((lambda path=path: ReplayBuffer.from_dataset(path, tmp_path / "b"),
                      f"dataset {str(path)!r}: column {name!r} {fix}"))
    export_dataset(cartpole_shards, "hf", tmp_path / "hf")
    cases.append((lambda: ReplayBuffer.from_dataset(tmp_path / "hf", tmp_path / "b", chunk_rows=0),
                  "from_dataset: chunk_rows=0: must be a positive int (rows written at a time); pass e.g. 4096 "
                  "(the default)"))
    for call, message in cases:
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    (tmp_path / "mine").mkdir()  # an import that fails leaves the caller's empty directory in place
    datasets.Dataset.from_dict({"action": [0, 1], "obs": [[0.0], [1.0, 2.0]]}).save_to_disk(str(tmp_path / "ragged"))
    with pytest.raises(ValueError, match="shape"):  # the second row, in the second chunk: after create
        ReplayBuffer.from_dataset(tmp_path / "ragged", tmp_path / "mine", chunk_rows=1)
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_missing_extra_names_the_pip_install(cartpole_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "minari", None)  # as if minari were not installed
    with pytest.raises(ModuleNotFoundError) as raised:
        export_dataset(cartpole_shards, "minari", tmp_path / "cp-v0", env="CartPole-v1")
    assert str(raised.value) == 'minari is not installed; it comes with rlfleet\'s [minari] extra: pip install "rlfleet[minari]"'
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "rlfleet\[hf\]"'):
        export_dataset(cartpole_shards, "hf", tmp_path / "hf")
    assert not (tmp_path / "cp-v0").exists() and not (tmp_path / "hf").exists()


def test_cli_errors_exit_1_with_the_message(cartpole_shards, tmp_path, capsys):
    from rlfleet.launch.cli import main

    with pytest.raises(SystemExit) as exited:  # bad usage: argparse's exit 2
        main(["export-dataset", str(cartpole_shards), "--format", "zip", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert "argument --format: invalid choice: 'zip' (choose from 'minari', 'hf')" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["export-dataset", str(cartpole_shards), "--format", "hf", "--task-per", "rack", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert "argument --task-per: invalid choice: 'rack' (choose from 'node', 'shard')" in capsys.readouterr().err
    assert main(["import-dataset", str(tmp_path), str(tmp_path / "b")]) == 1
    assert "rlfleet import-dataset: dataset " in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------ memory


MEMORY_PROBE = r"""
import json, resource, sys, threading, time
limit = int(sys.argv[4]) * 2**20  # the process's private writable memory, before any import
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
peak = {"anon": 0}
def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
def sample():
    while True:
        peak["anon"] = max(peak["anon"], anon_kb())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from rlfleet.launch.dataset_export import export_dataset
result = export_dataset(sys.argv[1], sys.argv[2], sys.argv[3])
peak["anon"] = max(peak["anon"], anon_kb())
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_anon_kb": peak["anon"], "vmhwm_kb": hwm, "rows_per_s": result.rows_per_s,
                  "rows": result.rows_read, "episodes": result.episodes}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["minari", "hf"])
def test_export_memory_stays_bounded_on_a_buffer_far_larger(tmp_path, fmt, capsys):
    """An export in its own process under a 1 GB memory limit, less than half the 2.2 GB buffer.

    The limit is ``RLIMIT_DATA`` (set before any import): since Linux 4.7 it bounds the
    process's private writable memory, heap and anonymous maps, so an export that held
    the buffer, or a good part of it, would fail with ``MemoryError``; the read-only file
    maps of the buffer and of Arrow files are not counted, as the page cache is not the
    process's. Reported: ``RssAnon`` (anonymous resident memory) sampled every 5 ms, and
    ``VmHWM`` (peak resident set, file pages included), which for Minari must stay under
    the limit too; the Hugging Face export's ``save_to_disk`` copies the Arrow part
    through a memory map, whose clean file pages count as resident (the kernel drops
    them at will), so its VmHWM is printed, not asserted. Asserted: peak RssAnon under
    the limit for both formats, VmHWM under it for Minari. A cgroup limit would also cap
    the page cache; CI has none.
    """
    limit_mb = 1024  # RLIMIT_DATA: torch, numba and the readers' imports alone reserve ~600 MB of it
    buffer = tmp_path / "buffer"
    rows, length = 40_000, 25
    rb = ReplayBuffer.create(buffer, capacity=rows)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (257, *FRAME), dtype=np.uint8)  # 257: a row's frame is never its neighbour's
    for first in range(0, rows, 1_000):  # 1,600 episodes of 25 steps: 40,000 rows, 2.2 GB of frames
        n = np.arange(first, first + 1_000)
        step = n % length
        done = (step == length - 1)[:, None]
        rb.extend_arrays({
            ("observation",): frames[n % 257], ("next", "observation"): frames[(n + 1) % 257],
            ("action",): n % 3, ("next", "reward"): np.ones((1_000, 1), np.float32),
            ("next", "terminated"): done, ("next", "truncated"): np.zeros((1_000, 1), bool),
            ("next", "done"): done, ("episode_id",): n // length, ("step",): step,
            ("collector_id",): np.zeros(1_000, np.int64), ("policy_version",): np.zeros(1_000, np.int64),
        })
    size_mb = rb.stats()["bytes_on_disk"] / 2**20
    rb.close()
    assert size_mb > 2 * limit_mb
    out = tmp_path / "out" / "frames-v0"
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(buffer), fmt, str(out), str(limit_mb)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert (figures["rows"], figures["episodes"]) == (rows, rows // length)
    with capsys.disabled():
        print(f"\nexport {fmt}: buffer {size_mb:.0f} MB, {figures['rows_per_s']:,.0f} rows/s, peak RssAnon "
              f"{figures['peak_anon_kb'] / 1024:.0f} MB, VmHWM {figures['vmhwm_kb'] / 1024:.0f} MB")
    assert figures["peak_anon_kb"] / 1024 < limit_mb
    if fmt == "minari":
        assert figures["vmhwm_kb"] / 1024 < limit_mb
