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
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["add_arguments", "main", "publish_latencies"]


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


class _ReceiverActor:
    """A stand-in collector process: holds one weight receiver and reports arrival times."""

    def __init__(self, kind: str, kwargs: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        from rlfleet.collector import make_receiver

        self.receiver = make_receiver(kind, **kwargs)

    def await_version(self, version: int, timeout_s: float) -> float:
        """Poll until ``version`` arrived; returns the wall-clock arrival time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.receiver.poll()
            if got is not None and got[1] >= version:
                return time.time()
            time.sleep(0.0005)
        raise TimeoutError(f"weights version {version} did not arrive within {timeout_s}s")

    def bare_broadcast(self, host: str, port: int, rank: int, size: int, nbytes: int, iters: int) -> None:
        """Join a plain gloo group and take part in ``iters + 1`` broadcasts from rank 0,
        each followed by the ack allreduce a ``BroadcastReceiver`` sends."""
        from datetime import timedelta

        import ray
        import torch.distributed as dist

        from rlfleet.collector.weights_broadcast import broadcast_options, gloo_group

        store = dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=60))
        group = gloo_group(store, 0, rank, size, host=ray.util.get_node_ip_address(), timeout_s=60.0)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        for _ in range(iters + 1):
            group.broadcast([buf], broadcast_options()).wait()
            group.allreduce([torch.ones(1, dtype=torch.int64)]).wait()

    def close(self) -> None:
        self.receiver.close()


class _BenchFleet:
    """The part of a ``CollectorFleet`` a ``LearnerGroup`` uses, without envs: the
    registry actor and ``num_workers`` receiver actors (object store until a
    ``distributed`` receiver is attached). Runs on the driver."""

    def __init__(self, name: str, namespace: str, num_workers: int) -> None:
        import ray

        from rlfleet.buffer import actor_name
        from rlfleet.collector.registry import FleetRegistry

        self.name, self.namespace, self.num_workers = name, namespace, num_workers
        self._actor_cls = ray.remote(num_cpus=0)(_ReceiverActor)
        self.registry = ray.remote(FleetRegistry).options(
            name=actor_name(name, "collectors"), namespace=namespace, num_cpus=0
        ).remote(name, num_workers)
        ray.get(self.registry.ping.remote(), timeout=120.0)  # started, before anyone looks it up
        self.receivers: list[Any] = []
        self.attach_weight_receiver("object_store")

    def attach_weight_receiver(self, kind: str, **kwargs: Any) -> None:
        self._kill_receivers()
        self.receivers = [
            self._actor_cls.remote(kind, {"fleet": self.name, "namespace": self.namespace, "collector_index": i,
                                          "num_collectors": self.num_workers, **kwargs})
            for i in range(self.num_workers)
        ]

    def _kill_receivers(self) -> None:
        import ray

        for a in self.receivers:
            ray.kill(a)
        self.receivers = []

    def close(self) -> None:
        import ray

        self._kill_receivers()
        ray.kill(self.registry)


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
           transport: str = "object_store", fleet: _BenchFleet | None = None) -> Any:
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
            fleet = _BenchFleet(f"bench-group-{kind.replace('_', '-')}", DEFAULT_NAMESPACE, args.collectors)
            group = None
            try:
                group = _group(args, hidden, buffer, tmp / f"group-{kind}", transport=kind, fleet=fleet)
                group.step(20)
                if kind == "distributed":
                    _wait_group_ready(group)
                # Each round: a step (a new version), then publish it.
                to_all, call = _latencies(fleet.receivers, lambda: int(group.step(1)["learner/steps"]),
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


def _latencies(actors: list[Any], next_version: Callable[[], int], publish: Callable[[int], Any],
               repeats: int) -> tuple[list[float], list[float]]:
    """Seconds from ``publish`` to every receiver holding the version, and until it returned."""
    import ray

    to_all, returned = [], []
    for i in range(repeats + 1):
        version = next_version()
        refs = [a.await_version.remote(version, 60.0) for a in actors]
        time.sleep(0.01)  # let every receiver start polling
        t0 = time.time()
        publish(version)
        t1 = time.time()
        arrived = ray.get(refs)
        if i:  # the first publish also pays for connecting
            to_all.append(max(arrived) - t0)
            returned.append(t1 - t0)
    return to_all, returned


def _bench_weights(args: argparse.Namespace, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    return publish_latencies(args.collectors, args.repeats, state_dict)


def publish_latencies(m: int, repeats: int, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Median seconds (as ms) from ``publish()`` to all ``m`` receiver actors holding the
    version, for both transports, and the bare gloo broadcast + ack between the same
    processes (part 2 and 3 of the module docstring). Runs on the driver."""
    from datetime import timedelta

    import ray
    import torch.distributed as dist

    from rlfleet.buffer import DEFAULT_NAMESPACE
    from rlfleet.collector import make_publisher
    from rlfleet.collector.weights_broadcast import broadcast_options, gloo_group, pack_state_dict

    host = ray.util.get_node_ip_address()
    nbytes = int(pack_state_dict(state_dict, 0).numel())

    fleet = _BenchFleet("bench-weights", DEFAULT_NAMESPACE, m)
    publisher = make_publisher("distributed", fleet=fleet.name, namespace=fleet.namespace, num_collectors=m)
    try:
        fleet.attach_weight_receiver("distributed", **publisher.receiver_kwargs())
        versions = itertools.count(1)
        distributed, _ = _latencies(fleet.receivers, lambda: next(versions),
                                    lambda v: publisher.publish(state_dict, v), repeats)
        # The limit: the same broadcast and ack allreduce, bare, between the same processes.
        store = dist.TCPStore(host, 0, None, True, timeout=timedelta(seconds=60), wait_for_workers=False)
        refs = [a.bare_broadcast.remote(host, store.port, i + 1, m + 1, nbytes, repeats)
                for i, a in enumerate(fleet.receivers)]
        group = gloo_group(store, 0, 0, m + 1, host=host, timeout_s=60.0)
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        bare = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            group.broadcast([buf], broadcast_options()).wait()
            ack = torch.zeros(1, dtype=torch.int64)
            group.allreduce([ack]).wait()  # returns once every rank holds the bytes
            if i:  # the first round also pays for connecting
                bare.append(time.perf_counter() - t0)
            if int(ack[0]) != m:
                raise RuntimeError(f"bench learner: bare ack from {int(ack[0])} of {m} receivers")
        ray.get(refs)
    finally:
        publisher.close()
        fleet.close()

    fleet = _BenchFleet("bench-weights-store", DEFAULT_NAMESPACE, m)
    publisher = make_publisher("object_store", fleet=fleet.name, namespace=fleet.namespace, num_collectors=m)
    try:
        versions = itertools.count(1)
        object_store, _ = _latencies(fleet.receivers, lambda: next(versions),
                                     lambda v: publisher.publish(state_dict, v), repeats)
    finally:
        publisher.close()
        fleet.close()
    return {
        "bytes": nbytes,
        "distributed_p50_ms": 1e3 * statistics.median(distributed),
        "object_store_p50_ms": 1e3 * statistics.median(object_store),
        "bare_gloo_p50_ms": 1e3 * statistics.median(bare),
    }


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
        weights = _bench_weights(args, policy.state_dict())
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
