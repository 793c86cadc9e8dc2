"""``configs/atari_dqn.yaml`` end to end on CPU: EnvPool Pong, the Nature CNN, double DQN,
prioritized 3-step replay with each frame stored once.

A real ``rlfleet run`` subprocess, as a user starts it, cut to 20k frames and few learner
steps (a CPU in CI learns too slowly for more). The test reads the run directory it
leaves and the buffer's files. Needs ``rlfleet[atari]``: CI's last step installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("envpool", reason='needs the atari extra: pip install -e ".[atari]"')

from rlfleet.buffer import ReplayBuffer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.atari]
ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = ["config.yaml", "metrics.jsonl", "returns.png", "summary.json", "policy_state.pt", "policy.pt2", "policy.json"]


def test_atari_config_runs_20k_frames_and_leaves_a_complete_run(tmp_path):
    overrides = [f"run.dir={tmp_path}", "run.total_frames=20000", "run.learner_steps_per_frame=0.01",
                 "collector.init_random_frames=2000", "buffer.capacity=1GB", "buffer.rate_limiter.min_size_to_sample=2000",
                 "learner.target_update_every=50", "learner.publish_every=50", "ray.num_cpus=4"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", "run", "configs/atari_dqn.yaml", *overrides,
                           "--plain"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["frames"] >= 20000 and summary["learner_steps"] >= 150, summary
    rb = ReplayBuffer.open(run_dir / "buffer" / "shard-0")
    try:
        assert rb.frame_stack == {"key": ["observation"], "padding": "reset", "size": 4}
        assert rb.schema[("observation",)] == ((4, 84, 84), rb.schema[("observation",)][1])
        meta = json.loads((run_dir / "buffer" / "shard-0" / "meta.json").read_text())
        stored = {".".join(e["key"]): e["shape"] for e in meta["schema"]}
        assert stored["frame_stack.frame"] == [84, 84] and "observation" not in stored
        # 2 collectors x 8 envs: every transition stored, plus one reset row per episode begun
        assert summary["frames"] <= rb.total_inserted <= summary["frames"] + 200
        batch = rb.sample(64)
        assert batch["observation"].shape == (64, 4, 84, 84)
        # 3-step windows: gamma ** 3, or fewer steps only where the episode ended
        k = (batch["next", "discount"].log() / torch.tensor(0.99).log()).round().flatten()
        assert set(k.tolist()) <= {1.0, 2.0, 3.0} and (k == 3).any()
        assert ((k == 3) | batch["next", "done"].flatten()).all()
    finally:
        rb.close()
