"""Placement plans and their reservation through real Ray placement groups.

The plan and the first-fit check are pure functions of the config and the nodes, so
they are tested on made-up nodes; reserving runs on the session's real local Ray (one
node, 8 CPUs, no GPU), where every refusal must name the bundle that does not fit and
the node's resources.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlfleet.launch.config import load_config
from rlfleet.launch.placement import (
    SHARD_MEMORY_BYTES,
    NodeInfo,
    PlacementError,
    fit,
    plan_placement,
    reserve,
)

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
GiB = 2.0**30
NODES = [
    NodeInfo("cccc" * 14, "10.0.0.3", {"CPU": 4.0, "GPU": 1.0, "memory": 8 * GiB}),
    NodeInfo("aaaa" * 14, "10.0.0.1", {"CPU": 2.0, "memory": 8 * GiB, "rlfleet_buffer": 1.0}),
    NodeInfo("bbbb" * 14, "10.0.0.2", {"CPU": 2.0, "memory": 8 * GiB, "rlfleet_buffer": 1.0}),
]
A, B, C = (n.node_id for n in sorted(NODES, key=lambda n: n.node_id))


def _config(*overrides: str):
    return load_config(SMOKE, list(overrides))


# --------------------------------------------------------------------------- plans


def test_shards_go_one_per_node_offering_the_named_resource_driver_first():
    plan = plan_placement(_config("buffer.num_shards=3", "buffer.node_resource=rlfleet_buffer"),
                          "run", NODES, driver_node=B)
    assert plan.shard_nodes == (B, A, B)  # round robin over eligible nodes, the driver's first
    shards = plan.bundles["shard"]
    assert [(b.node_id, b.shards) for b in shards] == [(B, (0, 2)), (A, (1,))]
    assert shards[0].resources == {"memory": float(SHARD_MEMORY_BYTES), "rlfleet_buffer": 0.001}


def test_without_a_named_resource_every_node_takes_shards_and_pack_takes_one():
    spread = plan_placement(_config("buffer.num_shards=3"), "run", NODES, driver_node=C)
    assert spread.shard_nodes == (C, A, B)
    assert [b.node_id for b in spread.bundles["shard"]] == [C, A, B]
    packed = plan_placement(_config("buffer.num_shards=3", "buffer.placement=pack"), "run", NODES, driver_node=C)
    assert packed.shard_nodes == (C, C, C)
    assert [(b.node_id, b.shards) for b in packed.bundles["shard"]] == [(C, (0, 1, 2))]


def test_collector_and_learner_bundles_carry_their_cpu_and_gpu_shares():
    plan = plan_placement(
        _config("collector.num_workers=3", "collector.device=cuda", "collector.num_gpus=0.25", "learner.num_learners=2",
                "learner.device=cuda"), "run", NODES)
    assert [b.resources for b in plan.bundles["collector"]] == [{"CPU": 1.0, "GPU": 0.25}] * 3
    assert [b.resources for b in plan.bundles["learner"]] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    cpu_only = plan_placement(_config(), "run", NODES)
    assert [b.resources for b in cpu_only.bundles["collector"]] == [{"CPU": 1.0}]
    assert [b.resources for b in cpu_only.bundles["learner"]] == [{"CPU": 1.0}]


@pytest.mark.parametrize(
    "overrides, unplaced",
    [
        pytest.param([], [], id="smoke-fits"),
        pytest.param(["collector.num_workers=9"], ["collector-8", "learner-0"], id="too-many-collectors"),
        pytest.param(["learner.device=cuda", "learner.num_learners=2"], ["learner-1"], id="one-gpu-two-learners"),
        # GPU collectors and a GPU learner share the one GPU: 0.5 + 0.5 + 1 > 1
        pytest.param(["learner.device=cuda", "collector.num_workers=2", "collector.device=cuda",
                      "collector.num_gpus=0.5"],
                     ["collector-0", "collector-1"], id="gpu-shares"),
        pytest.param(["buffer.node_resource=nvme"], ["shard-0"], id="no-node-has-the-resource"),
    ],
)
def test_first_fit_names_the_bundles_that_do_not_fit(overrides, unplaced):
    plan = plan_placement(_config(*overrides), "run", NODES, driver_node=A)
    assert [b.label for b in fit(plan.all_bundles(), NODES)] == unplaced


# --------------------------------------------------------------------------- reserve on Ray


def _this_node():
    import ray

    return ray.get_runtime_context().get_node_id()


def _groups_of(name: str) -> dict[str, str]:
    from ray.util.placement_group import placement_group_table

    return {g["name"]: g["state"] for g in placement_group_table().values()
            if g["name"].startswith(f"rlfleet:{name}:")}


def _plan(name: str, *overrides: str):
    from rlfleet.launch.placement import cluster_nodes

    return plan_placement(_config(*overrides), name, cluster_nodes(), _this_node())


@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param(
            ["collector.num_workers=9"],
            ["2 of 11 bundle(s) cannot fit:", "  collector-8 needs CPU 1\n",
             "collector.num_workers=9 x CPU 1; lower collector.num_workers", "  learner-0 needs CPU 1\n"],
            id="cpus",
        ),
        pytest.param(
            ["learner.device=cuda"],
            ["1 of 3 bundle(s) cannot fit:", "  learner-0 needs CPU 1, GPU 1\n",
             "use learner.device=cpu, or add GPU nodes"],
            id="gpu-learner",
        ),
        pytest.param(
            ["collector.device=cuda", "collector.num_gpus=0.5"],
            ["1 of 3 bundle(s) cannot fit:", "  collector-0 needs CPU 1, GPU 0.5\n"],
            id="fractional-gpu-collector",
        ),
        pytest.param(
            ["buffer.num_shards=2", "buffer.node_resource=nvme_disk"],
            ["1 of 3 bundle(s) cannot fit:", "  shard-0 (shards 0, 1) needs memory 64 MiB, nvme_disk 0.001\n",
             "start nodes with --resources='{\"nvme_disk\": 1}' or unset buffer.node_resource"],
            id="named-resource-missing",
        ),
    ],
)
def test_reserve_refuses_at_once_naming_the_bundle_and_the_nodes_resources(ray_cluster, overrides, expected):
    name = "place-refused"
    with pytest.raises(PlacementError, match=r"^placement of run 'place-refused': ") as info:
        reserve(_plan(name, *overrides), timeout_s=30.0)
    message = str(info.value)
    for text in expected:
        assert text in message, message
    node_line = f"  {_this_node()[:8]} "
    assert "The cluster has 1 alive node(s) (total resources):\n" + node_line in message
    assert message.split(node_line)[1].split(", memory")[0].endswith("CPU 8, GPU 0"), message
    assert _groups_of(name) == {}  # nothing was reserved


def test_reserve_places_every_role_and_remove_releases_them(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    name = "place-ok"
    placement = reserve(_plan(name, "collector.num_workers=2", "buffer.num_shards=2"), timeout_s=60.0)
    try:
        here = _this_node()
        assert placement.shard_nodes == (here, here)
        assert _groups_of(name) == {f"rlfleet:{name}:shards": "CREATED", f"rlfleet:{name}:collectors": "CREATED",
                                    f"rlfleet:{name}:learners": "CREATED"}
        shard_group = placement_group_table(placement.groups["shard"])
        assert shard_group["bundles_to_node_id"] == {0: here}
        assert placement.group("collector").bundle_count == 2 and placement.group("learner").bundle_count == 1

        @ray.remote(num_cpus=1)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        # An actor-sized task runs inside each collector bundle: the reservation is usable.
        group = placement.group("collector")
        nodes = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=i)).remote() for i in range(2)], timeout=60)
        assert nodes == [here, here]
        assert placement.lost_shard_nodes() == {}
        assert placement.lost_shards_message(name, "/x") is None
    finally:
        placement.remove()
    assert set(_groups_of(name).values()) == {"REMOVED"}


def test_reserve_times_out_naming_what_is_free(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    # Hold all CPUs but one, so a plan of two collectors and a learner fits the node's
    # total but not what is free.
    hold_cpus = math.floor(ray.cluster_resources()["CPU"]) - 1
    holder = placement_group([{"CPU": float(hold_cpus)}], name="place-holder")
    ray.get(holder.ready(), timeout=60)
    name = "place-busy"
    try:
        with pytest.raises(PlacementError, match=r"were not placed within timeout_s=1:") as info:
            reserve(_plan(name, "collector.num_workers=2"), timeout_s=1.0)
    finally:
        remove_placement_group(holder)
    message = str(info.value)
    # first fit on the one free CPU: collector-0 takes it, the others are left
    assert "  collector-1 needs CPU 1\n" in message and "  learner-0 needs CPU 1\n" in message
    assert "  collector-0 needs" not in message
    assert "(free resources now; other jobs hold the rest, see `ray status`; or raise ray.placement_timeout_s)" in message
    assert f"  {_this_node()[:8]} " in message and ": CPU 1, GPU 0" in message
    assert set(_groups_of(name).values()) == {"REMOVED"}


def test_serve_refuses_a_node_resource_no_node_offers(ray_cluster, tmp_path, capsys):
    from rlfleet.launch.cli import main

    config = tmp_path / "serve.yaml"
    config.write_text(f"name: place-serve\nbuffer: {{path: {tmp_path / 'buf'}, capacity: 100, num_shards: 2}}\n")
    assert main(["serve", str(config), "buffer.node_resource=nvme_disk"]) == 1
    assert capsys.readouterr().err.startswith(
        "error: buffer.node_resource='nvme_disk': no alive node offers it; start nodes with "
        "--resources='{\"nvme_disk\": 1}' or unset buffer.node_resource")
    assert not (tmp_path / "buf").exists()
