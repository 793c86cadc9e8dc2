"""``rlfleet run`` on a two-node cluster on one machine, then one node's raylet killed.

A child process starts the cluster (``ray.cluster_utils.Cluster``: two raylets, each
offering the ``rlfleet_buffer`` resource and its own metrics export port), then runs
``rlfleet run configs/smoke.yaml`` against it as a user would, in its own process, with
two shards and two collectors. While the run learns it checks, from outside the run:

- placement: one shard per node, one collector per node, every component running;
- ``rlfleet status --address ...`` from a separate process shows both nodes;
- each node's Prometheus endpoint serves its own shard's metrics, and together they
  serve every series the Grafana dashboard queries;
- both shards took inserts and served samples (the learner samples from both).

Then it kills the second node's raylet. The documented outcome: the run stops with a
message naming the lost node and shard, and the surviving node's shard passes
``rlfleet check``; the rows written before the kill went to each collector's own
node's shard.

The cluster cannot share the test session's, so all of this runs in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_grafana_dashboard import _queried_series

# Series a counter starts only at its first priority update: this run samples uniformly
# (tests/test_service_metrics.py scrapes them from a prioritized service).
ONLY_PRIORITIZED = {"ray_rlfleet_buffer_priority_updates_total",
                    "ray_rlfleet_buffer_priority_updates_skipped_total"}

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = r'''
import json, os, re, signal, socket, subprocess, sys, time, urllib.request
import ray
from ray.cluster_utils import Cluster
from rlfleet.buffer import BufferClient, ReplayBuffer
from rlfleet.buffer import running_buffers
from rlfleet.launch.status import list_components

root, run_root, wanted = sys.argv[1], sys.argv[2], set(json.loads(sys.argv[3]))
# The processes joining by address inherit this one's auth mode (RAY_AUTH_MODE), so they
# speak to the cluster as it was started.
env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if run.poll() is not None:
            raise SystemExit(f"the run ended while waiting for {what}:\n{run.communicate()[0][-6000:]}")
        time.sleep(1.0)
    raise SystemExit(f"timed out waiting for {what}")


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


ports = [free_port(), free_port()]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 3, "resources": {"rlfleet_buffer": 1}, "metrics_export_port": ports[0],
    "include_dashboard": False})
# One CPU on the second node: one collector there, the learner on the head.
second = cluster.add_node(num_cpus=1, resources={"rlfleet_buffer": 1}, metrics_export_port=ports[1])
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="rlfleet", log_to_driver=False)
head_id, second_id = cluster.head_node.node_id, second.node_id
run = subprocess.Popen(
    [sys.executable, "-m", "rlfleet.launch.cli", "run", "configs/smoke.yaml", f"ray.address={cluster.address}",
     f"run.dir={run_root}", "buffer.num_shards=2", "buffer.node_resource=rlfleet_buffer", "buffer.capacity=2000000",
     "collector.num_workers=2", "run.total_frames=100000000", "run.time_limit_s=600",
     # free-running learners held back by the rate limiter, so its waits are exported
     "run.learner_steps_per_frame=null", "buffer.rate_limiter.samples_per_insert=4",
     "buffer.rate_limiter.error_margin=512", "--plain"],
    cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
out = {"head": head_id, "second": second_id}
try:
    name = wait("the replay service", lambda: next(iter(running_buffers()), None), 240)
    client = BufferClient.connect(name)

    def both_shards_busy():
        shards = client.stats()["shards"]
        return shards if all(s.get("total_inserted", 0) > 0 and s.get("samples", 0) > 0 for s in shards) else None

    shards = wait("inserts and samples on both shards", both_shards_busy, 240)
    out["shard_nodes"] = [s["node_id"] for s in shards]
    out["components"] = {c.component: [c.state, c.node_id] for c in list_components(name)}

    status = subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", "status", "--address", cluster.address],
                            cwd=root, env=env, capture_output=True, text=True, timeout=120)
    out["status"] = [status.returncode, status.stdout, status.stderr[-3000:]]

    def all_series():
        found = {}
        for node, port in zip((head_id, second_id), ports):
            text = scrape(port)
            found[node] = {
                "names": sorted(set(re.findall(r"^(ray_rlfleet_[a-z_]+)[{ ]", text, re.M))),
                "shards": sorted(set(re.findall(r'^ray_rlfleet_buffer_items\{[^}]*shard="(\d+)"', text, re.M))),
            }
        union = set().union(*(f["names"] for f in found.values()))
        return found if wanted <= union else None

    try:
        out["metrics"] = wait("every dashboard series", all_series, 120)
    except SystemExit as e:
        out["metrics_error"] = str(e)

    # Rows committed before the kill, per shard; then lose the second node.
    before = {s["shard"]: s["total_inserted"] for s in client.stats()["shards"]}
    out["inserted_before_kill"] = before
    second.kill_raylet()
    try:
        output, _ = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        run.kill()
        output = run.communicate()[0]
        out["run_timed_out"] = True
    out["run"] = [run.returncode, output[-6000:]]
    run_dir = next(p for p in os.scandir(run_root) if p.is_dir()).path
    out["run_dir"] = run_dir
    out["summary"] = json.load(open(os.path.join(run_dir, "summary.json")))
    surviving = out["shard_nodes"].index(head_id)
    check = subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", "check",
                            os.path.join(run_dir, "buffer", f"shard-{surviving}")],
                           cwd=root, env=env, capture_output=True, text=True, timeout=120)
    out["check"] = [check.returncode, check.stdout[-2000:], check.stderr[-2000:]]
    rows = {}
    for k in (0, 1):
        with ReplayBuffer.open(os.path.join(run_dir, "buffer", f"shard-{k}")) as rb:
            ids = rb[: before[k]]["collector_id"].reshape(-1).tolist()
            rows[k] = {"collectors": sorted(set(ids)), "count": len(ids), "total": rb.total_inserted}
    out["rows"] = rows
finally:
    if run.poll() is None:
        run.kill()
        run.wait()
    print(json.dumps(out, default=str))
    ray.shutdown()
    cluster.shutdown()
'''


@pytest.mark.slow
def test_run_on_two_nodes_places_per_node_and_stops_naming_a_lost_node(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    wanted = sorted(_queried_series() - ONLY_PRIORITIZED)
    proc = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(ROOT), str(tmp_path / "runs"), json.dumps(wanted)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    got = json.loads(lines[-1])
    head, second = got["head"], got["second"]
    print(json.dumps({k: got.get(k) for k in ("shard_nodes", "components", "inserted_before_kill", "rows")}))

    # placement: one shard per node, the driver's node first; one collector per node;
    # the learner on the head (the second node's one CPU holds its collector)
    assert got["shard_nodes"] == [head, second]
    components = got["components"]
    for component in ("shard-0", "shard-1", "collectors", "collector-0", "collector-1", "learner-0"):
        assert components[component][0] == "running", components
    assert sorted([components["collector-0"][1], components["collector-1"][1]]) == sorted([head, second])
    assert components["learner-0"][1] == head

    # status from a separate process shows both nodes and the components on them
    code, status_out, status_err = got["status"]
    assert code == 0, status_err
    rows = [line.split() for line in status_out.splitlines()]
    assert sorted((r[0], r[2]) for r in rows if r and r[0] in (head[:8], second[:8])) == \
        sorted([(head[:8], "alive"), (second[:8], "alive")])
    name = Path(got["run_dir"]).name
    shown = {r[0].rsplit(":", 1)[1]: (r[1], r[3]) for r in rows if r and r[0].startswith(f"rlfleet:{name}:")}
    assert shown["shard-0"] == ("running", head[:8]) and shown["shard-1"] == ("running", second[:8])
    assert shown["learner-0"] == ("running", head[:8])

    # each node serves its own shard's metrics; together, every dashboard series
    assert "metrics_error" not in got, got.get("metrics_error")
    metrics = got["metrics"]
    assert metrics[head]["shards"] == ["0"] and metrics[second]["shards"] == ["1"]
    served = set(metrics[head]["names"]) | set(metrics[second]["names"])
    assert sorted(set(_queried_series()) - ONLY_PRIORITIZED - served) == []

    # the documented outcome of losing the second node: the run stops, naming node and shard
    code, run_out = got["run"]
    assert not got.get("run_timed_out"), run_out
    assert code == 1, run_out
    print(run_out.strip().splitlines()[-1])
    assert (f"rlfleet run: ShardUnavailable: node {second[:8]} (") in run_out, run_out
    assert f") left the cluster with replay shard(s) 1 of buffer '{Path(got['run_dir']).name}'" in run_out
    assert got["summary"]["stop_reason"] == "node_lost"

    # the surviving shard is intact, and every shard's rows from before the kill came
    # from the collector on its own node
    code, check_out, check_err = got["check"]
    assert code == 0, check_out + check_err
    on_node = {components[f"collector-{i}"][1]: i for i in (0, 1)}
    before = {int(k): v for k, v in got["inserted_before_kill"].items()}
    for k, node in enumerate((head, second)):
        rows = got["rows"][str(k)]
        assert rows["count"] == before[k] > 0
        assert rows["collectors"] == [on_node[node]]
    assert got["rows"]["0"]["total"] >= before[0]
