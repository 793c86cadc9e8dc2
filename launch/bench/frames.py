"""``rlfleet bench buffer --schema atari``, the frame-stack part: real ALE Pong rows stored
one frame per row (``rlfleet.buffer.frames``).

Runs on the driver, single-threaded, in the scratch directory of ``bench buffer``.

- **Bytes per transition.** Pong is stepped with ``configs/atari_dqn.yaml``'s wrappers
  (grey 84x84, frame skip 4, no-op starts, stack 4) under random actions, for a few real
  episodes; the rows, laid out as a collector writes them, go into a frame-stack buffer
  (as ``rlfleet run`` makes it) and into a plain one. Printed: stored bytes per transition
  of each (the reset rows counted), and the two-stack figure TorchRL's memmap storage
  has (``2 * 4 * 84 * 84`` bytes of frames a row plus the same small keys).
- **Stacked samples.** A buffer of ``rows`` transitions is filled through ``extend`` with
  episodes of the recorded frames (each batch one episode under a fresh id: real pixels,
  real stacks, the same compaction and checks as a run), then sampled: 32 transitions
  with 3-step returns, uniform and prioritized, plain and ``out=``. The limit: a numpy
  gather of the same frames (the 8 frames each sampled row's stacks copy: its
  observation, rows i-4 .. i-1, and the next observation 3 steps on, rows i-1 .. i+2,
  at rows drawn the same way) from the same memmap file into a preallocated array.
- ``--cold`` (larger-than-RAM runs, ``--frame-rows`` past the RAM): the page cache is
  dropped for the data files before sampling (``posix_fadvise(DONTNEED)`` after a flush),
  and the limit is instead ``os.pread`` of the same frames at their random file offsets,
  cold as well. The process's peak RSS is printed.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rlfleet.buffer.replay_buffer import ReplayBuffer

__all__ = ["bench_frames"]

SAMPLE = 32
N_STEP = {"n": 3, "gamma": 0.99}
EPISODE_ROWS = 256  # rows of one fill batch: one recorded episode, cut at 256 steps
TWO_STACK_FRAMES = 2 * 4 * 84 * 84


def record_pong(steps: int, seed: int = 0) -> dict[tuple[str, ...], np.ndarray]:
    """``steps`` transitions of ALE Pong under random actions, with the wrappers of
    ``configs/atari_dqn.yaml``, in rlfleet's row layout (one env: its episodes in order)."""
    from rlfleet.collector.config import EnvConfig
    from rlfleet.collector.envs import make_env
    from rlfleet.launch.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "atari_dqn.yaml")
    env = make_env(EnvConfig(id=config.env.id, kwargs=config.env.kwargs, wrappers=config.env.wrappers,
                             vectorization=config.env.vectorization), seed=seed)
    obs, _ = env.reset(seed=seed)
    rows: dict[str, list[Any]] = {k: [] for k in ("obs", "next", "action", "reward", "term", "trunc", "episode", "step")}
    episode, step = 0, 0
    for _ in range(steps):
        action = env.action_space.sample()
        nxt, reward, term, trunc, _ = env.step(action)
        for key, value in (("obs", obs), ("next", nxt), ("action", action), ("reward", reward), ("term", term),
                           ("trunc", trunc), ("episode", episode), ("step", step)):
            rows[key].append(np.array(value, copy=True))
        if term or trunc:
            obs, _ = env.reset()
            episode, step = episode + 1, 0
        else:
            obs, step = nxt, step + 1
    env.close()
    term, trunc = np.array(rows["term"])[:, None], np.array(rows["trunc"])[:, None]
    n = len(rows["obs"])
    return {
        ("observation",): np.stack(rows["obs"]), ("next", "observation"): np.stack(rows["next"]),
        ("action",): np.array(rows["action"], dtype=np.int64),
        ("episode_id",): np.array(rows["episode"], dtype=np.int64), ("step",): np.array(rows["step"], dtype=np.int64),
        ("collector_id",): np.zeros(n, dtype=np.int64), ("policy_version",): np.zeros(n, dtype=np.int64),
        ("next", "reward"): np.array(rows["reward"], dtype=np.float32)[:, None],
        ("next", "terminated"): term, ("next", "truncated"): trunc, ("next", "done"): term | trunc,
    }


def _stored_bytes(rb: ReplayBuffer) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
               for shape, dtype in _stored_schema(rb).values())


def _stored_schema(rb: ReplayBuffer) -> dict:
    import json

    from rlfleet.buffer.storage import schema_from_json

    return schema_from_json(json.loads((rb.path / "meta.json").read_text())["schema"])


def _episode_batch(recorded: dict[tuple[str, ...], np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    """The first ``EPISODE_ROWS`` rows of the recording's first episode, ended there
    (truncated), as one batch; the caller gives each copy a fresh ``episode_id``."""
    batch = {key: a[:EPISODE_ROWS].copy() for key, a in recorded.items()}
    if not (batch[("episode_id",)] == 0).all():
        raise RuntimeError("bench: the first recorded Pong episode is shorter than one batch; record more steps")
    batch[("next", "truncated")][-1] = True
    batch[("next", "done")][-1] = True
    return batch


def _rss() -> str:
    """This process's resident memory now, anonymous and file-backed (Linux), as text."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    except OSError:
        return "unknown"
    kib = {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile") if k in fields}
    return ", ".join(f"{k} {v / 2**20:.2f} GiB" for k, v in kib.items()) or "unknown"


def _drop_cache(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bench_frames(root: Path, rows: int, repeats: int, quick: bool, report: Any,
                 interleaved: Callable[[dict[str, Callable[[], Any]], int, int], dict[str, float]],
                 *, cold: bool = False) -> None:
    """Print the frame-stack figures (see the module docstring) through ``report`` (the
    ``bench buffer`` report), timing warm figures with its ``interleaved``."""
    try:
        recorded = record_pong(600 if quick else 3000)
    except (ImportError, ValueError) as e:
        print(f"bench buffer: skipping the Pong frame-stack figures: {e}", flush=True)
        return
    transitions = len(recorded[("step",)])
    episodes = int(recorded[("episode_id",)][-1]) + 1

    # -- bytes per transition, real episodes as one env wrote them
    sizes = {}
    for label, frame_stack in (("frames once", {"key": "observation", "padding": "reset"}), ("two stacks", None)):
        rb = ReplayBuffer.create(root / f"pong-{label.replace(' ', '-')}", capacity=transitions + 64, seed=0,
                                 frame_stack=frame_stack, overcommit=True)
        rb.extend_arrays(recorded)
        sizes[label] = _stored_bytes(rb) * rb.total_inserted / transitions
        rb.close()
        shutil.rmtree(rb.path)
    print(f"pong rows: {transitions:,} transitions in {episodes} episode(s) (random actions, configs/atari_dqn.yaml "
          f"wrappers): {sizes['frames once']:,.0f} bytes/transition stored with frame_stack, "
          f"{sizes['two stacks']:,.0f} with two stacks ({sizes['two stacks'] / sizes['frames once']:.1f}x; "
          f"TorchRL's memmap storage holds the two stacks: {TWO_STACK_FRAMES:,} bytes of frames a row)", flush=True)
    if hasattr(report, "results"):
        report.results.append({"name": "pong bytes per transition", "frames_once": sizes["frames once"],
                               "two_stacks": sizes["two stacks"], "transitions": transitions, "episodes": episodes})

    # -- stacked samples from a big buffer
    batch = _episode_batch(recorded)
    path = root / "pong-frames"
    rb = ReplayBuffer.create(path, capacity=rows + rows // EPISODE_ROWS + 1, seed=0, overcommit=True,
                             sampler={"type": "uniform", "n_step": N_STEP}, frame_stack="observation")
    t0 = time.perf_counter()
    for e in range(-(-rows // EPISODE_ROWS)):
        batch[("episode_id",)][:] = e
        rb.extend_arrays(batch)
    fill_s = time.perf_counter() - t0
    rb.flush()
    row_bytes = _stored_bytes(rb)
    print(f"pong frame-stack buffer: {rb.total_inserted:,} rows ({rb.total_inserted * row_bytes / 1e9:.2f} GB) "
          f"filled through extend in {fill_s:.1f} s ({rb.total_inserted / fill_s:,.0f} rows/s)", flush=True)
    rb.close()
    from tensordict import TensorDict

    frames = TensorDict.load_memmap(path / "data").get(("frame_stack", "frame")).numpy()
    frame_bytes = frames[0].nbytes
    logical_bytes = TWO_STACK_FRAMES  # what a sample hands over: two stacks a row
    rng = np.random.default_rng(0)
    count = len(frames)
    uniform = ReplayBuffer.open(path, seed=0)
    prioritized = ReplayBuffer.open(path, seed=0, sampler={"type": "prioritized", "alpha": 0.6, "beta": 0.4,
                                                           "n_step": N_STEP})
    iters = 20 if quick else 200
    # a round of 200 samples lasts about 40 ms, short enough for a neighbour's burst on a
    # shared machine to swing one round: the median of at least 9 (about 2 s in all)
    repeats = repeats if quick else max(repeats, 9)
    pool = max(64, iters * (repeats + 1))
    # the frames a 3-step sample copies, 8 per row at slots drawn alike: a row's stack
    # (rows i-4 .. i-1) and the stack 3 steps on (rows i-1 .. i+2)
    n_step = N_STEP["n"]
    offsets = np.r_[np.arange(-4, 0), np.arange(n_step - 4, n_step)]
    slots = [rng.integers(4, count - n_step, SAMPLE)[:, None] + offsets for _ in range(pool)]
    pre = np.empty((SAMPLE, 8, *frames.shape[1:]), frames.dtype)
    j = [0]

    def gather() -> None:
        np.take(frames, slots[j[0] % pool], axis=0, out=pre, mode="clip")
        j[0] += 1

    fd = os.open(path / "data" / "frame_stack" / "frame.memmap", os.O_RDONLY) if cold else None

    def pread() -> None:
        for slot in slots[j[0] % pool].reshape(-1):
            os.pread(fd, frame_bytes, int(slot) * frame_bytes)
        j[0] += 1

    out_u = uniform.sample(SAMPLE)
    out_p = prioritized.sample(SAMPLE)
    fns = {"uniform": lambda: uniform.sample(SAMPLE), "uniform out=": lambda: uniform.sample(SAMPLE, out=out_u),
           "prioritized": lambda: prioritized.sample(SAMPLE),
           "prioritized out=": lambda: prioritized.sample(SAMPLE, out=out_p)}
    limit_name = "cold pread" if cold else "prealloc gather"
    fns[limit_name] = pread if cold else gather
    if cold:  # each figure on a cold cache: one pass each, the cache dropped before it
        t = {}
        for name, fn in fns.items():
            _drop_cache(path)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            t[name] = (time.perf_counter() - t0) / iters
    else:
        t = interleaved(fns, iters, repeats)
    limit = SAMPLE / t[limit_name] * logical_bytes / 1e9
    for name in ("uniform", "uniform out=", "prioritized", "prioritized out="):
        report.add(f"sample {name} pong 3-step stacks", f"n={SAMPLE}", SAMPLE / t[name], logical_bytes,
                   [(limit_name, limit)])
    if fd is not None:
        os.close(fd)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"pong sample buffer: {count:,} rows; RSS of this process: peak {peak / 2**30:.2f} GiB, now "
          f"{_rss()} (file pages are the page cache's, mapped by the buffer's and the baseline's maps)", flush=True)
    uniform.close()
    prioritized.close()
    shutil.rmtree(path)
