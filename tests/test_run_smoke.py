"""``rlfleet run configs/smoke.yaml`` end to end, as a user runs it: a real subprocess.

It starts its own embedded Ray, collects CartPole with a collector actor, learns with a
DQN learner and broadcasts weights back. The test then reads what the run left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rlfleet.buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = ["config.yaml", "metrics.jsonl", "returns.png", "summary.json", "policy_state.pt", "policy.pt2", "policy.json"]
# Mean return of uniformly random actions on CartPole-v1 is about 22.
RANDOM_RETURN = 22.0


def _default_sigint() -> None:
    # A process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt; give the child the default
    # so Ctrl-C (SIGINT) reaches `rlfleet run` however this test run was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _rlfleet(args: list[str], **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlfleet.launch.cli", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_default_sigint, **kwargs,
    )


def _only_run_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _greedy_return(policy_path: Path, episodes: int = 5) -> float:
    import gymnasium

    program = torch.export.load(policy_path).module()
    env = gymnasium.make("CartPole-v1")
    total = 0.0
    for episode in range(episodes):
        obs, _ = env.reset(seed=1000 + episode)
        done = False
        while not done:
            action = int(program(torch.as_tensor(obs[None]))[0])
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
    env.close()
    return total / episodes


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = _rlfleet(["run", "configs/smoke.yaml", f"run.dir={root}", "--plain"])
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out, _only_run_dir(root)


def test_smoke_run_leaves_a_complete_run_directory(smoke_run):
    code, out, run_dir = smoke_run
    assert code == 0, out
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"{name} missing; output:\n{out}"
    assert list((run_dir / "checkpoints").iterdir()), "no learner checkpoint"
    assert (run_dir / "buffer" / "shard-0" / "meta.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "total_frames"
    # one collector of 128-frame batches: the fleet's budget stops it within two of them
    assert 6000 <= summary["frames"] < 6000 + 2 * 128, summary
    # learner_steps_per_frame=0.25 counts from the frame that brought the buffer to its 500
    # rows (the first 128-frame batch past them, at the latest), and a run that reaches
    # total_frames takes every step its frames paid for before it stops
    assert 0.25 * (summary["frames"] - 500 - 128) - 1 <= summary["learner_steps"] <= 0.25 * summary["frames"], summary
    assert "run finished" in out and "stopped by" in out
    # start-up is reported apart, and frames/s counts only the time spent collecting
    assert 0 < summary["startup_s"] < summary["wall_s"]
    # (collecting_s is stored rounded to the millisecond)
    assert summary["frames_per_s"] == pytest.approx(summary["frames"] / summary["collecting_s"], rel=1e-3)
    assert f"start-up                     {summary['startup_s']:.1f} s (Ray, placement, actors)" in out
    # the run started its own Ray and said so; its end did not wait on a weight group
    assert "started an embedded Ray at " in out
    assert "did not form" not in out and "did not complete cleanly" not in out, out


def test_smoke_run_metrics_count_up(smoke_run):
    _, out, run_dir = smoke_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 3
    frames = [r["frames"] for r in records]
    steps = [r["learner/steps"] for r in records]
    assert frames == sorted(frames) and steps == sorted(steps)
    assert frames[-1] >= 6000 and steps[-1] > 0
    assert {"frames_per_s", "buffer/size", "return_mean", "learner/policy_lag"} <= set(records[-1])


def test_weights_reached_the_collectors(smoke_run):
    _, _, run_dir = smoke_run
    with ReplayBuffer.open(run_dir / "buffer" / "shard-0") as rb:
        versions = rb[:]["policy_version"].numpy()
        total = rb.total_inserted
    assert total >= 6000
    # One collector writes in order, so the versions it stamped never go down ...
    assert np.all(np.diff(versions) >= 0)
    # ... and they rose: the rows collected last were acted by published weights.
    assert versions[0] == 0 and versions[-1] > 0
    assert len(np.unique(versions)) >= 3


def test_learning_moved_the_return_above_random(smoke_run):
    _, _, run_dir = smoke_run
    assert _greedy_return(run_dir / "policy.pt2") > 3 * RANDOM_RETURN


def test_resume_into_a_buffer_of_another_env_is_refused_before_anything_starts(smoke_run):
    _, _, run_dir = smoke_run
    proc = _rlfleet(["run", "--resume", str(run_dir), "env.id=Pendulum-v1"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "SchemaMismatch: resume: key 'observation' of the buffer at" in out
    assert "is [4] float32 but the env gives [3] float32" in out
    assert json.loads((run_dir / "summary.json").read_text())["stop_reason"] == "total_frames"


def _wait_for_learning(root: Path, proc: subprocess.Popen, timeout_s: float = 240.0) -> Path:
    """The run directory, once its metrics show learner steps."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = [p for p in root.iterdir() if p.is_dir()]
        metrics = dirs[0] / "metrics.jsonl" if dirs else None
        if metrics is not None and metrics.exists():
            lines = [line for line in metrics.read_text().splitlines() if line.endswith("}")]
            if any(json.loads(line).get("learner/steps", 0) > 0 for line in lines):
                return dirs[0]
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no learner steps within {timeout_s} s; output:\n{proc.communicate()[0]}")


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_continues_the_run(tmp_path):
    proc = _rlfleet(["run", "configs/smoke.yaml", f"run.dir={tmp_path}", "run.total_frames=1000000",
                     "run.time_limit_s=600", "--plain"])
    run_dir = _wait_for_learning(tmp_path, proc)
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["stop_reason"] == "interrupted"
    assert first["learner_steps"] > 0
    assert (run_dir / "policy.pt2").is_file() and (run_dir / "returns.png").is_file()
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    assert "run finished" in out

    # Continue it: frames count on from the first session, the buffer keeps its rows.
    target = first["frames"] + 1500
    proc = _rlfleet(["run", "--resume", str(run_dir), f"run.total_frames={target}", "--plain"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["stop_reason"] == "total_frames"
    assert target <= second["frames"] < target + 2 * 128, second
    assert second["learner_steps"] > first["learner_steps"]
    with ReplayBuffer.open(run_dir / "buffer" / "shard-0") as rb:
        assert rb.total_inserted >= target
        rows = rb[:]
        versions = rows["policy_version"].numpy()
        episode_ids, steps = rows["episode_id"].numpy(), rows["step"].numpy()
    # Episode ids stay unique across the two sessions: no (episode, step) pair twice, and
    # the second session's collectors carry on from the first one's incarnations.
    pairs = np.stack([episode_ids, steps], axis=1)
    assert len(np.unique(pairs, axis=0)) == len(pairs)
    assert first["collector/next_incarnation"] >= 1
    assert (episode_ids[-1] >> 32) & 0xFFFF >= first["collector/next_incarnation"]
    # Rows of the second session were acted by weights at least as new as the checkpoint.
    assert versions[-1] >= first["policy_version"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in records] == sorted(r["frames"] for r in records)
