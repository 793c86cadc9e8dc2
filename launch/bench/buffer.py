"""``rlfleet bench buffer``: the local memmap ReplayBuffer against the limits it can reach.

Runs on the driver, single-threaded, in a scratch directory it deletes afterwards.
Every figure is printed beside a limit measured in the same run on the same shapes:

- writes (batches of 1024) in steady state after the ring wraps against numpy slice
  assignment into plain ``np.memmap`` files of the same shapes in steady state (the
  page-cache write limit), and RAM memcpy for reference; writes while filling against
  the same plain files' first lap (fresh sparse pages cost the kernel far more);
- uniform samples of 256 against a numpy fancy-index gather from the same memmap files
  into a fresh array, and a gather into a preallocated array; ``sample(n)`` returns
  fresh tensors, ``sample(n, out=batch)`` refills one batch (the preallocated case).
  The gathers use pre-drawn random indices, as many as the buffer has rows, so that
  like a sampler they reach rows all over the files (a pool of 64 batches touched 16k
  cartpole rows, 0.7 MB, which stay in a core's L2 cache: a limit no sampler meets);
- prioritized sample + ``update_priority`` against the uniform sample rate;
- sequence samples (32 slices of 8) in a 10M-row buffer against a 100k-row one;
- for ``atari``, real Pong rows stored one frame per row: bytes per transition, and
  stacked 3-step samples against a gather of the same frames (``frames``).

Figures are medians over repeats after a warm-up; within a repeat each figure and its
limits take turns, so a busy machine slows them alike and the ratios stay meaningful.
``--quick`` shrinks every size for a smoke run (the figures then say little).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rlfleet.buffer.replay_buffer import ReplayBuffer

__all__ = ["add_arguments", "main"]

BATCH = 1024
SAMPLE = 256
SEQ_SLICES, SEQ_LEN = 32, 8

# Rows in TorchRL's layout (buffer format 2). "cartpole" is a CartPole transition cut to
# the keys a learner reads (45 bytes a row); "atari" is two 4x84x84 uint8 frame stacks
# and nothing else (56,448 bytes), so its GB/s are frame bytes alone.
SCHEMAS: dict[str, dict[tuple[str, ...], tuple[tuple[int, ...], str]]] = {
    "cartpole": {
        ("observation",): ((4,), "float32"),
        ("next", "observation"): ((4,), "float32"),
        ("action",): ((), "int64"),
        ("next", "reward"): ((1,), "float32"),
        ("next", "done"): ((1,), "bool"),
    },
    "atari": {
        ("observation",): ((4, 84, 84), "uint8"),
        ("next", "observation"): ((4, 84, 84), "uint8"),
    },
}
ROWS = {"cartpole": 1_000_000, "atari": 100_000}
QUICK_ROWS = {"cartpole": 20_000, "atari": 2_000}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--dir", default=None, help="scratch directory (default: the system temp dir)")
    parser.add_argument("--schemas", "--schema", default="cartpole,atari", help="comma-separated: cartpole, atari")
    parser.add_argument("--frame-rows", type=int, default=None,
                        help="transitions of the Pong frame-stack buffer (atari; default 1,000,000)")
    parser.add_argument("--cold", action="store_true",
                        help="Pong frame stacks: sample with the page cache dropped, against cold pread "
                             "(for a --frame-rows buffer larger than RAM)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per figure (the median is printed)")


def _row_bytes(schema) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for shape, dt in schema.values())


def _batch(schema, n: int, rng: np.random.Generator, first: int = 0) -> dict[tuple[str, ...], np.ndarray]:
    out = {}
    for key, (shape, dt) in schema.items():
        if dt == "uint8":
            out[key] = rng.integers(0, 255, size=(n, *shape), dtype=np.uint8)
        elif dt == "bool":
            out[key] = rng.random((n, *shape)) < 0.01
        elif dt == "int64":
            out[key] = np.arange(first, first + n, dtype=np.int64).reshape(n, *shape) if not shape else rng.integers(0, 4, size=(n, *shape))
        else:
            out[key] = rng.standard_normal((n, *shape)).astype(dt)
    return out


class _Report:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.results: list[dict[str, Any]] = []

    def add(self, name: str, setting: str, rows_per_s: float, row_bytes: int,
            refs: list[tuple[str, float]], ratio_unit: str = "GB/s") -> None:
        """``refs``: (limit name, its figure in ``ratio_unit``); the first is the target's."""
        gbps = rows_per_s * row_bytes / 1e9
        mine = gbps if ratio_unit == "GB/s" else rows_per_s
        entry = {"name": name, "setting": setting, "rows_per_s": rows_per_s, "gb_per_s": gbps,
                 "limits": [{"name": n, ratio_unit.replace("/", "_per_"): v, "ratio": mine / v} for n, v in refs]}
        self.results.append(entry)
        if self.as_json:
            return
        parts = [f"{name:<36}", f"{setting:<12}", f"{gbps:6.2f} GB/s", f"{rows_per_s:>13,.0f} rows/s"]
        for i, (n, v) in enumerate(refs):
            figure = f"{v:.2f} GB/s" if ratio_unit == "GB/s" else f"{v:,.0f} rows/s"
            parts.append(f"{mine / v:5.2f}x {n} ({figure})" if i == 0 else f"{mine / v:5.2f}x {n}")
        print("   ".join(parts), flush=True)


class _PlainMemmap:
    """Plain ``np.memmap`` files of the same shapes: the page-cache write limit."""

    def __init__(self, root: Path, schema, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.files = {
            key: np.memmap(root / f"plain-{i}.bin", dtype=dt, mode="w+", shape=(capacity, *shape))
            for i, (key, (shape, dt)) in enumerate(schema.items())
        }
        self.batch = _batch(schema, BATCH, rng)
        self.ram = {k: np.empty_like(v) for k, v in self.batch.items()}
        self.cursor = 0

    def write(self) -> None:
        lo = self.cursor if self.cursor + BATCH <= self.capacity else 0
        for key, arr in self.files.items():
            arr[lo : lo + BATCH] = self.batch[key]
        self.cursor = lo + BATCH

    def flush(self) -> None:
        for arr in self.files.values():
            arr.flush()

    def memcpy(self) -> None:
        for key, src in self.batch.items():
            np.copyto(self.ram[key], src)

    def close(self, root: Path) -> None:
        self.files = {}
        for p in root.glob("plain-*.bin"):
            p.unlink()


def _interleaved(fns: dict[str, Callable[[], Any]], iters: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns in every
    repeat so that a busy machine slows them alike and their ratios stay meaningful."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times[name].append((time.perf_counter() - t0) / iters)
    return {name: statistics.median(t) for name, t in times.items()}


def _bench_schema(name: str, root: Path, rows: int, repeats: int, quick: bool, report: _Report) -> None:
    schema = SCHEMAS[name]
    rb_bytes = _row_bytes(schema)
    rng = np.random.default_rng(0)
    steady = 8 if name == "atari" else 200
    if quick:
        steady = 4 if name == "atari" else 20
    fill_batches = rows // BATCH

    plain = _PlainMemmap(root, schema, rows, rng)
    t0 = time.perf_counter()
    for _ in range(fill_batches):  # one lap: from here every page exists (steady state)
        plain.write()
    plain_fill_rows_s = fill_batches * BATCH / (time.perf_counter() - t0)

    path = root / f"{name}-uniform"
    rb = ReplayBuffer.create(path, capacity=rows, seed=0, overcommit=True)
    batches = [_batch(schema, BATCH, rng) for _ in range(4)]
    k = [0]

    def extend() -> None:
        rb.extend_arrays(batches[k[0] % 4])
        k[0] += 1

    t0 = time.perf_counter()
    for _ in range(fill_batches):
        extend()
    fill_rows_s = fill_batches * BATCH / (time.perf_counter() - t0)
    while rb.total_inserted < rows + BATCH:  # wrap the ring: steady state from here
        extend()
    # both start clean: pages still under writeback from an earlier lap stall the writes
    # to them, which would favour whichever files were written last
    rb.flush()
    plain.flush()
    t = _interleaved({"ours": extend, "plain": plain.write, "memcpy": plain.memcpy}, steady, repeats)
    plain.close(root)
    gbps = {key: BATCH / v * rb_bytes / 1e9 for key, v in t.items()}
    report.add(f"write {name} filling", f"batch={BATCH}", fill_rows_s, rb_bytes,
               [("np.memmap fill", plain_fill_rows_s * rb_bytes / 1e9), ("np.memmap write", gbps["plain"])])
    report.add(f"write {name} steady", f"batch={BATCH}", BATCH / t["ours"], rb_bytes,
               [("np.memmap write", gbps["plain"]), ("memcpy", gbps["memcpy"])])

    # uniform samples against gathers from the same memmap files
    from tensordict import TensorDict

    rb.flush()
    data = TensorDict.load_memmap(path / "data")  # the same files, opened as plain tensordict does
    views = {key: data.get(key).numpy() for key in SCHEMAS[name]}
    # as many indices as rows: the gathers touch the whole files, as sampling does
    pool_size = max(64, rows // SAMPLE)
    idx_pool = list(rng.integers(0, rows, (pool_size, SAMPLE)))
    pre = {key: np.empty((SAMPLE, *v.shape[1:]), v.dtype) for key, v in views.items()}
    j = [0]

    def fresh_gather() -> None:
        idx = idx_pool[j[0] % pool_size]
        j[0] += 1
        for v in views.values():
            v[idx]

    def prealloc_gather() -> None:
        idx = idx_pool[j[0] % pool_size]
        j[0] += 1
        for key, v in views.items():
            np.take(v, idx, axis=0, out=pre[key], mode="clip")

    iters = 20 if name == "atari" else 2000
    if quick:
        iters //= 10
    out = rb.sample(SAMPLE)
    t = _interleaved({
        "sample": lambda: rb.sample(SAMPLE), "out": lambda: rb.sample(SAMPLE, out=out),
        "arrays": lambda: rb.sample_arrays(SAMPLE), "pre": prealloc_gather, "fresh": fresh_gather,
    }, iters, repeats)
    refs = [("prealloc gather", SAMPLE / t["pre"] * rb_bytes / 1e9),
            ("fresh gather", SAMPLE / t["fresh"] * rb_bytes / 1e9)]
    report.add(f"sample uniform {name}", f"n={SAMPLE}", SAMPLE / t["sample"], rb_bytes, refs)
    report.add(f"sample uniform {name} out=", f"n={SAMPLE}", SAMPLE / t["out"], rb_bytes, refs)
    report.add(f"sample_arrays uniform {name}", f"n={SAMPLE}", SAMPLE / t["arrays"], rb_bytes, refs)
    rb.close()

    # prioritized: the same rows, reopened with the prioritized sampler; the uniform
    # rate it is judged against is measured again, in turns with it
    uniform = ReplayBuffer.open(path, seed=0)
    prioritized = ReplayBuffer.open(path, seed=0, sampler={"type": "prioritized", "alpha": 0.6, "beta": 0.4})
    prio = [rng.random(SAMPLE) * 2 for _ in range(8)]

    def sample_update() -> None:
        batch = prioritized.sample(SAMPLE)
        prioritized.update_priority(batch["index"], prio[j[0] % 8])
        j[0] += 1

    t = _interleaved({"prio": sample_update, "uniform": lambda: uniform.sample(SAMPLE)}, iters, repeats)
    report.add(f"sample+update prioritized {name}", f"n={SAMPLE}", SAMPLE / t["prio"], rb_bytes,
               [("uniform sample", SAMPLE / t["uniform"])], ratio_unit="rows/s")
    prioritized.close()
    uniform.close()
    shutil.rmtree(path)


def _bench_sequence(root: Path, sizes: tuple[int, int], repeats: int, quick: bool, report: _Report) -> None:
    """Sequence sampling cost must not depend on the buffer's size."""
    schema = dict(SCHEMAS["cartpole"])
    schema[("episode_id",)] = ((), "int64")
    schema[("step",)] = ((), "int64")
    rb_bytes = _row_bytes(schema)
    rng = np.random.default_rng(1)
    buffers = {}
    for rows in sizes:
        rb = ReplayBuffer.create(root / f"sequence-{rows}", capacity=rows,
                                 sampler={"type": "sequence", "length": SEQ_LEN}, seed=0, overcommit=True)
        chunk = min(rows, 1_000_000)
        for first in range(0, rows, chunk):
            arrays = _batch(schema, chunk, rng)
            ids = np.arange(first, first + chunk)
            arrays[("episode_id",)] = ids // 200  # env-major episodes of 200 steps
            arrays[("step",)] = ids % 200
            rb.extend_arrays(arrays)
        buffers[rows] = rb
    iters = 100 if quick else 1000
    t = _interleaved({rows: (lambda rb=rb: rb.sample(SEQ_SLICES)) for rows, rb in buffers.items()}, iters, repeats)
    for rows, rb in buffers.items():
        rb.close()
        shutil.rmtree(root / f"sequence-{rows}")
    base = SEQ_SLICES * SEQ_LEN / t[sizes[0]]
    for rows in sizes:
        report.add(f"sample sequence cartpole {rows:,} rows", f"{SEQ_SLICES}x{SEQ_LEN}",
                   SEQ_SLICES * SEQ_LEN / t[rows], rb_bytes, [(f"at {sizes[0]:,} rows", base)],
                   ratio_unit="rows/s")


def main(args: argparse.Namespace) -> int:
    report = _Report(args.json)
    root = Path(tempfile.mkdtemp(prefix="rlfleet-bench-", dir=args.dir))
    rows_for = QUICK_ROWS if args.quick else ROWS
    repeats = max(1, args.repeats if not args.quick else min(args.repeats, 3))
    try:
        for name in [s.strip() for s in args.schemas.split(",") if s.strip()]:
            if name not in SCHEMAS:
                raise SystemExit(f"bench buffer: unknown schema {name!r}; choose from {', '.join(SCHEMAS)}")
            _bench_schema(name, root, rows_for[name], repeats, args.quick, report)
            if name == "atari":
                from rlfleet.launch.bench.frames import bench_frames

                frame_rows = args.frame_rows or (20_000 if args.quick else 1_000_000)
                bench_frames(root, frame_rows, repeats, args.quick, report, _interleaved, cold=args.cold)
        sizes = (10_000, 100_000) if args.quick else (100_000, 10_000_000)
        _bench_sequence(root, sizes, repeats, args.quick, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"bench": "buffer", "quick": bool(args.quick), "results": report.results}, indent=1))
    return 0
