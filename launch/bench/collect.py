"""``rlfleet bench collect``: collector fleet frames/s against bare env steps.

For each actor count M and envs-per-actor K, a fleet of M collector actors steps K
``CartPole-v1`` envs each with the MLP policy (4-64-64-2, one forward per vector step)
and streams into a real one-shard replay service. ``--vectorization envpool`` steps them
as one EnvPool pool instead (same ceiling, so the two lines compare).

``--env pong``: EnvPool Pong (``configs/atari_dqn.yaml``'s env: grey 84x84, frame skip
4, stack 4) with the Nature CNN (one forward of the K stacks per vector step), into a
frame-stack buffer. Its ceiling is a bare loop of the same EnvPool pool (same K, one
thread) plus the same CNN forward on each step's observations, on one torch thread as a
collector actor has: no Ray, no buffer, no exploration. Needs ``rlfleet[atari]``. Its rate is measured from the fleet's
counters over ``--seconds`` after a warm-up. The ceiling, measured in the same run on
this driver: K plain ``gymnasium.make("CartPole-v1")`` envs stepped in a bare Python
loop with pre-drawn random actions (no vector wrapper, no policy, no buffer), times M.
The ratio is fleet / ceiling; the bare loop runs right before and right after each
case and the ceiling takes the mean of the two, so both see the same machine (on a
shared host its speed drifts by 10% and more within a minute). Also printed: the actors' time split between env steps, policy
(forward and exploration) and sending (on its own thread, overlapping the other two), as
shares of the actors' wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np

__all__ = ["add_arguments", "main"]

ENV_ID = "CartPole-v1"
PONG_ID = "Pong-v5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts (default: 1 2)")
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 8, 32], help="envs per actor (default: 1 8 32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window per case (default: 10)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="collecting before the window (default: 3)")
    parser.add_argument("--frames-per-batch", type=int, default=1024, help="rows per extend (default: 1024)")
    parser.add_argument("--address", default=None, help="Ray address to join (default: start a local Ray)")
    parser.add_argument("--env", choices=("cartpole", "pong"), default="cartpole",
                        help="cartpole (MLP), or pong (EnvPool, Nature CNN; needs rlfleet[atari])")
    parser.add_argument("--vectorization", choices=("sync", "envpool"), default=None,
                        help="how each actor steps its envs (default: sync for cartpole, envpool for pong)")


def bare_env_fps(num_envs: int, seconds: float, seed: int = 0) -> float:
    """Frames/s of ``num_envs`` plain CartPole envs stepped in a Python loop, random actions."""
    import gymnasium

    envs = [gymnasium.make(ENV_ID) for _ in range(num_envs)]
    for j, env in enumerate(envs):
        env.reset(seed=seed + j)
    # rows of NumPy int64 scalars, what action_space.sample() gives: CartPole checks them
    # faster than Python ints (Discrete.contains), so this is the faster bare loop
    actions = [list(row) for row in np.random.default_rng(seed).integers(0, 2, (4096, num_envs))]
    frames, steps = 0, 0
    t0 = time.perf_counter()
    while True:
        row = actions[steps % 4096]
        for j, env in enumerate(envs):
            _, _, terminated, truncated, _ = env.step(row[j])
            if terminated or truncated:
                env.reset()
        frames += num_envs
        steps += 1
        if steps % 64 == 0 and time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    for env in envs:
        env.close()
    return frames / elapsed


def bare_pong_fps(num_envs: int, seconds: float, seed: int = 0) -> float:
    """Frames/s of one EnvPool Pong pool of ``num_envs`` envs (one thread) stepped with
    the Nature CNN's greedy actions on one torch thread: the ``--env pong`` ceiling."""
    import envpool
    import torch

    pool = envpool.make(PONG_ID, env_type="gymnasium", num_envs=num_envs, num_threads=1, seed=seed,
                        episodic_life=False, reward_clip=False)
    net = _pong_policy(pool.observation_space, pool.action_space)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        obs, _ = pool.reset()
        frames, steps = 0, 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            while True:
                actions = net(torch.from_numpy(obs)).argmax(1).numpy()
                obs, _, _, _, _ = pool.step(actions)
                frames += num_envs
                steps += 1
                if steps % 16 == 0 and time.perf_counter() - t0 >= seconds:
                    break
        return frames / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        pool.close()


def _pong_policy(observation_space: Any, action_space: Any) -> Any:
    from rlfleet.collector import PolicyConfig
    from rlfleet.collector.policies import build_policy

    return build_policy(PolicyConfig(type="nature_cnn", hidden=(512,)), observation_space, action_space).eval()


def _env_config(args: argparse.Namespace, envs: int) -> Any:
    from rlfleet.collector import EnvConfig

    if args.env == "pong":
        return EnvConfig(id=PONG_ID, num_envs=envs, vectorization="envpool",
                         kwargs={"num_threads": 1, "episodic_life": False, "reward_clip": False})
    return EnvConfig(id=ENV_ID, num_envs=envs, vectorization=args.vectorization or "sync")


def _fleet_case(buffer: str, actors: int, envs: int, args: argparse.Namespace) -> dict[str, Any]:
    from rlfleet.collector import CollectorConfig, CollectorFleet, ExplorationConfig, PolicyConfig

    policy = PolicyConfig(type="nature_cnn", hidden=(512,)) if args.env == "pong" else \
        PolicyConfig(type="mlp", hidden=(64, 64))
    fleet = CollectorFleet(
        f"bench-collect-{actors}x{envs}", buffer, seed=0,
        env=_env_config(args, envs),
        # a constant small epsilon: every step runs the policy forward
        collector=CollectorConfig(num_workers=actors, frames_per_batch=args.frames_per_batch,
                                  init_random_frames=0,
                                  exploration=ExplorationConfig(start=0.05, end=0.05, frames=0)),
        policy=policy,
    )
    try:
        fleet.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            reports = fleet.stats()["collectors"]
            if all(r is not None and r["batches"] >= 2 for r in reports):
                break
            time.sleep(0.2)
        time.sleep(args.warmup_s)
        s0, t0 = fleet.stats(), time.monotonic()
        time.sleep(args.seconds)
        s1, t1 = fleet.stats(), time.monotonic()
    finally:
        fleet.stop()
    split = {}
    for key in ("env_time_s", "policy_time_s", "send_time_s"):
        split[key] = sum(b[key] - a[key] for a, b in zip(s0["collectors"], s1["collectors"]))
    # Shares of each actor's wall time (sending runs on its own thread, overlapping).
    busy = actors * (t1 - t0)
    return {
        "actors": actors, "envs": envs,
        "frames_per_s": (s1["frames"] - s0["frames"]) / (t1 - t0),
        "env_share": split["env_time_s"] / busy, "policy_share": split["policy_time_s"] / busy,
        "send_share": split["send_time_s"] / busy,
    }


def main(args: argparse.Namespace) -> int:
    import ray

    from rlfleet.buffer import ReplayService
    from rlfleet.launch.bench import start_ray

    # Logical CPUs for placement only: each collector actor asks for one.
    started = start_ray(args.address, num_cpus=max(8, 2 * max(args.actors) + 2)).started
    results = []
    with tempfile.TemporaryDirectory(prefix="rlfleet-bench-collect-") as tmp:
        name = "bench-collect"
        # Keep the handle: a non-detached shard ends when its last handle goes away.
        pong = args.env == "pong"
        if pong and args.vectorization == "sync":
            raise SystemExit("bench collect: --env pong runs on EnvPool; leave --vectorization out")
        service = ReplayService.launch(name, tmp, capacity="20GB" if pong else 2_000_000, detached=False,
                                       overcommit=True, frame_stack="observation" if pong else None)
        bare_fps = bare_pong_fps if pong else bare_env_fps
        label = (f"collect {PONG_ID} envpool nature_cnn" if pong
                 else f"collect {ENV_ID} {args.vectorization or 'sync'} mlp 4-64-64-2")
        try:
            for actors in args.actors:
                for envs in args.envs:
                    # The ceiling around its case, so both see the same machine load.
                    before = bare_fps(envs, min(args.seconds, 3.0))
                    case = _fleet_case(name, actors, envs, args)
                    after = bare_fps(envs, min(args.seconds, 3.0))
                    bare = (before + after) / 2
                    case["bare_fps_per_env_loop"] = bare
                    case["bare_fps_before_after"] = [before, after]
                    case["ceiling_fps"] = bare * actors
                    case["ratio"] = case["frames_per_s"] / case["ceiling_fps"]
                    results.append(case)
                    if not args.json:
                        print(
                            f"{label}  actors={actors} envs={envs:<3d} "
                            f"frames/s={case['frames_per_s']:9.0f}  ceiling={case['ceiling_fps']:9.0f} "
                            f"({actors} x {bare:.0f} bare)  ratio={case['ratio']:.2f}  "
                            f"wall share env/policy/send={case['env_share']:.2f}/{case['policy_share']:.2f}/"
                            f"{case['send_share']:.2f}",
                            flush=True,
                        )
        finally:
            try:
                ReplayService.shutdown(service.name, delete=True)
            except Exception as e:  # noqa: BLE001 - the temporary directory goes anyway
                print(f"collect bench: shutting the buffer down failed: {e}")
            if started:
                ray.shutdown()
    if args.json:
        print(json.dumps({"bench": "collect", "env": PONG_ID if args.env == "pong" else ENV_ID,
                          "vectorization": args.vectorization or ("envpool" if args.env == "pong" else "sync"),
                          "results": results}))
    return 0
