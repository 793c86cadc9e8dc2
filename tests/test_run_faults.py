"""Faults during ``rlfleet run``: kill a part of a running job, check the documented outcome.

Each case runs ``rlfleet run configs/smoke.yaml`` as a user does, in a subprocess, with two
collectors, two replay shards and two learners so every fault has a target. The run
joins the session's Ray cluster by address (cheaper than a second embedded Ray), so this
process finds the run's actors by name in namespace ``rlfleet`` and kills them the way a
crash would: ``ray.kill(actor, no_restart=False)`` or SIGKILL of the actor's process.

Outcomes (README, "When a part fails"):

- a collector or a replay shard dies: Ray restarts it, the run goes on to ``total_frames``
  (exit 0) and counts the restart (``restarts``, ``buffer/restarts``);
- a learner rank dies: the run stops at once with exit 1 and a message naming the rank;
  the buffer is closed intact and the last checkpoint kept, so ``--resume`` continues;
- the driver is SIGKILLed: the run's actors end with it; the committed rows stay on disk
  and ``--resume`` continues.

After every case ``rlfleet check`` verifies the buffer on disk, and the rows are checked
against what the run reported: no committed row lost, none stored twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from rlfleet.buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parent.parent
# two of everything, so each fault has a target and a survivor
TWO_OF_EACH = ["buffer.num_shards=2", "collector.num_workers=2", "learner.num_learners=2"]
RUN_TIMEOUT_S = 400.0


@dataclass
class Tally:
    """What the suite did so far; each case prints it as one figure line when it passes."""

    runs: int = 0
    faults: int = 0
    as_documented: int = 0
    buffers: int = 0
    rows: int = 0
    lost: int = 0
    cases: list[str] = field(default_factory=list)


TALLY = Tally()


def print_figures(capsys, case: str) -> None:
    """The suite's figure line so far (shown in CI output: capture is off for it)."""
    TALLY.cases.append(case)
    with capsys.disabled():
        print(f"\nfault suite: runs={TALLY.runs} faults injected={TALLY.faults} "
              f"outcomes as documented={TALLY.as_documented} buffers checked={TALLY.buffers} "
              f"rows checked={TALLY.rows} rows lost={TALLY.lost} (cases: {', '.join(TALLY.cases)})")


class Run:
    """One ``rlfleet run`` subprocess joined to the session's cluster; output to files."""

    def __init__(self, ray_cluster, root: Path, *args: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_AUTH_MODE"] = "token"
        address = ray_cluster.address_info["address"]
        stem = root.parent / f"{root.name}-{TALLY.runs}"
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlfleet.launch.cli", "run", *args, f"run.dir={root}", f"ray.address={address}",
             "--plain"],
            cwd=ROOT, env=env, stdout=self._out, stderr=self._err, text=True,
        )
        TALLY.runs += 1

    def output(self) -> str:
        return self.out_path.read_text() + "\n--- stderr ---\n" + self.err_path.read_text()[-6000:]

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def run_dir(self) -> Path:
        dirs = [p for p in self.root.iterdir() if p.is_dir()]
        assert len(dirs) == 1, dirs
        return dirs[0]

    def records(self) -> list[dict]:
        dirs = [p for p in self.root.iterdir() if p.is_dir()]
        path = dirs[0] / "metrics.jsonl" if dirs else None
        if path is None or not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def wait_for(self, predicate, what: str, timeout_s: float = 240.0):
        """Poll ``predicate(records)`` while the run lives; fail (and kill it) otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            value = predicate(self.records())
            if value:
                return value
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"run: no {what} within {timeout_s:g} s (exit {self.proc.returncode}); "
                             f"output:\n{self.output()}")

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run did not end within {timeout_s:g} s; output:\n{self.output()}") from None
        self._out.close()
        self._err.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)


def actor(run_name: str, part: str):
    import ray

    return ray.get_actor(f"rlfleet:{run_name}:{part}", namespace="rlfleet")


def actor_pid(run_name: str, part: str) -> int:
    import ray

    handle = actor(run_name, part)
    if part.startswith("shard-"):
        return int(ray.get(handle.ping.remote(), timeout=60))
    # collectors and learners have no ping: run a one-line function inside the actor
    return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60))


def wait_until_gone(run_name: str, timeout_s: float = 120.0) -> None:
    """Wait until no actor of the run is listed (a killed driver's actors end asynchronously)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        if not any(n.startswith(f"rlfleet:{run_name}:") for n in names):
            return
        time.sleep(0.2)
    raise AssertionError(f"actors of {run_name} still listed after {timeout_s:g} s")


def check_on_disk(buffer_dir: Path) -> dict:
    """``rlfleet check --json PATH`` must exit 0; returns its report."""
    out = subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", "check", "--json", str(buffer_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and len(report["buffers"]) == 2, report
    TALLY.buffers += len(report["buffers"])
    TALLY.rows += sum(b["rows_checked"] for b in report["buffers"])
    return report


def rows_on_disk(buffer_dir: Path) -> tuple[int, np.ndarray]:
    """(total rows committed over the shards, the (episode_id, step) pairs of every row)."""
    total, pairs = 0, []
    for k in (0, 1):
        with ReplayBuffer.open(buffer_dir / f"shard-{k}") as rb:
            assert len(rb) == rb.total_inserted, "nothing was overwritten: capacity exceeds the run"
            total += rb.total_inserted
            rows = rb[:]
            pairs.append(np.stack([rows["episode_id"].numpy(), rows["step"].numpy()], axis=1))
    return total, np.concatenate(pairs)


def assert_no_row_lost_or_doubled(buffer_dir: Path, reported_rows: int) -> int:
    """Every row the run reported stored is on disk, none twice; returns the rows on disk."""
    check_on_disk(buffer_dir)
    total, pairs = rows_on_disk(buffer_dir)
    # each (episode, step) is one env step, collected once: a row stored twice would repeat
    assert len(np.unique(pairs, axis=0)) == len(pairs) == total
    lost = max(0, reported_rows - total)
    TALLY.lost += lost
    assert lost == 0, f"{reported_rows} rows reported stored, {total} on disk"
    return total



def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def kill(run_name: str, part: str, how: str) -> None:
    """Kill one actor of the run as a crash would: ``ray.kill`` (Ray may restart it) or
    SIGKILL of its process."""
    import ray

    if how == "ray.kill":
        ray.kill(actor(run_name, part), no_restart=False)
    else:
        os.kill(actor_pid(run_name, part), signal.SIGKILL)
    TALLY.faults += 1


COLLECTOR_AND_SHARD = [
    pytest.param("ray.kill", "sigkill", id="ray_kill_collector+sigkill_shard", marks=pytest.mark.slow),
    pytest.param("sigkill", "ray.kill", id="sigkill_collector+ray_kill_shard", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("collector_kill,shard_kill", COLLECTOR_AND_SHARD)
def test_a_dead_collector_and_shard_are_restarted_and_the_run_completes(
        ray_cluster, tmp_path, capsys, collector_kill, shard_kill):
    run = Run(ray_cluster, tmp_path / "runs", "configs/smoke.yaml", *TWO_OF_EACH, "run.total_frames=8000")
    # as soon as the loop runs: the run has most of its frames still to collect
    run.wait_for(lambda rs: any(r["frames"] > 0 for r in rs), "collected frames")
    run_dir = run.run_dir()
    kill(run_dir.name, "collector-0", collector_kill)
    kill(run_dir.name, "shard-1", shard_kill)
    code = run.wait()
    assert code == 0, run.output()
    summary = summary_of(run_dir)
    assert summary["stop_reason"] == "total_frames", summary
    # the fleet holds total_frames by itself, however long the driver waits on the restarting
    # shard: each of the 2 collectors stops within two 128-frame batches of it
    assert 8000 <= summary["frames"] < 8000 + 2 * 2 * 128, summary
    assert summary["learner_steps"] > 0
    # each restart counted once, in the summary and in the metrics
    assert (summary["restarts"], summary["shard_restarts"]) == (1, 1), summary
    last = run.records()[-1]
    assert (last["collector/restarts"], last["buffer/restarts"]) == (1, 1), last
    stored = assert_no_row_lost_or_doubled(run_dir / "buffer", summary["frames"])
    # the restarted collector is a new incarnation: its episodes carry a new id
    _, pairs = rows_on_disk(run_dir / "buffer")
    incarnations = {(int(e) >> 48, (int(e) >> 32) & 0xFFFF) for e in pairs[:, 0]}
    assert {(0, 1), (1, 0)} <= incarnations <= {(0, 0), (0, 1), (1, 0)}, incarnations
    assert stored >= 8000
    TALLY.as_documented += 1
    print_figures(capsys, f"collector {collector_kill} + shard {shard_kill}")


@pytest.mark.slow
def test_a_dead_learner_rank_stops_the_run_with_a_clear_message_and_data_intact(ray_cluster, tmp_path, capsys):
    run = Run(ray_cluster, tmp_path / "runs", "configs/smoke.yaml", *TWO_OF_EACH, "run.total_frames=1000000")
    run.wait_for(lambda rs: any(r.get("learner/steps", 0) >= 200 for r in rs), "200 learner steps")
    run_dir = run.run_dir()
    kill(run_dir.name, "learner-1", "sigkill")
    code = run.wait()
    out = run.output()
    assert code == 1, out
    name = run_dir.name
    assert f"rlfleet run: LearnerGroupError: learner rank(s) [1] (rlfleet:{name}:learner-1) died after step" in run.stderr, out
    assert f"continue with `rlfleet run --resume {run_dir}`" in run.stderr, out
    summary = summary_of(run_dir)
    assert summary["stop_reason"] == "error" and summary["learner_steps"] >= 200, summary
    # rank 0 survived its failed step: its state at the last completed step is saved
    assert (run_dir / "checkpoints" / f"learner-{summary['learner_steps']:09d}.pt").is_file()
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    wait_until_gone(name)
    reported = max(summary["frames"], run.records()[-1]["buffer/size"])
    assert_no_row_lost_or_doubled(run_dir / "buffer", reported)
    TALLY.as_documented += 1
    print_figures(capsys, "learner rank 1 sigkill")


@pytest.mark.slow
def test_a_killed_driver_leaves_the_buffer_intact_and_the_run_resumes(ray_cluster, tmp_path, capsys):
    run = Run(ray_cluster, tmp_path / "runs", "configs/smoke.yaml", *TWO_OF_EACH, "run.total_frames=1000000")
    run.wait_for(lambda rs: any(r.get("learner/steps", 0) >= 200 for r in rs), "200 learner steps")
    run_dir = run.run_dir()
    run.wait_for(lambda rs: (run_dir / "checkpoints" / "latest.pt").is_file(), "a checkpoint")
    run.proc.send_signal(signal.SIGKILL)  # the driver and its connection to the cluster
    TALLY.faults += 1
    assert run.wait() == -signal.SIGKILL
    # the run's actors are owned by the driver: Ray ends every one of them
    wait_until_gone(run_dir.name)
    assert not (run_dir / "summary.json").exists()
    last = run.records()[-1]
    stored = assert_no_row_lost_or_doubled(run_dir / "buffer", max(last["frames"], last["buffer/size"]))

    target = stored + 1000
    again = Run(ray_cluster, tmp_path / "runs", "--resume", str(run_dir), f"run.total_frames={target}")
    assert again.wait() == 0, again.output()
    summary = summary_of(run_dir)
    assert summary["stop_reason"] == "total_frames" and summary["frames"] >= target, summary
    assert summary["learner_steps"] > last["learner/steps"]
    assert_no_row_lost_or_doubled(run_dir / "buffer", summary["frames"])
    TALLY.as_documented += 1
    print_figures(capsys, "driver sigkill + resume")
