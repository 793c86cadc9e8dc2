"""``rlfleet serve | status | sample | stop`` and ``rlfleet bench remote --quick`` on the
session's real local Ray cluster (the commands find it already initialised)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import BufferClient, ReplayService
from rlfleet.launch.cli import main


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        "name: svc-cli\n"
        "seed: 3\n"
        "buffer:\n"
        f"  path: {tmp_path / 'buf'}\n"
        "  capacity: 200\n"
        "  num_shards: 2\n"
        "  rate_limiter: {min_size_to_sample: 1, timeout_s: 5.0}\n"
    )
    yield path
    if "svc-cli" in ReplayService.running():
        ReplayService.shutdown("svc-cli", delete=True)


def test_serve_status_sample_stop_round_trip(ray_cluster, config, tmp_path, capsys):
    assert main(["serve", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"replay service 'svc-cli': 2 shard(s) under {tmp_path / 'buf'}" in out
    assert "BufferClient.connect('svc-cli')" in out and "rlfleet stop svc-cli" in out

    ids = torch.arange(10)
    BufferClient.connect("svc-cli").extend(
        TensorDict({"step": ids, "observation": ids.float()[:, None].repeat(1, 3)}, batch_size=[10]))

    assert main(["status"]) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[0].split()
    assert header[:8] == ["buffer", "shard", "node", "size", "capacity", "inserted", "sampled", "ins/s"]
    mine = [line.split() for line in table if line.startswith("svc-cli")]
    assert [(r[1], r[3], r[4]) for r in mine] == [("0", "10", "100"), ("1", "0", "100"),
                                                  ("all(2/2)", "10", "200")]

    assert main(["status", "svc-cli", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["buffers"]["svc-cli"]
    assert stats["total"]["size"] == 10 and [s["size"] for s in stats["shards"]] == [10, 0]

    assert main(["sample", "svc-cli", "-n", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in printed if line.startswith("row")] == \
        ["row 0: shard 0", "row 1: shard 0", "row 2: shard 0"]
    steps = [int(line.split(": ")[1]) for line in printed if line.startswith("  step:")]
    observations = [line for line in printed if line.startswith("  observation:")]
    assert len(steps) == 3 and all(0 <= s < 10 for s in steps)
    assert observations == [f"  observation: [{s}, {s}, {s}]" for s in steps]

    assert main(["stop", "svc-cli"]) == 0
    assert "stopped 'svc-cli' (data stays on disk" in capsys.readouterr().out
    assert "svc-cli" not in ReplayService.running()
    assert sorted(p.name for p in (tmp_path / "buf").iterdir()) == ["shard-0", "shard-1"]


def test_serve_again_from_another_path_refuses_to_report_where_the_data_is_not(ray_cluster, config, tmp_path, capsys):
    assert main(["serve", str(config)]) == 0
    capsys.readouterr()
    other = tmp_path / "elsewhere"
    assert main(["serve", str(config), f"buffer.path={other}"]) == 1
    assert capsys.readouterr().err == (
        f"error: buffer 'svc-cli' already runs with its data under {tmp_path / 'buf'}, not under {other}; "
        f"stop it first (`rlfleet stop svc-cli`) to serve it from {other}, or set buffer.path={tmp_path / 'buf'}\n"
    )
    # the same path again reattaches, and says where the data is
    assert main(["serve", str(config)]) == 0
    assert f"replay service 'svc-cli': 2 shard(s) under {tmp_path / 'buf'}" in capsys.readouterr().out
    assert not other.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["status", "nope"], "error: no replay buffer named 'nope'; running:"),
        (["sample", "nope"], "error: no replay buffer named 'nope' runs on this Ray cluster"),
        (["stop", "nope"], "error: no replay buffer named 'nope' runs on this Ray cluster"),
        (["stop", "../x"], "error: buffer name = '../x': use 1-64 letters"),
        (["sample", "svc-x", "-n", "0"], "error: -n 0: must be at least 1"),
    ],
)
def test_commands_fail_with_one_clear_line(ray_cluster, argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message), err


def test_bench_remote_quick_prints_its_figures_and_ratios(ray_cluster, capsys):
    from rlfleet.launch.bench import remote

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    remote.add_arguments(parser)
    args = parser.parse_args(["--quick", "--schemas", "cartpole", "--shards", "1", "--json"])
    assert remote.main(args) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["schema"], r["op"], r["batch"], r["prefetch"]) for r in results] == [
        ("cartpole", "insert", 1024, 0), ("cartpole", "sample", 256, 0),
        ("cartpole", "sample", 256, 2)]
    for r in results:
        assert r["rows_per_s"] > 0 and r["bare_rows_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["rows_per_s"] / r["bare_rows_per_s"])
    assert not [n for n in ReplayService.running() if n.startswith("bench-remote")]


@pytest.mark.slow  # a minute: two services, then the weight transports to one receiver
def test_bench_remote_over_several_shard_counts_prints_ratios_to_the_first(ray_cluster, capsys):
    from rlfleet.launch.bench import remote

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    remote.add_arguments(parser)
    args = parser.parse_args(["--quick", "--schemas", "cartpole", "--shards", "1,2", "--receivers", "1",
                              "--json"])
    assert remote.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["shards"], r["op"], r["prefetch"]) for r in out["results"]] == [
        (1, "insert", 0), (1, "sample", 0), (1, "sample", 2), (2, "insert", 0), (2, "sample", 0), (2, "sample", 2)]
    assert [(line["shards"], line["vs_shards"]) for line in out["scaling"]] == [(1, 1), (2, 1)]
    first, second = out["scaling"]
    assert first["p50_ratio"] == 1.0 and first["batches_ratio"] == 1.0
    assert second["p50_ratio"] == pytest.approx(second["p50_ms"] / first["p50_ms"])
    assert second["batches_ratio"] == pytest.approx(second["batches_per_s"] / first["batches_per_s"])
    assert 0 < first["p50_ms"] <= first["p99_ms"]
    (w,) = out["weights"]
    assert w["receivers"] == 1 and w["bytes"] > 0
    assert w["distributed_p50_ms"] > 0 and w["object_store_p50_ms"] > 0 and w["bare_gloo_p50_ms"] > 0
    assert w["distributed_ratio"] == 1.0 and w["object_store_ratio"] == 1.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--shards", "1,x"])
    assert not [n for n in ReplayService.running() if n.startswith("bench-remote")]


@pytest.mark.slow  # under a minute: a learner group, then the two weight transports
def test_bench_learner_prints_steps_and_weight_publish_times(ray_cluster, capsys):
    from rlfleet.launch.bench import learner

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    learner.add_arguments(parser)
    args = parser.parse_args(["--steps", "5", "--learners", "1", "--collectors", "2", "--repeats", "2",
                              "--rows", "2000", "--json"])
    assert learner.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["learners"]
    assert row["learners"] == 1 and row["steps_per_s"] > 0 and 0 <= row["sample_wait_share"] <= 1
    weights = out["weights"]
    assert weights["bytes"] > 0
    assert weights["distributed_p50_ms"] > 0 and weights["object_store_p50_ms"] > 0 and weights["bare_gloo_p50_ms"] > 0
    for kind in ("distributed", "object_store"):
        assert out["group"][kind]["publish_p50_ms"] > 0
    assert not [n for n in ReplayService.running() if n.startswith("bench-learner")]


@pytest.mark.slow  # 25 s: a fleet of real envs; the default run keeps bench remote's smoke test
def test_bench_collect_prints_its_figures_and_ratios(ray_cluster, capsys):
    """One short case (1 actor x 2 envs): fleet frames/s, the bare-loop ceiling measured
    before and after it, and their ratio; the fleet and its buffer are gone after."""
    from rlfleet.launch.bench import collect

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    collect.add_arguments(parser)
    args = parser.parse_args(["--actors", "1", "--envs", "2", "--seconds", "1", "--warmup-s", "0.5", "--json"])
    assert collect.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "collect" and out["env"] == "CartPole-v1"
    (case,) = out["results"]
    assert (case["actors"], case["envs"]) == (1, 2)
    before, after = case["bare_fps_before_after"]
    assert before > 0 and after > 0
    assert case["ceiling_fps"] == pytest.approx((before + after) / 2)
    assert case["frames_per_s"] > 0
    assert case["ratio"] == pytest.approx(case["frames_per_s"] / case["ceiling_fps"])
    assert 0 < case["env_share"] < 1 and 0 < case["policy_share"] < 1
    assert not [n for n in ReplayService.running() if n.startswith("bench-collect")]
