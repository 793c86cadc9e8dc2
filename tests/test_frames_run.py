"""``rlfleet run`` on stacked pixel frames, each stored once: every row read back is exact.

A real ``rlfleet run`` subprocess collects ``PixelCountingEnv`` (grey frames that encode
env, episode and step) under gymnasium's ``FrameStackObservation`` with 2 collectors of 3
gymnasium vector envs, into a 2-shard prioritized buffer small enough to wrap, while a
DQN learner trains on 3-step samples. The config names no frame-stack option: the
buffer finds the stacking wrapper (``buffer.frame_stack: auto``). Afterwards each shard
is reopened and every sampled stack, next stack and 3-step tuple (reward sum, discount,
flags, bootstrap stack), and every row read by position, is compared with a
brute-force rebuild from what the env emits for that env, episode and step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlfleet.buffer import ReplayBuffer
from rlfleet.collector.testing import decode_pixels, episode_length

ROOT = Path(__file__).resolve().parent.parent
MAX_LENGTH = 8  # divides 65,536: episode lengths follow from the 16-bit tag in the pixels
STACK, GAMMA, N = 4, 0.9, 3

CONFIG = f"""
name: frames-exact
seed: 3
ray: {{include_dashboard: false, num_cpus: 4}}
env:
  id: rlfleet.collector.testing:PixelCountingEnv
  kwargs: {{max_length: {MAX_LENGTH}, shape: [8, 8]}}
  num_envs: 3
  wrappers:
    - {{type: FrameStackObservation, stack_size: {STACK}}}
collector:
  num_workers: 2
  frames_per_batch: 24
  init_random_frames: 100000
policy: {{type: cnn, hidden: [16]}}
buffer:
  capacity: 800
  num_shards: 2
  sampler: {{type: prioritized, n_step: {{n: {N}}}}}
  rate_limiter: {{min_size_to_sample: 200}}
learner:
  algorithm: dqn
  gamma: {GAMMA}
  batch_size: 32
  publish_every: 50
run:
  total_frames: 3000
  target_return: null
  time_limit_s: 600
  learner_steps_per_frame: 0.05
"""


def stack_of(tag: int, episode: int, step: int) -> np.ndarray:
    """``[tag, episode, step]`` of each frame of the stack the env emits at ``step``
    (reset padding: the steps before 0 repeat step 0)."""
    steps = np.maximum(np.arange(step - STACK + 1, step + 1), 0)
    return np.stack([np.full(STACK, tag), np.full(STACK, episode), steps], axis=1) % 65536


def check_row(row: dict, n: int) -> None:
    """One row (a dict of numpy values) against the brute-force rebuild."""
    obs = decode_pixels(row["observation"], grey=True)
    tag, episode, step = (int(v) for v in obs[-1])
    assert step == row["step"], (obs, row["step"])
    assert np.array_equal(obs, stack_of(tag, episode, step)), obs
    length = episode_length(tag, episode, MAX_LENGTH)
    k = min(n, length - step)
    last = step + k - 1
    # next stack: the env's observation after the window's last step (the true final at the end)
    assert np.array_equal(decode_pixels(row["next_observation"], grey=True), stack_of(tag, episode, last + 1))
    ended = last + 1 == length
    assert row["terminated"] == (ended and episode % 2 == 0)
    assert row["truncated"] == (ended and episode % 2 == 1)
    reward = sum(GAMMA ** j * (step + j + 1) for j in range(k))
    assert row["reward"] == pytest.approx(reward, rel=1e-6)
    if n > 1:
        assert row["discount"] == pytest.approx(GAMMA ** k, rel=1e-6)


def rows_of(td, n_step: bool) -> list[dict]:
    out = []
    for i in range(len(td)):
        out.append({
            "observation": td["observation"][i].numpy(), "next_observation": td["next", "observation"][i].numpy(),
            "step": int(td["step"][i]), "terminated": bool(td["next", "terminated"][i]),
            "truncated": bool(td["next", "truncated"][i]), "reward": float(td["next", "reward"][i]),
            "discount": float(td["next", "discount"][i]) if n_step else None,
        })
    return out


@pytest.mark.slow
def test_rlfleet_run_on_stacked_frames_stores_each_once_and_every_read_is_exact(tmp_path):
    config = tmp_path / "frames.yaml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", "run", str(config), f"run.dir={tmp_path / 'runs'}",
                           "--plain"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["frames"] >= 3000 and summary["learner_steps"] > 0, summary
    inserted = 0
    for k in range(2):
        rb = ReplayBuffer.open(run_dir / "buffer" / f"shard-{k}", seed=k)
        assert rb.frame_stack == {"key": ["observation"], "padding": "reset", "size": STACK}
        meta = json.loads((run_dir / "buffer" / f"shard-{k}" / "meta.json").read_text())
        stored = {".".join(e["key"]): e["shape"] for e in meta["schema"]}
        assert stored["frame_stack.frame"] == [8, 8] and "observation" not in stored
        inserted += rb.total_inserted
        assert rb.total_inserted > rb.capacity  # the ring wrapped
        sample = rb.sample(300)
        assert sample["observation"].shape == (300, STACK, 8, 8)
        for row in rows_of(sample, n_step=True):
            check_row(row, N)
        everything = rb[:]
        assert len(everything) > rb.capacity // 2
        for row in rows_of(everything, n_step=False):
            check_row(row, 1)
        # both collectors' rows, one collector per shard
        assert len(set(everything["collector_id"].tolist())) == 1
        rb.close()
    # each episode adds one reset row: inserted rows exceed the frames by the episodes begun
    assert summary["frames"] < inserted < summary["frames"] * 1.5
