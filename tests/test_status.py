"""``rlfleet status``: component states from the live cluster, on the session's real Ray.

A real replay service's shard actors are started, killed (with and without a restart)
and stopped; the table must follow: running, restarting then running again with one
restart, stopped while the service lives, gone once it is shut down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rlfleet.buffer import ReplayService
from rlfleet.launch.cli import main
from rlfleet.launch.status import list_components

NAME = "st-svc"


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    # One service for the module (a shard takes seconds to start); the test that kills
    # its shards runs last.
    svc = ReplayService.launch(NAME, tmp_path_factory.mktemp("status") / "buf", capacity=100, num_shards=2, seed=0)
    yield svc
    if NAME in ReplayService.running():
        ReplayService.shutdown(NAME, delete=True)


def _this_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _states() -> dict[str, tuple[str, int]]:
    return {c.component: (c.state, c.restarts) for c in list_components(NAME)}


def _wait_for(predicate, timeout_s: float = 60.0):
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _states()
        seen.append(states)
        if predicate(states):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"states never matched; last seen {seen[-3:]}")


def test_running_shards_are_listed_with_their_node_and_pid(service):
    import ray

    components = list_components(NAME)
    assert [(c.actor_name, c.component, c.state, c.ray_state) for c in components] == [
        (f"rlfleet:{NAME}:shard-0", "shard-0", "running", "ALIVE"),
        (f"rlfleet:{NAME}:shard-1", "shard-1", "running", "ALIVE"),
    ]
    here = _this_node()
    ip = ray.util.get_node_ip_address()
    assert all(c.node_id == here and c.node_ip == ip and c.restarts == 0 and c.pid > 0 for c in components)
    assert list_components("no-such-run") == []


def test_status_command_shows_states_nodes_and_json(service, capsys):
    import ray

    assert main(["status", NAME]) == 0
    out = capsys.readouterr().out
    here = _this_node()
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["buffer", "shard", "node"]
    rows = [line.split() for line in lines if line.startswith(f"rlfleet:{NAME}:")]
    ip = ray.util.get_node_ip_address()
    assert [r[:4] for r in rows] == [[f"rlfleet:{NAME}:shard-0", "running", ip, here[:8]],
                                     [f"rlfleet:{NAME}:shard-1", "running", ip, here[:8]]]
    node_rows = [line.split() for line in lines if line.startswith(here[:8])]
    assert node_rows == [[here[:8], ip, "alive", "8", "0", "2"]]

    assert main(["status", NAME, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert sorted(got) == ["buffers", "components", "nodes", "unavailable"]
    assert got["buffers"][NAME]["total"]["num_shards"] == 2 and got["unavailable"] == {}
    assert [(c["component"], c["state"], c["node_id"]) for c in got["components"]] == [
        ("shard-0", "running", here), ("shard-1", "running", here)]
    assert [(n["node_id"], n["alive"]) for n in got["nodes"]] == [(here, True)]


def test_watch_redraws_the_given_number_of_times(service, capsys):
    assert main(["status", NAME, "--watch", "0.2", "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("every 0.2s: rlfleet status st-svc  ")]
    assert len(headers) == 3
    assert out.count(f"rlfleet:{NAME}:shard-1  running") == 3

    assert main(["status", NAME, "--watch", "0.2", "--iterations", "2", "--json"]) == 0
    frames = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(frames) == 2 and all(len(f["components"]) == 2 for f in frames)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["status", "--watch", "0"], "error: --watch 0: must be > 0 seconds"),
        (["status", "--watch", "1", "--iterations", "0"], "error: --iterations 0: must be at least 1"),
        (["status", "no-such-run"], "error: no replay buffer named 'no-such-run'; running:"),
    ],
)
def test_bad_status_arguments_fail_with_one_line(ray_cluster, argv, message, capsys):
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith(message)


def test_status_and_stop_look_in_the_namespace_they_are_given(ray_cluster, tmp_path, capsys):
    ReplayService.launch("st-ns", tmp_path / "buf", capacity=10, namespace="custom")
    assert main(["status", "--namespace", "custom", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert list(got["buffers"]) == ["st-ns"]
    assert [c["actor_name"] for c in got["components"]] == ["rlfleet:st-ns:shard-0"]
    assert main(["status", "st-ns"]) == 1  # not in the default namespace
    assert "no replay buffer named 'st-ns'" in capsys.readouterr().err
    assert main(["stop", "st-ns"]) == 1
    capsys.readouterr()
    assert main(["stop", "st-ns", "--namespace", "custom"]) == 0
    assert ReplayService.running(namespace="custom") == []
    with pytest.raises(SystemExit, match=r"^error: --namespace = 'bad name': use 1-64 letters"):
        main(["status", "--namespace", "bad name"])  # exits with that line, as a failed join does


@pytest.mark.slow  # a whole run: half a minute and more of actor start-up
def test_a_run_in_its_own_namespace_shows_there_and_only_there(ray_cluster, tmp_path, capsys):
    """ray.namespace reaches the service, the collectors and the learners, and
    ``rlfleet status --namespace`` finds them all while the run collects."""
    import threading

    from rlfleet.launch import load_config, run

    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "configs" / "smoke.yaml", {
        "ray.namespace": "custom", "run.dir": str(tmp_path), "run.total_frames": 100_000,
        "run.log_every_s": 0.2, "learner.checkpoint_every": 100_000,
    })
    stop = threading.Event()
    seen: dict[str, object] = {}

    def on_record(record: dict) -> None:
        # called by the run's loop, so every part is up; look once, then stop the run
        if stop.is_set():
            return
        seen["custom"] = main(["status", "--namespace", "custom", "--json"]), capsys.readouterr().out
        seen["default"] = main(["status", "--json"]), capsys.readouterr().out
        stop.set()

    result = run(config, progress=on_record, stop_event=stop)
    assert result.stop_reason == "interrupted"
    run_name = result.run_dir.name
    code, out = seen["custom"]
    got = json.loads(out)
    assert code == 0 and list(got["buffers"]) == [run_name]
    assert [(c["actor_name"], c["state"]) for c in got["components"]] == [
        (f"rlfleet:{run_name}:shard-0", "running"),
        (f"rlfleet:{run_name}:collectors", "running"),
        (f"rlfleet:{run_name}:collector-0", "running"),
        (f"rlfleet:{run_name}:learner-0", "running"),
    ]
    code, out = seen["default"]
    got = json.loads(out)
    assert code == 0 and run_name not in got["buffers"]
    assert not [c for c in got["components"] if c["group"] == run_name]
    # gone from its namespace once the run ended
    assert main(["status", run_name, "--namespace", "custom"]) == 1
    assert "no replay buffer named" in capsys.readouterr().err


def test_a_killed_shard_restarts_and_a_stopped_one_shows_stopped(service):
    import ray

    shard0 = ray.get_actor(f"rlfleet:{NAME}:shard-0", namespace="rlfleet")
    pid_before = {c.component: c.pid for c in list_components(NAME)}["shard-0"]
    ray.kill(shard0, no_restart=False)
    seen = _wait_for(lambda s: s["shard-0"] == ("running", 1))
    assert {s["shard-0"][0] for s in seen} <= {"running", "restarting", "starting"}
    assert {c.component: c.pid for c in list_components(NAME)}["shard-0"] != pid_before

    ray.kill(ray.get_actor(f"rlfleet:{NAME}:shard-1", namespace="rlfleet"), no_restart=True)
    _wait_for(lambda s: s["shard-1"][0] == "stopped")
    stopped = {c.component: c for c in list_components(NAME)}["shard-1"]
    assert stopped.ray_state == "DEAD" and stopped.pid is None

    ReplayService.shutdown(NAME)
    # once nothing of the group lives, it leaves the listing
    assert list_components(NAME) == []
