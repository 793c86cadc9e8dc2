"""``Collector``: steps K envs with a torch policy and sends transition batches to a sink.

The loop that drives it (the ``CollectorActor`` runs exactly this, between batches it
also applies new weights)::

    collector = Collector(env_cfg, policy_cfg, sink=buffer_client, collector_id=i, seed=s)
    while running:
        collector.run_batch()          # step T times, sink.extend(batch of T*K rows)
    collector.close()

A batch holds ``T = ceil(frames_per_batch / K)`` vector steps. Per step the collector
copies observations, actions, rewards and flags into preallocated ``[T, K, ...]`` numpy
arrays; once per batch it reorders them env-major (all T rows of env 0 in time order,
then env 1, ...) so an episode's rows are contiguous in the buffer, and wraps them in a
``TensorDict [T*K]`` in TorchRL's layout (buffer format 2, DESIGN.md "Data"), ``N = T*K``::

    observation                 env's dtype [N, *obs]
    action                      int64 [N] (Discrete), the env's dtype [N, *act] (Box)
    episode_id, step            int64 [N]
    collector_id, policy_version  int64 [N]
    next: observation           env's dtype [N, *obs]
          reward                float32 [N, 1]
          terminated, truncated, done  bool [N, 1]   (done = terminated | truncated)

The ``CollectorActor`` overlaps the two halves: it sends batch b on a second thread
while it collects batch b+1 (``collect_batch`` then ``send``).

Episode ids: ``(collector_id << 48) | (incarnation << 32) | n``, where ``n`` counts this
collector incarnation's episodes from 0. Distinct collectors and distinct incarnations
(restarts) of one collector never share an id; limits are 32767 collectors, 65535
restarts each, and 2**32 episodes per incarnation (each is checked).

The vector env autoresets in ``SAME_STEP`` mode and is stepped by ``VectorStepper`` (see
``envs.py``): every step is a transition, and ``("next", "observation")`` of a step that
ends an episode is the true final observation, never the reset one. Not thread-safe: one
thread drives it.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from tensordict import TensorDict

from rlfleet.collector.config import EnvConfig, ExplorationConfig, PolicyConfig
from rlfleet.collector.envs import VectorStepper, derive_seeds, reset_vector_env
from rlfleet.collector.exploration import Explorer
from rlfleet.collector.policies import acting_forward, build_policy, check_state_dict, resolve_device

__all__ = ["Collector", "Sink", "episode_id"]

log = logging.getLogger(__name__)

COLLECTOR_BITS = 15
INCARNATION_BITS = 16
COUNTER_BITS = 32
RECENT_EPISODES = 100


def episode_id(collector_id: int, incarnation: int, counter: int) -> int:
    """The fleet-unique id of episode ``counter`` of one collector incarnation."""
    return (collector_id << (INCARNATION_BITS + COUNTER_BITS)) | (incarnation << COUNTER_BITS) | counter


class Sink(Protocol):
    """Where batches go: a ``BufferClient``, a local ``ReplayBuffer``, or a test's list."""

    def extend(self, td: TensorDict) -> Any: ...


class Collector:
    """Steps one vector env with one policy; see the module docstring for the loop.

    Args:
        env: The env config (``num_envs`` is K).
        policy: The policy config; the module is built here with ``build_policy``.
        sink: Receives each batch through ``extend(td)``.
        collector_id: This collector's index in the fleet, stamped on every row.
        incarnation: How many times this collector was restarted (part of episode ids).
        seed: Run seed; the actor and env seeds derive from it, the index and incarnation.
        frames_per_batch: Rows per batch, rounded up to a multiple of K.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for the policy.
        init_random_frames: Frames of uniform random actions first.
        exploration: Exploration after the random frames.
        start_frames: Frames this collector already gathered before a restart, so the
            random phase and epsilon schedule continue instead of starting over.

    Raises:
        ValueError: Bad ids, an env or space the policies cannot handle, a missing device.
    """

    def __init__(self, env: EnvConfig, policy: PolicyConfig, sink: Sink, *, collector_id: int = 0,
                 incarnation: int = 0, seed: int = 0, frames_per_batch: int = 1024,
                 device: str = "cpu", init_random_frames: int = 0,
                 exploration: ExplorationConfig | None = None, start_frames: int = 0) -> None:
        if not 0 <= collector_id < 2**COLLECTOR_BITS:
            raise ValueError(f"collector_id = {collector_id}: must be in [0, {2**COLLECTOR_BITS})")
        if not 0 <= incarnation < 2**INCARNATION_BITS:
            raise ValueError(
                f"incarnation = {incarnation}: must be in [0, {2**INCARNATION_BITS}); the collector "
                "was restarted too often, look for the cause of the crashes"
            )
        if frames_per_batch < 1:
            raise ValueError(f"frames_per_batch = {frames_per_batch}: must be >= 1")
        self.device = resolve_device(device)
        self.sink = sink
        self.collector_id = collector_id
        self.incarnation = incarnation
        self.num_envs = env.num_envs
        self.steps_per_batch = math.ceil(frames_per_batch / env.num_envs)
        actor_seed = derive_seeds(seed, 1, salt=(collector_id, incarnation))[0]
        self.venv, first_obs = reset_vector_env(env, seed=actor_seed)
        try:
            self.stepper = VectorStepper(self.venv)
            obs_space = self.venv.single_observation_space
            act_space = self.venv.single_action_space
            # Every collector of a run starts from the same weights, whatever the global RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = build_policy(policy, obs_space, act_space)
            self.policy = module.to(self.device).eval()
            self._forward = acting_forward(self.policy)
            self.explorer = Explorer(
                exploration or ExplorationConfig(), act_space, num_envs=env.num_envs,
                init_random_frames=init_random_frames, seed=actor_seed,
            )
        except BaseException:
            self.venv.close()
            raise
        self.policy_version = 0
        self.frames = start_frames
        self.batches = 0
        self.episodes = 0
        self._next_episode = 0
        self._obs = np.array(first_obs)  # our own copy: updated in place every step
        k, t = self.num_envs, self.steps_per_batch
        self._episode_ids = np.array([self._new_episode_id() for _ in range(k)], dtype=np.int64)
        self._steps = np.zeros(k, dtype=np.int64)
        self._returns = np.zeros(k, dtype=np.float64)
        self.recent_returns: collections.deque[float] = collections.deque(maxlen=RECENT_EPISODES)
        self.recent_lengths: collections.deque[int] = collections.deque(maxlen=RECENT_EPISODES)
        obs_shape, obs_dtype = obs_space.shape, obs_space.dtype
        act_shape, act_dtype = act_space.shape, np.dtype(act_space.dtype)
        if self.explorer.discrete:
            act_dtype = np.dtype(np.int64)
        self._buf = {
            "observation": np.empty((t, k, *obs_shape), obs_dtype),
            "next_observation": np.empty((t, k, *obs_shape), obs_dtype),
            "action": np.empty((t, k, *act_shape), act_dtype),
            "reward": np.empty((t, k), np.float32),
            "terminated": np.empty((t, k), bool),
            "truncated": np.empty((t, k), bool),
            "episode_id": np.empty((t, k), np.int64),
            "step": np.empty((t, k), np.int64),
        }
        self.env_time_s = 0.0
        self.policy_time_s = 0.0
        self.send_time_s = 0.0
        self.last_batch: dict[str, float] = {}

    def _new_episode_id(self) -> int:
        if self._next_episode >= 2**COUNTER_BITS:
            raise RuntimeError(
                f"collector {self.collector_id}: {self._next_episode} episodes exhaust the "
                f"{COUNTER_BITS}-bit episode counter of one incarnation; restart the collector"
            )
        n = self._next_episode
        self._next_episode += 1
        return episode_id(self.collector_id, self.incarnation, n)

    def set_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Load new policy weights (tensors or numpy arrays); later rows carry ``version``.

        Raises:
            ValueError: Keys or shapes differ from the policy (nothing is loaded).
        """
        check_state_dict(self.policy, state_dict)
        tensors = {k: torch.as_tensor(np.array(v)) if isinstance(v, np.ndarray) else v
                   for k, v in state_dict.items()}
        self.policy.load_state_dict(tensors)
        self.policy_version = int(version)

    def collect_batch(self) -> TensorDict:
        """Step ``T`` times and return the batch ``[T*K]``, env-major, without sending it."""
        buf = self._buf
        obs_buf, next_buf, act_buf = buf["observation"], buf["next_observation"], buf["action"]
        reward_buf, term_buf, trunc_buf = buf["reward"], buf["terminated"], buf["truncated"]
        episode_buf, step_buf = buf["episode_id"], buf["step"]
        step, act, policy, device = self.stepper.step, self.explorer.act, self._forward, self.device
        discrete, num_envs = self.explorer.discrete, self.num_envs
        obs = self._obs
        env_time = policy_time = 0.0
        for t in range(self.steps_per_batch):
            obs_buf[t] = obs
            t0 = time.perf_counter()
            actions = act(policy, torch.from_numpy(obs_buf[t]).to(device), self.frames)
            t1 = time.perf_counter()
            # NumPy int64 scalars: envs assert Discrete.contains per step, and in gymnasium
            # 1.x that costs 1.25 us for one against 1.6 us for a Python int (np.iinfo).
            reward, terminated, truncated, resets = step(list(actions) if discrete else actions, next_buf[t])
            t2 = time.perf_counter()
            policy_time += t1 - t0
            env_time += t2 - t1
            act_buf[t] = actions
            reward_buf[t] = reward
            term_buf[t] = terminated
            trunc_buf[t] = truncated
            episode_buf[t] = self._episode_ids
            step_buf[t] = self._steps
            self._returns += reward
            self._steps += 1
            obs[...] = next_buf[t]
            for j, first in resets.items():
                obs[j] = first  # next_buf keeps the true final observation
                self.recent_returns.append(float(self._returns[j]))
                self.recent_lengths.append(int(self._steps[j]))
                self._returns[j] = 0.0
                self._steps[j] = 0
                self._episode_ids[j] = self._new_episode_id()
                self.episodes += 1
            self.frames += num_envs
        self.env_time_s += env_time
        self.policy_time_s += policy_time
        self.last_batch = {"env_time_s": env_time, "policy_time_s": policy_time,
                           "frames": self.steps_per_batch * self.num_envs}
        return self._as_tensordict()

    def _as_tensordict(self) -> TensorDict:
        rows = self.steps_per_batch * self.num_envs

        def env_major(a: np.ndarray) -> torch.Tensor:
            # [T, K, ...] -> [K*T, ...]; the copy also frees the batch from our reused arrays.
            return torch.from_numpy(np.ascontiguousarray(a.swapaxes(0, 1)).reshape(rows, *a.shape[2:]))

        b = self._buf
        # TorchRL's layout: reward and flags of a step live under "next", shaped [N, 1].
        terminated = env_major(b["terminated"]).unsqueeze(-1)
        truncated = env_major(b["truncated"]).unsqueeze(-1)
        return TensorDict(
            {
                "observation": env_major(b["observation"]),
                "action": env_major(b["action"]),
                "next": {
                    "observation": env_major(b["next_observation"]),
                    "reward": env_major(b["reward"]).unsqueeze(-1),
                    "terminated": terminated,
                    "truncated": truncated,
                    "done": terminated | truncated,
                },
                "episode_id": env_major(b["episode_id"]),
                "step": env_major(b["step"]),
                "collector_id": torch.full((rows,), self.collector_id, dtype=torch.int64),
                "policy_version": torch.full((rows,), self.policy_version, dtype=torch.int64),
            },
            batch_size=[rows],
        )

    def send(self, td: TensorDict) -> float:
        """``sink.extend(td)``, timed; counts the batch once the sink accepted it.

        May run on a second thread while ``collect_batch`` runs (the actor overlaps them):
        it touches only ``send_time_s`` and ``batches``. Returns the seconds it took.
        """
        t0 = time.perf_counter()
        self.sink.extend(td)
        elapsed = time.perf_counter() - t0
        self.send_time_s += elapsed
        self.batches += 1
        return elapsed

    def run_batch(self) -> int:
        """Collect one batch and ``sink.extend`` it; returns the rows sent."""
        td = self.collect_batch()
        self.send(td)
        return td.shape[0]

    def stats(self) -> dict[str, Any]:
        """Counters since this incarnation started; ``frames`` includes ``start_frames``."""
        return {
            "collector_id": self.collector_id,
            "incarnation": self.incarnation,
            "frames": self.frames,
            "batches": self.batches,
            "episodes": self.episodes,
            "policy_version": self.policy_version,
            "epsilon": self.explorer.epsilon(self.frames),
            "env_time_s": self.env_time_s,
            "policy_time_s": self.policy_time_s,
            "send_time_s": self.send_time_s,
            "recent_returns": list(self.recent_returns),
            "recent_lengths": list(self.recent_lengths),
        }

    def close(self) -> None:
        """Close the vector env (ends an async env's subprocesses). Idempotent."""
        self.venv.close()
