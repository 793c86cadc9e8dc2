"""The checks ``rlfleet run`` makes before it starts anything, and its command line errors."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

from rlfleet.buffer.errors import SchemaMismatch
from rlfleet.launch.cli import main
from rlfleet.launch.config import RunConfig, parse_config
from rlfleet.launch.preflight import check_placement, check_resume_schema, resume_exploration
from rlfleet.launch.session import Stop

PLACEMENT = [
    ("cpu_short", "collector: {num_workers: 3}\nlearner: {num_learners: 2}", {"CPU": 4.0},
     r"placement: the run needs 5 CPU \(3 collector\(s\) x 1 \+ 2 learner\(s\) x 1\) but the cluster has 4 CPU; "
     r"lower collector.num_workers or learner.num_learners"),
    ("no_gpu", "learner: {device: cuda, num_learners: 2}", {"CPU": 16.0},
     r"placement: the run needs 2 GPU \(2 learner\(s\) x 1\) but the cluster has 0 GPU"),
    ("gpu_short", "learner: {device: cuda}\ncollector: {device: cuda, num_gpus: 0.5, num_workers: 4}",
     {"CPU": 16.0, "GPU": 2.0},
     r"needs 3 GPU \(1 learner\(s\) x 1 \+ 4 collector\(s\) x 0.5\) but the cluster has 2 GPU"),
]


@pytest.mark.parametrize("text,resources,match", [c[1:] for c in PLACEMENT], ids=[c[0] for c in PLACEMENT])
def test_placement_names_the_short_resource(text, resources, match):
    with pytest.raises(ValueError, match=match):
        check_placement(parse_config(text), resources)


def test_placement_accepts_a_run_that_fits():
    check_placement(parse_config("collector: {num_workers: 2}\nlearner: {num_learners: 2}"), {"CPU": 4.0})
    check_placement(parse_config("learner: {device: cuda}"), {"CPU": 3.0, "GPU": 1.0})


CARTPOLE_SCHEMA = {
    ("observation",): ((4,), np.dtype("float32")),
    ("next", "observation"): ((4,), np.dtype("float32")),
    ("action",): ((), np.dtype("int64")),
    ("next", "reward"): ((1,), np.dtype("float32")),
    ("next", "terminated"): ((1,), np.dtype("bool")),
    ("next", "truncated"): ((1,), np.dtype("bool")),
    ("next", "done"): ((1,), np.dtype("bool")),
}
# The same rows in buffer format 1: reward and flags at the root, shape [].
FORMAT_1_SCHEMA = {
    **{k: v for k, v in CARTPOLE_SCHEMA.items() if k[0] != "next" or k == ("next", "observation")},
    **{(k,): ((), np.dtype("bool")) for k in ("terminated", "truncated", "done")},
    ("reward",): ((), np.dtype("float32")),
}


def _spaces(env_id):
    env = gymnasium.make(env_id)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def test_resume_schema_accepts_the_same_env():
    check_resume_schema(CARTPOLE_SCHEMA, *_spaces("CartPole-v1"), "runs/x/buffer")
    check_resume_schema(None, *_spaces("Pendulum-v1"), "runs/x/buffer")  # an empty buffer


def test_resume_schema_refuses_another_env():
    with pytest.raises(SchemaMismatch, match=(
        r"resume: key 'observation' of the buffer at runs/x/buffer is \[4\] float32 but the env "
        r"gives \[3\] float32; resume with the run's own env settings")):
        check_resume_schema(CARTPOLE_SCHEMA, *_spaces("Pendulum-v1"), "runs/x/buffer")
    with pytest.raises(SchemaMismatch, match=r"resume: the buffer at b has no key 'next.observation'"):
        check_resume_schema({("observation",): ((4,), np.dtype("float32"))}, *_spaces("CartPole-v1"), "b")


def test_resume_schema_refuses_format_1_rows():
    with pytest.raises(SchemaMismatch, match=(
        r"resume: the buffer at runs/x/buffer holds format-1 rows \(reward and flags at the root\) and "
        r"this rlfleet writes format 2 \(TorchRL's layout: 'next.reward', 'next.done', ...\); migrate "
        r"it in place with `rlfleet check --upgrade runs/x/buffer`, or start a new run")):
        check_resume_schema(FORMAT_1_SCHEMA, *_spaces("CartPole-v1"), "runs/x/buffer")
    flat_reward = {**CARTPOLE_SCHEMA, ("next", "reward"): ((), np.dtype("float32"))}
    with pytest.raises(SchemaMismatch, match=r"key 'next.reward' of the buffer at b is \[\] float32 but the env gives \[1\] float32"):
        check_resume_schema(flat_reward, *_spaces("CartPole-v1"), "b")


def test_resume_continues_the_exploration_schedule():
    config = parse_config(
        "collector: {num_workers: 2, init_random_frames: 1000, "
        "exploration: {start: 1.0, end: 0.1, frames: 10000}}"
    )
    halfway = resume_exploration(config, 10_000)  # 5000 frames per actor: half the decay
    exploration = halfway.collector.exploration
    assert halfway.collector.init_random_frames == 0
    assert exploration.start == pytest.approx(0.55)
    assert (exploration.end, exploration.frames) == (0.1, 5000)
    done = resume_exploration(config, 50_000).collector.exploration
    assert (done.start, done.frames) == (pytest.approx(0.1), 0)


def test_stop_conditions_in_order():
    config = parse_config("run: {total_frames: 1000, target_return: 100, return_window: 3, time_limit_s: 60}")
    stop = Stop(config, 0, started=0.0)
    assert stop(999, [100.0, 100.0], now=1.0) is None  # two episodes: the window is not full
    assert stop(999, [0.0, 100.0, 100.0, 100.0], now=1.0) == "target_return"
    assert stop(999, [100.0, 100.0, 99.0], now=1.0) is None
    assert stop(1000, [], now=1.0) == "total_frames"
    assert stop(10, [], now=60.0) == "time_limit"
    no_target = Stop(RunConfig(), 0, started=0.0)
    assert no_target(10, [1e9] * 50, now=1.0) is None


CLI_ERRORS = [
    ("missing_file", ["run", "nope.yaml"], r"rlfleet run: load_config: config file 'nope.yaml' does not exist"),
    ("bad_override", ["run", "configs/smoke.yaml", "learner.batch_size=abc"],
     r"override 'learner.batch_size=abc': learner.batch_size: expected int, got 'abc'"),
    ("unknown_override", ["run", "configs/smoke.yaml", "learner.batchsize=3"],
     r"did you mean 'learner.batch_size'\?"),
    ("no_config", ["run"], r"a CONFIG file is needed \(or --resume RUN_DIR\)"),
    ("resume_missing", ["run", "--resume", "no/such/run"], r"run directory 'no/such/run' does not exist"),
]


@pytest.mark.parametrize("argv,match", [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_run_command_reports_bad_input_without_starting_anything(argv, match, capsys, monkeypatch):
    import re
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_return_window_takes_an_equal_share_from_each_collector():
    from rlfleet.launch.session import window_returns

    stats = {
        "recent_returns": [1.0] * 30 + [2.0] * 30,  # collector 0's list, then collector 1's
        "collectors": [{"recent_returns": [1.0] * 30}, None, {"recent_returns": [2.0] * 30}],
    }
    window = window_returns(stats, 20)
    assert sorted(window) == [1.0] * 10 + [2.0] * 10
    one = {"recent_returns": [float(i) for i in range(50)], "collectors": [{"recent_returns": []}]}
    assert window_returns(one, 20) == [float(i) for i in range(30, 50)]
    assert window_returns({}, 20) == []


def test_an_unknown_env_fails_before_a_run_directory_or_ray_exists(tmp_path):
    # A fresh process: this test session may already hold a Ray cluster of its own.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    runs = tmp_path / "runs"
    code = (
        "import sys, ray\n"
        "from rlfleet.launch.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('ray initialized:', ray.is_initialized())\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "run", str(root / "configs" / "smoke.yaml"), "env.id=CartPol-v1",
         f"run.dir={runs}"],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rlfleet run: ValueError:" in out.stderr and "CartPole-v1" in out.stderr, out.stderr
    assert "ray initialized: False" in out.stdout
    assert not runs.exists()
