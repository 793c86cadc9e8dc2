"""``rlfleet bench remote``: the sharded replay service through a client, against bare Ray.

Runs on the driver, which is the client process. For two schemas (CartPole-sized rows,
and Atari-sized rows of 4x84x84 uint8 frames) it fills an S-shard service (``--shards``),
then measures three operations. Each baseline makes the same Ray calls as the client,
with the same payload per call and as many calls in flight, so the ratio compares the
service (shard work, checks, assembly) with the transport alone, not one batching
against another:

- insert: ``client.extend`` of one batch of B rows (``--insert-batch``). The client sends
  it whole to one shard, or cut into C contiguous chunks, one per shard on this node,
  sent together (C = ``write_plan.chunk_count``: batches of 32 MB and more; 1 for
  CartPole rows, 2 for 1,024 Atari rows over 2 shards). Baseline: C actors, each
  receiving its chunk as numpy arrays and answering a few bytes, the C calls in flight
  together.
- sample, prefetch 0: ``client.sample(n)``, one batch at a time: one call per shard for
  its share of n rows, all shards at once. Baseline: S actors, each returning its share
  of an n-row numpy payload, fetched in parallel, one batch at a time.
- sample, prefetch k (``--prefetch``, unless 0): ``client.sampler(n, prefetch=k)``: one
  call per shard for its share of k batches (k*n rows), two such groups (2k batches) in
  flight, each group assembled into k batches. Baseline: S actors, each returning its
  share of k*n rows per call, two groups of S calls in flight.

Each line prints the client's rows/s and MB/s, the baseline's, and their ratio. Both
sides run in the same process on the same cluster, in four alternating turns (the
median of each side is printed), so the ratio survives a noisy machine better than
either figure.
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
    parser.add_argument("--shards", type=int, default=2, help="shards of the service (default 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per sample (default 256)")
    parser.add_argument("--insert-batch", type=int, default=1024, help="rows per extend (default 1024)")
    parser.add_argument("--prefetch", type=int, default=2, help="batches per sampler call; 2x in flight (default 2)")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per measurement (default 4)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster (default: start a local one for the bench)")


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


def _bench_schema(kind: str, args: argparse.Namespace, root: str, out: list[dict[str, Any]]) -> None:
    import ray
    from tensordict import TensorDict

    from rlfleet.buffer import ReplayService
    from rlfleet.buffer.arrays import arrays_to_tensordict
    from rlfleet.buffer.write_plan import chunk_count, cut_points

    rng = np.random.default_rng(0)
    schema = SCHEMAS[kind]
    batch, insert_batch, shards = args.batch_size, args.insert_batch, args.shards
    row_bytes = _nbytes(_payload(schema, 1, rng))
    fill_rows = insert_batch * (2 if args.quick else max(4, min(32, (512 << 20) // (row_bytes * insert_batch))))
    seconds = 0.3 if args.quick else args.seconds
    min_calls = 2 if args.quick else 5
    name = f"bench-remote-{kind}-{os.getpid()}"
    service = ReplayService.launch(name, os.path.join(root, kind), capacity=fill_rows * 2,
                                   num_shards=shards, seed=0)
    try:
        client = service.client(seed=0)
        td: TensorDict = arrays_to_tensordict(_payload(schema, insert_batch, rng), [insert_batch])
        echo_cls = ray.remote(num_cpus=0)(_Echo)
        k = max(1, args.prefetch)
        share = [batch // shards + (1 if j < batch % shards else 0) for j in range(shards)]
        echoes = [echo_cls.remote(_payload(schema, share[j], rng)) for j in range(shards)]
        # the sampler's calls carry k batches' share each
        group_echoes = [echo_cls.remote(_payload(schema, k * share[j], rng)) for j in range(shards)]
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
            out.append({
                "schema": kind, "op": op, "batch": size, "prefetch": prefetch, "shards": shards,
                "rows_per_s": my_rate, "mb_per_s": my_rate * row_bytes / 1e6,
                "bare_rows_per_s": bare_rate, "bare_mb_per_s": bare_rate * row_bytes / 1e6,
                "ratio": my_rate / bare_rate,
            })
        stream.close()
        for e in [*echoes, *group_echoes, *sinks]:
            ray.kill(e)
    finally:
        ReplayService.shutdown(name, delete=True)


def main(args: argparse.Namespace) -> int:
    import ray

    from rlfleet.launch.bench import start_ray

    started = start_ray(args.address, num_cpus=4).started
    kinds = [k.strip() for k in args.schemas.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SCHEMAS]
    if unknown:
        print(f"error: --schemas: unknown {unknown}; choose from {sorted(SCHEMAS)}")
        return 2
    root = tempfile.mkdtemp(prefix="rlfleet-bench-remote-")
    results: list[dict[str, Any]] = []
    try:
        for kind in kinds:
            _bench_schema(kind, args, root, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if started:
            ray.shutdown()
    if getattr(args, "json", False):
        print(json.dumps({"bench": "remote", "quick": bool(args.quick), "results": results}))
        return 0
    for r in results:
        label = f"{r['op']} b={r['batch']}" + (f" prefetch={r['prefetch']}" if r["op"] == "sample" else "")
        print(
            f"remote {r['schema']:8s} {label:24s} client {r['rows_per_s']:10.0f} rows/s "
            f"{r['mb_per_s']:8.1f} MB/s | bare ray {r['bare_rows_per_s']:10.0f} rows/s "
            f"{r['bare_mb_per_s']:8.1f} MB/s | ratio {r['ratio']:.2f}"
        )
    return 0
