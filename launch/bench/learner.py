"""``rlfleet bench learner``: learner steps/s and sampled rows/s, weight publish cost.

Runs on the driver with an embedded local Ray (or the one already attached). Four parts:

1. For each learner count (default 1 and 2): a ``LearnerGroup`` of DQN learners on a
   replay service holding synthetic CartPole-shaped rows (TorchRL's layout, buffer
   format 2); steps/s of the group and rows sampled per second (all ranks).
   ``sample wait`` is the share of time rank 0 waited for a batch: near 0 means
   sampling keeps up with the optimizer.
2. Transport latency, ``publish()`` call to every receiver holding the version, for the
   ``distributed`` transport (``BroadcastPublisher`` -> ``BroadcastReceiver``) and the
   ``object_store`` one (``ObjectStorePublisher`` -> ``ObjectStoreReceiver``), both built
   with ``make_publisher`` / ``make_receiver`` on the driver, with receivers in
   ``--collectors`` Ray actors as in a run.
3. The limit: the wire work of one ``distributed`` publish, done bare between the same
   processes in the same run; printed beside the ratio of each transport to it.
4. The publish cost as a run sees it: a one-rank ``LearnerGroup`` (rank 0 holds the
   publisher) on a stand-in fleet (its registry actor and ``--collectors`` receiver
   actors, no envs). ``publish``: ``LearnerGroup.publish()`` to every receiver holding
   the version (in brackets: until ``publish()`` returned). ``fleet overhead``: median
   ``step(1)`` publishing nothing, fleet attached, minus the same of a group without a
   fleet, the two taking turns.

What each side of the ratio in part 3 does, per publish:

- ``distributed`` (timed from ``publish()`` to the last receiver holding the version):
  ``publish()`` copies the state dict and wakes the publisher's sender thread, which
  packs it, sets the ``g<g>/pub/<n>`` store key, then runs one ``uint8`` broadcast and
  one ``int64`` ack allreduce; each receiver polls the store for that key (every
  ``CHECK_INTERVAL_S``, 10 ms), joins the same broadcast and allreduce, unpacks, and
  its actor sees the version at its next ``poll`` (every 0.5 ms).
- bare (timed on rank 0, from entering the broadcast to the ack allreduce returning):
  the same one ``uint8`` broadcast and one ``int64`` allreduce, with every receiver
  already waiting in the collective. The allreduce is the ack ``distributed`` sends,
  and what makes "every rank holds the bytes" true on return; no barrier or other
  round trip is added on either side.

So the ratio is what the publisher's signalling, polling, packing and unpacking cost
on top of the collectives themselves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlfleet.launch.bench.weights_fanout import BenchFleet, publish_latencies, publish_times

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--learners", default="1,2", help="learner counts to measure, comma separated (default 1,2)")
    parser.add_argument("--steps", type=int, default=200, help="timed learner steps per count (default 200)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per step per rank (default 256)")
    parser.add_argument("--hidden", default="256,256", help="policy hidden widths (default 256,256)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows in the replay service (default 20000)")
    parser.add_argument("--collectors", type=int, default=2, help="weight receivers, one Ray actor each (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed publishes per transport (default 20)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (default: start a local one for the bench)")


def _rows(n: int) -> Any:
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(0)
    obs = torch.randn(n, 4, generator=g)
    flags = (torch.rand(n, generator=g) < 0.02).unsqueeze(-1)
    zeros = torch.zeros(n, dtype=torch.int64)
    return TensorDict(
        {
            "observation": obs, "action": torch.randint(0, 2, (n,), generator=g),
            ("next", "observation"): obs + 0.01, ("next", "reward"): torch.ones(n, 1),
            ("next", "terminated"): flags, ("next", "truncated"): torch.zeros(n, 1, dtype=torch.bool),
            ("next", "done"): flags, "episode_id": torch.cumsum(flags.squeeze(-1).long(), 0),
            "step": zeros, "collector_id": zeros, "policy_version": zeros,
        },
        [n],
    )


def _group(args: argparse.Namespace, hidden: tuple[int, ...], buffer: str, run_dir: Path, *, num_learners: int = 1,
           transport: str = "object_store", fleet: BenchFleet | None = None) -> Any:
    import gymnasium as gym

    from rlfleet.collector.config import PolicyConfig
    from rlfleet.launch.config import LearnerConfig
    from rlfleet.launch.learners import LearnerGroup

    learner = LearnerConfig(num_learners=num_learners, batch_size=args.batch_size, publish_every=10**9,
                            checkpoint_every=10**9, weight_transport=transport)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    return LearnerGroup(learner, PolicyConfig(hidden=hidden), run_name=f"{buffer}-{run_dir.name}", buffer=buffer,
                        observation_space=obs_space, action_space=gym.spaces.Discrete(2), run_dir=run_dir,
                        fleet=fleet)


def _bench_learners(args: argparse.Namespace, hidden: tuple[int, ...], buffer: str, tmp: Path) -> list[dict[str, float]]:
    results = []
    for count in (int(c) for c in args.learners.split(",")):
        group = _group(args, hidden, buffer, tmp / f"run-{count}", num_learners=count)
        try:
            group.step(20)  # warm-up: batches in flight, first allocations
            start_t = time.perf_counter()
            metrics = group.step(args.steps)
            elapsed = time.perf_counter() - start_t
        finally:
            group.shutdown()
        steps_per_s = args.steps / elapsed
        results.append({"learners": count, "steps_per_s": steps_per_s,
                        "rows_per_s": steps_per_s * args.batch_size * count,
                        "sample_wait_share": metrics["learner/sample_wait_s"] / elapsed})
    return results


def _step_times(group: Any, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        group.step(1)
        out.append(time.perf_counter() - t0)
    return out


def _wait_group_ready(group: Any, timeout_s: float = 60.0) -> None:
    # The broadcast group forms once every receiver announced itself; until then the
    # publisher sends through the object store. Time the standing group, as in a run.
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ray.get(group.actors[0].weight_status.remote())
        if status.get("weights/group_ready", 1.0):
            return
        group.step(1)
        group.publish()
        time.sleep(0.05)
    raise TimeoutError(f"bench learner: the weight broadcast group did not form within {timeout_s}s")


def _bench_group_path(args: argparse.Namespace, hidden: tuple[int, ...], buffer: str, tmp: Path) -> dict[str, Any]:
    from rlfleet.buffer import DEFAULT_NAMESPACE

    rounds = max(1, args.steps // 10)
    bare = _group(args, hidden, buffer, tmp / "group-none")
    out: dict[str, Any] = {}
    base: list[float] = []
    try:
        bare.step(20)
        for kind in ("distributed", "object_store"):
            fleet = BenchFleet(f"bench-group-{kind.replace('_', '-')}", DEFAULT_NAMESPACE, args.collectors)
            group = None
            try:
                group = _group(args, hidden, buffer, tmp / f"group-{kind}", transport=kind, fleet=fleet)
                group.step(20)
                if kind == "distributed":
                    _wait_group_ready(group)
                # Each round: a step (a new version), then publish it.
                to_all, call = publish_times(fleet.receivers, lambda: int(group.step(1)["learner/steps"]),
                                          lambda _: group.publish(), args.repeats)
                # Blocks of 10 steps with and without a fleet, taking turns, so that the
                # machine's load weighs on both alike.
                with_fleet, without = [], []
                for _ in range(rounds):
                    without += _step_times(bare, 10)
                    with_fleet += _step_times(group, 10)
            finally:
                if group is not None:
                    group.shutdown()
                fleet.close()
            base += without
            out[kind] = {"publish_p50_ms": 1e3 * statistics.median(to_all),
                         "publish_call_p50_ms": 1e3 * statistics.median(call),
                         "step_overhead_ms": 1e3 * (statistics.median(with_fleet) - statistics.median(without))}
    finally:
        bare.shutdown()
    out["step_no_fleet_ms"] = 1e3 * statistics.median(base)
    return out


def main(args: argparse.Namespace) -> int:
    import gymnasium as gym
    import ray

    from rlfleet.buffer import ReplayService
    from rlfleet.collector.config import PolicyConfig
    from rlfleet.collector.policies import build_policy

    from rlfleet.launch.bench import start_ray

    hidden = tuple(int(h) for h in args.hidden.split(","))
    started = start_ray(args.address, num_cpus=8).started
    try:
        with tempfile.TemporaryDirectory(prefix="rlfleet-bench-learner-") as tmp:
            name = "bench-learner"
            service = ReplayService.launch(name, Path(tmp) / "buffer", capacity=args.rows, detached=False, seed=0)
            try:
                client = service.client()
                for start in range(0, args.rows, 4096):
                    client.extend(_rows(min(4096, args.rows - start)))
                learners = _bench_learners(args, hidden, name, Path(tmp))
                group_path = _bench_group_path(args, hidden, name, Path(tmp))
            finally:
                ReplayService.shutdown(name)
        policy = build_policy(PolicyConfig(hidden=hidden), gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
        weights = publish_latencies(args.collectors, args.repeats, policy.state_dict())
    finally:
        if started:
            ray.shutdown()
    if args.json:
        print(json.dumps({"learners": learners, "weights": weights, "group": group_path}))
        return 0
    for r in learners:
        print(
            f"learner  L={r['learners']}  {r['steps_per_s']:8.1f} steps/s  {r['rows_per_s']:10,.0f} rows/s "
            f"sampled (batch {args.batch_size}/rank)  sample wait {100 * r['sample_wait_share']:.1f}%"
        )
    bare = weights["bare_gloo_p50_ms"]
    print(f"weights  {weights['bytes']:,} bytes to {args.collectors} collectors, publish -> all hold it (p50):")
    print(f"  distributed   {weights['distributed_p50_ms']:8.2f} ms  ({weights['distributed_p50_ms'] / bare:.1f}x bare)")
    print(f"  object_store  {weights['object_store_p50_ms']:8.2f} ms  ({weights['object_store_p50_ms'] / bare:.1f}x bare)")
    print(f"  bare gloo broadcast + ack allreduce (limit) {bare:8.2f} ms")
    print(f"group    LearnerGroup.publish() -> all hold it (p50; returned), step(1) "
          f"{group_path['step_no_fleet_ms']:.2f} ms without a fleet:")
    for kind in ("distributed", "object_store"):
        g = group_path[kind]
        print(f"  {kind:<13} {g['publish_p50_ms']:8.2f} ms  ({g['publish_call_p50_ms']:.2f} ms)  "
              f"fleet overhead {g['step_overhead_ms']:+.2f} ms/step")
    return 0
