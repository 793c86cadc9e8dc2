"""Two Ray nodes on one machine (``ray.cluster_utils.Cluster``): shards land on different
nodes, each writer's rows go to its own node's shard, one client samples from both.

The cluster cannot share the session's, so the scenario runs in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCENARIO = r'''
import json, sys
import ray, torch
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tensordict import TensorDict
from rlfleet.buffer import BufferClient, ReplayService
from rlfleet.buffer.indices import shard_of

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="rlfleet", log_to_driver=False)
try:
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    svc = ReplayService.launch("two-nodes", sys.argv[1], capacity=1000, num_shards=2,
                               placement="spread", seed=0)
    client = svc.client(seed=0)
    shard_nodes = [s["node_id"] for s in client.stats()["shards"]]

    @ray.remote(num_cpus=0)
    def write(first):
        c = BufferClient.connect("two-nodes")
        ids = torch.arange(first, first + 20)
        index = c.extend(TensorDict({"step": ids}, batch_size=[20]))
        return ray.get_runtime_context().get_node_id(), index.tolist()

    writes = ray.get([
        write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(100 * k)
        for k, node in enumerate(nodes)
    ])
    seen = set()
    for _ in range(20):
        seen.update(shard_of(client.sample(50)["index"].numpy()).tolist())
    print(json.dumps({
        "nodes": nodes,
        "shard_nodes": shard_nodes,
        "writes": [[node, sorted({int(shard_of(i)) for i in index})] for node, index in writes],
        "sampled_shards": sorted(seen),
        "len": len(client),
    }))
    ReplayService.shutdown("two-nodes", delete=True)
finally:
    ray.shutdown()
    cluster.shutdown()
'''


@pytest.mark.slow
def test_two_nodes_shards_spread_and_writers_stay_local(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", SCENARIO, str(tmp_path / "buf")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["nodes"]) == 2
    # spread: one shard per node
    assert sorted(got["shard_nodes"]) == got["nodes"]
    # each writer's rows went to the shard on its own node
    for node, shards in got["writes"]:
        assert shards == [got["shard_nodes"].index(node)]
    assert got["sampled_shards"] == [0, 1] and got["len"] == 40
