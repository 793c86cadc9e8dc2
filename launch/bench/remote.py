"""``rlfleet bench remote``: the sharded replay service through a client, against bare
Ray, and how its cost grows with the number of shards.

Runs on the driver, which is the client process. For each shard count S (``--shards``,
a comma list such as ``1,4,16,64``) and each schema (CartPole-sized rows, and Atari-sized
rows of 4x84x84 uint8 frames) it fills an S-shard service, then measures three
operations. Each baseline makes the same Ray calls as the client, with the same payload
per call and as many calls in flight, so the ratio compares the service (shard work,
checks, assembly) with the transport alone, not one batching against another:

- insert: ``client.extend`` of one batch of B rows (``--insert-batch``). The client sends
  it whole to one shard, or cut into C contiguous chunks, one per shard on this node,
  sent together (C = ``write_plan.chunk_count``: batches of 32 MB and more; 1 for
  CartPole rows). Baseline: C actors, each receiving its chunk as numpy arrays and
  answering a few bytes, the C calls in flight together.
- sample, prefetch 0: ``client.sample(n)``, one batch at a time, with its latency p50
  and p99. With ``--split whole`` (the client's default) one call to one shard;
  baseline: one actor returning an n-row numpy payload. With ``--split rows``, one call
  per shard for its share; baseline: S actors returning their shares, in parallel.
- sample, prefetch k (``--prefetch``, unless 0): ``client.sampler(n, prefetch=k)``,
  groups of k batches, two in flight. Baseline: the same calls with k batches' rows.

With more than one shard count, a scaling table follows: each count's sample p50 and
p99 and prefetched batches/s, with the ratio to the first count (S = 1 in ``1,4,16,64``)
measured in the same run. Then the weight fan-out: for each count R in ``--receivers``
(default: the shard counts), the time from ``publish()`` to all R receiver actors holding
the version, over both transports (``bench learner``'s measure, ``publish_latencies``),
with the ratio to the first R. The receivers start after the shards are gone, so the two
never share the machine.

Each line prints the client's rows/s and MB/s, the baseline's, and their ratio. Both
sides run in the same process on the same cluster, in four alternating turns (the
median of each side is printed), so the ratio survives a noisy machine better than
either figure. Shard and receiver actors take no CPU reservation (``num_cpus=0``), as on
a cluster where they sit mostly idle; on one small machine they still share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["add_arguments", "main"]

SCHEMAS: dict[str, dict[tuple[str, ...], tuple[tuple[int, ...], str]]] = {
    "cartpole": {
        ("observation",): ((4,), "float32"), ("next", "observation"): ((4,), "float32"),
        ("action",): ((), "int64"), ("next", "reward"): ((1,), "float32"),
        ("next", "terminated"): ((1,), "bool"), ("next", "truncated"): ((1,), "bool"),
        ("next", "done"): ((1,), "bool"),
        ("episode_id",): ((), "int64"), ("step",): ((), "int64"),
        ("collector_id",): ((), "int64"), ("policy_version",): ((), "int64"),
    },
    "atari": {
        ("observation",): ((4, 84, 84), "uint8"), ("next", "observation"): ((4, 84, 84), "uint8"),
        ("action",): ((), "int64"), ("next", "reward"): ((1,), "float32"),
        ("next", "terminated"): ((1,), "bool"), ("next", "truncated"): ((1,), "bool"),
        ("next", "done"): ((1,), "bool"),
        ("episode_id",): ((), "int64"), ("step",): ((), "int64"),
        ("collector_id",): ((), "int64"), ("policy_version",): ((), "int64"),
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a figure")
    parser.add_argument("--schemas", default="cartpole,atari", help="comma-separated: cartpole,atari")
    parser.add_argument("--shards", type=_counts, default=[2],
                        help="shard counts to measure, comma separated, e.g. 1,4,16,64 (default 2)")
    parser.add_argument("--split", choices=("whole", "rows"), default="whole",
                        help="the client's split: whole (one shard per request, default) or rows")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows in the service (default: 200,000 CartPole rows; Atari rows up to 512 MB)")
    parser.add_argument("--latency-calls", type=int, default=300,
                        help="timed sample calls for the p50/p99 latency (default 300)")
    parser.add_argument("--receivers", type=_counts, default=None,
                        help="weight receiver counts, comma separated (default: the shard counts when "
                             "more than one; 0 to skip)")
    parser.add_argument("--repeats", type=int, default=10, help="timed publishes per receiver count (default 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per sample (default 256)")
    parser.add_argument("--insert-batch", type=int, default=1024, help="rows per extend (default 1024)")
    parser.add_argument("--prefetch", type=int, default=2, help="batches per sampler call; 2x in flight (default 2)")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per measurement (default 4)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (default: start a local one for the bench)")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of counts such as 1,4,16,64")
    return counts


def _payload(schema: dict, n: int, rng: np.random.Generator) -> dict[tuple[str, ...], np.ndarray]:
    out = {}
    for key, (shape, dtype) in schema.items():
        if dtype == "uint8":
            out[key] = rng.integers(0, 255, size=(n, *shape), dtype=np.uint8)
        elif dtype == "bool":
            out[key] = rng.random((n, *shape)) < 0.01
        else:
            out[key] = rng.random((n, *shape)).astype(dtype)
    return out


def _nbytes(arrays: dict[Any, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


class _Echo:
    """The bare limit: an actor that holds a payload and returns it, or receives one."""

    def __init__(self, arrays: dict[tuple[str, ...], np.ndarray]) -> None:
        self.arrays = arrays

    def give(self) -> dict[tuple[str, ...], np.ndarray]:
        return self.arrays

    def take(self, arrays: dict[tuple[str, ...], np.ndarray]) -> int:
        return len(next(iter(arrays.values())))


def _rate(step: Callable[[], int], seconds: float, min_calls: int) -> float:
    """Rows per second of ``step`` (which returns rows), after one warm-up call."""
    step()
    rows, calls, start = 0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        rows += step()
        calls += 1
    return rows / (time.perf_counter() - start)


def _rates_interleaved(bare: Callable[[], int], mine: Callable[[], int], seconds: float,
                       min_calls: int, rounds: int = 4) -> tuple[float, float]:
    """Median rows/s of each side over ``rounds`` alternating turns of ``seconds / rounds``:
    a machine that slows down for a moment (page-cache writeback, another process)
    slows both sides alike instead of whichever ran then."""
    bare_rates, my_rates = [], []
    for _ in range(rounds):
        bare_rates.append(_rate(bare, seconds / rounds, min_calls))
        my_rates.append(_rate(mine, seconds / rounds, min_calls))
    return statistics.median(bare_rates), statistics.median(my_rates)


def _pipelined(submit: Callable[[], Any], collect: Callable[[Any], int], depth: int) -> Callable[[], int]:
    queue: deque = deque(submit() for _ in range(depth))

    def step() -> int:
        item = queue.popleft()
        queue.append(submit())
        return collect(item)

    return step


def _latency(step: Callable[[], Any], calls: int) -> list[float]:
    """Seconds of each of ``calls`` calls of ``step``, after two warm-up calls."""
    step()
    step()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _bench_schema(kind: str, args: argparse.Namespace, shards: int, root: str, out: list[dict[str, Any]]) -> None:
    import ray
    from tensordict import TensorDict

    from rlfleet.buffer import BufferClient, ReplayService
    from rlfleet.buffer.arrays import arrays_to_tensordict
    from rlfleet.buffer.write_plan import chunk_count, cut_points

    rng = np.random.default_rng(0)
    schema = SCHEMAS[kind]
    batch, insert_batch = args.batch_size, args.insert_batch
    row_bytes = _nbytes(_payload(schema, 1, rng))
    if args.quick:
        fill_rows = insert_batch * 2
    elif args.rows is not None:
        fill_rows = max(insert_batch, args.rows)
    elif kind == "cartpole":
        fill_rows = 200_000
    else:
        fill_rows = insert_batch * max(4, min(32, (512 << 20) // (row_bytes * insert_batch)))
    seconds = 0.3 if args.quick else args.seconds
    min_calls = 2 if args.quick else 5
    name = f"bench-remote-{kind}-{shards}-{os.getpid()}"
    # 64 shard processes each import torch and numba: on 2 cores that takes minutes
    ReplayService.launch(name, os.path.join(root, f"{kind}-{shards}"), capacity=fill_rows * 2,
                         num_shards=shards, seed=0, timeout_s=120.0 + 10.0 * shards)
    try:
        client = BufferClient.connect(name, seed=0, split=args.split)
        td: TensorDict = arrays_to_tensordict(_payload(schema, insert_batch, rng), [insert_batch])
        echo_cls = ray.remote(num_cpus=0)(_Echo)
        k = max(1, args.prefetch)
        # the calls the client makes for one batch (and one group): one shard's whole
        # request, or every shard's share
        callees = 1 if args.split == "whole" else shards
        share = [batch // callees + (1 if j < batch % callees else 0) for j in range(callees)]
        echoes = [echo_cls.remote(_payload(schema, share[j], rng)) for j in range(callees)]
        group_echoes = [echo_cls.remote(_payload(schema, k * share[j], rng)) for j in range(callees)]
        ray.get([e.give.remote() for e in [*echoes, *group_echoes]])
        # the insert baseline sends the batch as the client does (write_plan)
        here = ray.get_runtime_context().get_node_id()
        local = sum(1 for row in client.stats()["shards"] if row.get("node_id") == here) or shards
        insert_payload = {key: v.numpy() for key, v in td.items(include_nested=True, leaves_only=True)}
        cuts = cut_points(insert_batch, chunk_count(insert_batch, _nbytes(insert_payload), local))
        chunks = [{key: a[lo:hi] for key, a in insert_payload.items()} for lo, hi in zip(cuts, cuts[1:])]
        sinks = [echo_cls.remote({}) for _ in chunks]
        filled = 0
        while filled < fill_rows:
            client.extend(td)
            filled += insert_batch

        def client_insert() -> int:
            client.extend(td)
            return insert_batch

        def bare_insert() -> int:
            return sum(ray.get([sink.take.remote(chunk) for sink, chunk in zip(sinks, chunks)]))

        def client_sample() -> int:
            return client.sample(batch).batch_size[0]

        def bare_submit(actors: list) -> Callable[[], list]:
            return lambda: [e.give.remote() for e in actors]

        def bare_collect(refs: list) -> int:
            return sum(len(next(iter(p.values()))) for p in ray.get(refs))

        def client_group(stream: Iterator) -> Callable[[], int]:
            # one step takes a whole group of k batches, as one baseline step does
            return lambda: sum(next(stream).batch_size[0] for _ in range(k))

        stream = client.sampler(batch, prefetch=k)
        measures = [
            ("insert", insert_batch, 0, client_insert, bare_insert),
            ("sample", batch, 0, client_sample, lambda: bare_collect(bare_submit(echoes)())),
        ]
        if args.prefetch > 0:
            measures.append(("sample", batch, k, client_group(stream),
                             _pipelined(bare_submit(group_echoes), bare_collect, 2)))
        for op, size, prefetch, mine, bare in measures:
            bare_rate, my_rate = _rates_interleaved(bare, mine, seconds, min_calls)
            row = {
                "schema": kind, "op": op, "batch": size, "prefetch": prefetch, "shards": shards,
                "split": args.split, "rows_per_s": my_rate, "mb_per_s": my_rate * row_bytes / 1e6,
                "batches_per_s": my_rate / size,
                "bare_rows_per_s": bare_rate, "bare_mb_per_s": bare_rate * row_bytes / 1e6,
                "ratio": my_rate / bare_rate,
            }
            if op == "sample" and prefetch == 0:
                times = _latency(client_sample, 20 if args.quick else args.latency_calls)
                row["p50_ms"] = 1e3 * float(np.percentile(times, 50))
                row["p99_ms"] = 1e3 * float(np.percentile(times, 99))
            out.append(row)
        stream.close()
        for e in [*echoes, *group_echoes, *sinks]:
            ray.kill(e)
    finally:
        ReplayService.shutdown(name, delete=True)


def _scaling(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per schema and shard count: sample p50/p99 and prefetched batches/s, each with its
    ratio to the first shard count measured."""
    table = []
    for kind in dict.fromkeys(r["schema"] for r in results):
        rows = [r for r in results if r["schema"] == kind and r["op"] == "sample"]
        single = {r["shards"]: r for r in rows if r["prefetch"] == 0}
        grouped = {r["shards"]: r for r in rows if r["prefetch"] > 0}
        counts = list(single)
        base = counts[0]
        for count in counts:
            line = {"schema": kind, "shards": count, "vs_shards": base,
                    "p50_ms": single[count]["p50_ms"], "p99_ms": single[count]["p99_ms"],
                    "p50_ratio": single[count]["p50_ms"] / single[base]["p50_ms"]}
            if count in grouped:
                line["batches_per_s"] = grouped[count]["batches_per_s"]
                line["batches_ratio"] = grouped[count]["batches_per_s"] / grouped[base]["batches_per_s"]
            table.append(line)
    return table


def _weights(receivers: list[int], repeats: int) -> list[dict[str, Any]]:
    import gymnasium as gym

    from rlfleet.collector.config import PolicyConfig
    from rlfleet.collector.policies import build_policy
    from rlfleet.launch.bench.weights_fanout import publish_latencies

    policy = build_policy(PolicyConfig(hidden=(256, 256)), gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
    out = []
    for count in receivers:
        row = publish_latencies(count, repeats, policy.state_dict())
        out.append({"receivers": count, **row})
    for row in out:
        for key in ("distributed_p50_ms", "object_store_p50_ms"):
            row[key.replace("_p50_ms", "_ratio")] = row[key] / out[0][key]
    return out


def main(args: argparse.Namespace) -> int:
    import ray

    from rlfleet.launch.bench import start_ray

    kinds = [k.strip() for k in args.schemas.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SCHEMAS]
    if unknown:
        print(f"error: --schemas: unknown {unknown}; choose from {sorted(SCHEMAS)}")
        return 2
    if 0 in args.shards:
        print("error: --shards: every count must be at least 1")
        return 2
    receivers = args.receivers if args.receivers is not None else (args.shards if len(args.shards) > 1 else [])
    receivers = [r for r in receivers if r > 0]
    started = start_ray(args.address, num_cpus=4).started
    root = tempfile.mkdtemp(prefix="rlfleet-bench-remote-")
    results: list[dict[str, Any]] = []
    try:
        for kind in kinds:
            for shards in args.shards:
                _bench_schema(kind, args, shards, root, results)
        weights = _weights(receivers, 2 if args.quick else args.repeats) if receivers else []
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if started:
            ray.shutdown()
    scaling = _scaling(results) if len(args.shards) > 1 else []
    if getattr(args, "json", False):
        print(json.dumps({"bench": "remote", "quick": bool(args.quick), "split": args.split,
                          "results": results, "scaling": scaling, "weights": weights}))
        return 0
    for r in results:
        label = f"{r['op']} b={r['batch']}" + (f" prefetch={r['prefetch']}" if r["op"] == "sample" else "")
        extra = f" | p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms" if "p50_ms" in r else ""
        print(
            f"remote {r['schema']:8s} S={r['shards']:<3d} {label:24s} client {r['rows_per_s']:10.0f} rows/s "
            f"{r['mb_per_s']:8.1f} MB/s | bare ray {r['bare_rows_per_s']:10.0f} rows/s "
            f"{r['bare_mb_per_s']:8.1f} MB/s | ratio {r['ratio']:.2f}{extra}"
        )
    if scaling:
        print(f"scaling (split={args.split}; ratios to S={scaling[0]['vs_shards']}, same run):")
        for line in scaling:
            grouped = (f"  sampler prefetch={max(1, args.prefetch)} {line['batches_per_s']:8.0f} batches/s "
                       f"({line['batches_ratio']:.2f}x)" if "batches_per_s" in line else "")
            print(f"  {line['schema']:8s} S={line['shards']:<3d} sample p50 {line['p50_ms']:6.2f} ms "
                  f"({line['p50_ratio']:.2f}x)  p99 {line['p99_ms']:6.2f} ms{grouped}")
    if weights:
        print(f"weights: {weights[0]['bytes']:,} bytes, publish() -> every receiver holds it (p50; "
              f"ratio to R={weights[0]['receivers']}):")
        for w in weights:
            print(f"  R={w['receivers']:<3d} distributed {w['distributed_p50_ms']:8.2f} ms "
                  f"({w['distributed_ratio']:.2f}x)  object_store {w['object_store_p50_ms']:8.2f} ms "
                  f"({w['object_store_ratio']:.2f}x)  bare gloo {w['bare_gloo_p50_ms']:8.2f} ms")
    return 0
