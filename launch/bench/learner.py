"""``rlfleet bench learner``: learner steps/s and sampled rows/s, weight publish latency.

Runs on the driver with an embedded local Ray (or the one already attached). Three parts:

1. For each learner count (default 1 and 2): a ``LearnerGroup`` of DQN learners on a
   replay service holding synthetic CartPole-shaped rows (TorchRL's layout, buffer
   format 2); steps/s of the group and rows sampled per second (all ranks).
   ``sample wait`` is the share of time rank 0 waited for a batch: near 0 means
   sampling keeps up with the optimizer.
2. Weight publish latency, publish call to every receiver holding the version, for the
   ``distributed`` transport (``BroadcastPublisher`` -> ``DistributedReceiver``) and the
   ``object_store`` one (``publish_weights`` -> ``ObjectStoreReceiver``), with receivers
   in ``--collectors`` Ray actors as in a run.
3. The limit: the wire work of one ``distributed`` publish, done bare between the same
   processes in the same run; printed beside the ratio of each transport to it.

What each side of the ratio does, per publish:

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

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--learners", default="1,2", help="learner counts to measure, comma separated (default 1,2)")
    parser.add_argument("--steps", type=int, default=200, help="timed learner steps per count (default 200)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per step per rank (default 256)")
    parser.add_argument("--hidden", default="256,256", help="policy hidden widths (default 256,256)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows in the replay service (default 20000)")
    parser.add_argument("--collectors", type=int, default=2, help="weight receivers, one Ray actor each (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed publishes per transport (default 20)")


class _ReceiverActor:
    """A stand-in collector process: holds one weight receiver and reports arrival times."""

    def __init__(self, kind: str, kwargs: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        from rlfleet.collector.weights import make_receiver

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
        each followed by the ack allreduce a ``DistributedReceiver`` sends."""
        from datetime import timedelta

        import torch.distributed as dist

        from rlfleet.collector.weights_dist import broadcast_options, gloo_group

        store = dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=60))
        import ray

        group = gloo_group(store, 0, rank, size, host=ray.util.get_node_ip_address(), timeout_s=60.0)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        for _ in range(iters + 1):
            group.broadcast([buf], broadcast_options()).wait()
            group.allreduce([torch.ones(1, dtype=torch.int64)]).wait()

    def close(self) -> None:
        self.receiver.close()


def _rows(n: int) -> Any:
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(0)
    obs = torch.randn(n, 4, generator=g)
    flags = torch.rand(n, generator=g) < 0.02
    return TensorDict(
        {
            "observation": obs,
            "action": torch.randint(0, 2, (n,), generator=g),
            ("next", "observation"): obs + 0.01,
            ("next", "reward"): torch.ones(n, 1),
            ("next", "terminated"): flags.unsqueeze(-1),
            ("next", "truncated"): torch.zeros(n, 1, dtype=torch.bool),
            ("next", "done"): flags.unsqueeze(-1),
            "episode_id": torch.cumsum(flags.long(), 0),
            "step": torch.zeros(n, dtype=torch.int64),
            "collector_id": torch.zeros(n, dtype=torch.int64),
            "policy_version": torch.zeros(n, dtype=torch.int64),
        },
        [n],
    )


def _bench_learners(args: argparse.Namespace, hidden: tuple[int, ...], tmp: Path) -> list[dict[str, float]]:
    import gymnasium as gym

    from rlfleet.buffer import ReplayService
    from rlfleet.collector.config import PolicyConfig
    from rlfleet.launch.config import LearnerConfig, RunConfig
    from rlfleet.launch.learner_group import LearnerGroup

    name = "bench-learner"
    service = ReplayService.launch(name, tmp / "buffer", capacity=args.rows, detached=False, seed=0)
    results = []
    try:
        client = service.client()
        for start in range(0, args.rows, 4096):
            client.extend(_rows(min(4096, args.rows - start)))
        obs_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
        for count in (int(c) for c in args.learners.split(",")):
            config = RunConfig(
                name=name,
                policy=PolicyConfig(hidden=hidden),
                learner=LearnerConfig(
                    num_learners=count, batch_size=args.batch_size, publish_every=10**9, checkpoint_every=10**9
                ),
            )
            group = LearnerGroup(config, name, obs_space, gym.spaces.Discrete(2), run_dir=tmp / f"run-{count}")
            try:
                group.step(20)  # warm-up: prefetch threads, first allocations
                start_t = time.perf_counter()
                metrics = group.step(args.steps)
                elapsed = time.perf_counter() - start_t
            finally:
                group.shutdown()
            steps_per_s = args.steps / elapsed
            results.append(
                {
                    "learners": count,
                    "steps_per_s": steps_per_s,
                    "rows_per_s": steps_per_s * args.batch_size * count,
                    "sample_wait_share": metrics["learner/sample_wait_s"] / elapsed,
                }
            )
    finally:
        ReplayService.shutdown(name)
    return results


def _latencies(actors: list[Any], publish, repeats: int) -> list[float]:
    import ray

    out = []
    for version in range(1, repeats + 2):
        refs = [a.await_version.remote(version, 60.0) for a in actors]
        time.sleep(0.01)  # let every receiver start polling
        t0 = time.time()
        publish(version)
        arrived = ray.get(refs)
        if version > 1:  # the first publish also pays for connecting
            out.append(max(arrived) - t0)
    return out


def _bench_weights(args: argparse.Namespace, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    import ray

    from rlfleet.collector.remote import FleetRegistry
    from rlfleet.collector.weights import NAMESPACE, publish_weights, registry_name
    from rlfleet.collector.weights_dist import pack_state_dict
    from rlfleet.launch.weights import BroadcastPublisher

    m = args.collectors
    host = ray.util.get_node_ip_address()
    actor_cls = ray.remote(num_cpus=0)(_ReceiverActor)
    nbytes = int(pack_state_dict(state_dict, 0).numel())

    publisher = BroadcastPublisher(m, host=host)
    dist_actors = [
        actor_cls.remote("distributed", {"collector_index": i, "num_collectors": m, **publisher.receiver_kwargs()})
        for i in range(m)
    ]
    try:
        distributed = _latencies(dist_actors, lambda v: publisher.publish(state_dict, v), args.repeats)
        # The limit: the same broadcast and ack allreduce, bare, between the same processes.
        from datetime import timedelta

        import torch.distributed as dist

        from rlfleet.collector.weights_dist import broadcast_options, gloo_group

        store = dist.TCPStore(host, 0, None, True, timeout=timedelta(seconds=60), wait_for_workers=False)
        refs = [a.bare_broadcast.remote(host, store.port, i + 1, m + 1, nbytes, args.repeats) for i, a in enumerate(dist_actors)]
        group = gloo_group(store, 0, 0, m + 1, host=host, timeout_s=60.0)
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        bare = []
        for i in range(args.repeats + 1):
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
        for a in dist_actors:
            ray.kill(a)
        publisher.close()

    fleet = "bench-weights"
    registry = ray.remote(FleetRegistry).options(name=registry_name(fleet), namespace=NAMESPACE, num_cpus=0).remote(fleet, m)
    store_actors = [
        actor_cls.remote("object_store", {"fleet": fleet, "collector_index": i, "num_collectors": m}) for i in range(m)
    ]
    try:
        object_store = _latencies(store_actors, lambda v: publish_weights(registry, state_dict, v), args.repeats)
    finally:
        for a in store_actors:
            ray.kill(a)
        ray.kill(registry)
    return {
        "bytes": nbytes,
        "distributed_p50_ms": 1e3 * statistics.median(distributed),
        "object_store_p50_ms": 1e3 * statistics.median(object_store),
        "bare_gloo_p50_ms": 1e3 * statistics.median(bare),
    }


def main(args: argparse.Namespace) -> int:
    import gymnasium as gym
    import ray

    from rlfleet.collector.config import PolicyConfig
    from rlfleet.collector.policies import build_policy

    hidden = tuple(int(h) for h in args.hidden.split(","))
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="rlfleet")
        started = True
    try:
        with tempfile.TemporaryDirectory(prefix="rlfleet-bench-learner-") as tmp:
            learners = _bench_learners(args, hidden, Path(tmp))
        policy = build_policy(PolicyConfig(hidden=hidden), gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
        weights = _bench_weights(args, policy.state_dict())
    finally:
        if started:
            ray.shutdown()
    if args.json:
        print(json.dumps({"learners": learners, "weights": weights}))
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
    return 0
