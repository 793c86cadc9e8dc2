"""The plain ``Learner`` on a real local ReplayBuffer (no Ray): learning a known
Q-function, priorities written back, policy lag, checkpoints, errors."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer
from rlfleet.buffer.errors import StaleIndexError
from rlfleet.buffer.indices import counter_of
from rlfleet.collector.config import PolicyConfig
from rlfleet.collector.policies import build_policy
from rlfleet.launch.learners.dqn import DQNLoss
from rlfleet.launch.learners.learner import PRIORITY_EPS, Learner

OBS_SPACE = gym.spaces.Box(-1.0, 1.0, (4,))
ACT_SPACE = gym.spaces.Discrete(2)
METRIC_KEYS = {
    "learner/steps",
    "learner/loss",
    "learner/steps_per_s",
    "learner/sample_wait_s",
    "learner/policy_version",
    "learner/policy_lag",
    "learner/q_mean",
    "learner/target_mean",
    "learner/grad_norm",
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def bandit_rows(n: int, *, policy_version: int = 0, seed: int = 0) -> TensorDict:
    """One-step episodes: action 0 pays 1, action 1 pays 0, then the episode ends."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 4, generator=g) * 2 - 1
    action = torch.randint(0, 2, (n,), generator=g)
    ones = torch.ones(n, dtype=torch.bool)
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            ("next", "observation"): obs,
            ("next", "reward"): (action == 0).float().unsqueeze(-1),
            ("next", "terminated"): ones.unsqueeze(-1),
            ("next", "truncated"): ~ones.unsqueeze(-1),
            ("next", "done"): ones.unsqueeze(-1),
            "policy_version": torch.full((n,), policy_version, dtype=torch.int64),
        },
        [n],
    )


def make_learner(source, **kwargs) -> Learner:
    net = build_policy(PolicyConfig(hidden=(32, 32)), OBS_SPACE, ACT_SPACE)
    return Learner(DQNLoss(net, lr=kwargs.pop("lr", 3e-3)), source, **kwargs)


class RecordingSource:
    """A real buffer behind a validating recorder of what the learner asked of it."""

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self.sampled: list[torch.Tensor] = []
        self.updates: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sample(self, n: int) -> TensorDict:
        batch = self.buffer.sample(n)
        self.sampled.append(batch["index"].clone())
        return batch

    def update_priority(self, index, priority) -> int:
        assert index.shape == priority.shape, "index and priority must align"
        self.updates.append((index.clone(), priority.clone()))
        return self.buffer.update_priority(index, priority)


class RecordingAlgorithm:
    """Wraps a DQNLoss and keeps every TD error it returned."""

    def __init__(self, loss: DQNLoss) -> None:
        self.loss = loss
        self.td_errors: list[torch.Tensor] = []
        self.policy = loss.policy

    def __getattr__(self, name):
        return getattr(self.loss, name)

    def update(self, batch, step):
        metrics, td = self.loss.update(batch, step)
        self.td_errors.append(td.clone())
        return metrics, td


def test_learns_bandit_q_values(tmp_path: Path) -> None:
    with ReplayBuffer.create(tmp_path / "rb", capacity=1000, seed=0) as rb:
        rb.extend(bandit_rows(512))
        learner = make_learner(rb, batch_size=64, prefetch=2)
        try:
            metrics = learner.step(300)
        finally:
            learner.close()
    assert set(metrics) == METRIC_KEYS
    assert metrics["learner/steps"] == 300.0
    with torch.no_grad():
        q = learner.algorithm.policy(bandit_rows(256, seed=1)["observation"])
    assert (q[:, 0] - 1.0).abs().max() < 0.15
    assert q[:, 1].abs().max() < 0.15


def test_priorities_written_back(tmp_path: Path) -> None:
    sampler = {"type": "prioritized", "alpha": 0.6, "beta": 0.4}
    with ReplayBuffer.create(tmp_path / "rb", capacity=100, sampler=sampler, seed=0) as rb:
        rb.extend(bandit_rows(64))
        source = RecordingSource(rb)
        net = build_policy(PolicyConfig(hidden=(8,)), OBS_SPACE, ACT_SPACE)
        algorithm = RecordingAlgorithm(DQNLoss(net))
        learner = Learner(algorithm, source, batch_size=16, prefetch=0)
        metrics = learner.step(3)
        assert len(source.updates) == 3
        assert metrics["learner/priority_updates_skipped"] == 0.0
        assert metrics["learner/priority_stored_fraction"] == 1.0
        for sampled, (index, priority), td in zip(source.sampled, source.updates, algorithm.td_errors, strict=True):
            assert torch.equal(index, sampled)
            assert torch.equal(priority, td.abs().double() + PRIORITY_EPS)
        # The buffer took them: its mass is sum(p ** alpha) over rows, the new ones included.
        assert rb.priority_mass != pytest.approx(64.0)


class OverwritingSource(RecordingSource):
    """Writes ``rows_after_sample`` new rows right after each sample, so that some of
    the sampled rows are overwritten before their priorities come back."""

    def __init__(self, buffer: ReplayBuffer, rows_after_sample: int) -> None:
        super().__init__(buffer)
        self.rows_after_sample = rows_after_sample
        self.expected_skips: list[int] = []

    def sample(self, n: int) -> TensorDict:
        batch = super().sample(n)
        self.buffer.extend(bandit_rows(self.rows_after_sample, seed=len(self.sampled)))
        oldest_live = self.buffer.total_inserted - len(self.buffer)
        self.expected_skips.append(int((counter_of(batch["index"].numpy()) < oldest_live).sum()))
        return batch


def test_priority_updates_of_overwritten_rows_are_counted(tmp_path: Path) -> None:
    sampler = {"type": "prioritized", "alpha": 0.6, "beta": 0.4}
    with ReplayBuffer.create(tmp_path / "rb", capacity=64, sampler=sampler, seed=0) as rb:
        rb.extend(bandit_rows(64))
        source = OverwritingSource(rb, rows_after_sample=24)
        learner = make_learner(source, batch_size=16, prefetch=0)
        first = learner.step(2)
        second = learner.step(3)
    skips = source.expected_skips
    assert len(skips) == 5 and sum(skips) > 0 and sum(skips) < 5 * 16  # some, not all
    assert learner.priority_updates == 5 * 16
    assert learner.priority_updates_skipped == sum(skips)
    # cumulative since the rank started, not per step() call
    assert first["learner/priority_updates_skipped"] == float(sum(skips[:2]))
    assert first["learner/priority_stored_fraction"] == (32 - sum(skips[:2])) / 32
    assert second["learner/priority_updates_skipped"] == float(sum(skips))
    assert second["learner/priority_stored_fraction"] == (80 - sum(skips)) / 80


def test_priority_update_to_another_buffer_raises(tmp_path: Path) -> None:
    """An index the buffer never issued is a bug: StaleIndexError reaches the caller."""
    sampler = {"type": "prioritized", "alpha": 0.6, "beta": 0.4}
    with ReplayBuffer.create(tmp_path / "a", capacity=64, sampler=sampler, seed=0) as a, \
            ReplayBuffer.create(tmp_path / "b", capacity=64, sampler=sampler, seed=0) as b:
        a.extend(bandit_rows(64))
        b.extend(bandit_rows(64))  # same rows, same positions: only the index tag differs

        class WrongBuffer:
            def sample(self, n: int) -> TensorDict:
                return a.sample(n)

            def update_priority(self, index, priority) -> int:
                return b.update_priority(index, priority)

        learner = make_learner(WrongBuffer(), batch_size=8, prefetch=0)
        with pytest.raises(StaleIndexError, match=r"update_priority: index\[0\]=\d+ belongs to another buffer"):
            learner.step(1)
    assert learner.priority_updates == 0


def test_uniform_buffer_gets_no_priorities(tmp_path: Path) -> None:
    with ReplayBuffer.create(tmp_path / "rb", capacity=100, seed=0) as rb:
        rb.extend(bandit_rows(64))
        source = RecordingSource(rb)
        learner = make_learner(source, batch_size=16, prefetch=0)
        learner.step(4)
    assert len(source.sampled) == 4
    assert source.updates == []


def test_policy_lag_counts_learner_steps(tmp_path: Path) -> None:
    with ReplayBuffer.create(tmp_path / "rb", capacity=100, seed=0) as rb:
        rb.extend(bandit_rows(64, policy_version=0))
        learner = make_learner(rb, batch_size=8, prefetch=0)

        def publish_every_5(steps: int) -> None:
            if steps % 5 == 0:
                learner.mark_published()

        metrics = learner.step(10, after_step=publish_every_5)
    # Steps 1-5 sample under version 0 (lag 0), steps 6-10 under version 5 (lag 5).
    assert metrics["learner/policy_lag"] == 2.5
    assert metrics["learner/policy_version"] == 10.0


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    batch = bandit_rows(32)

    class FixedBatch:
        def sample(self, n: int) -> TensorDict:
            assert n == 32
            return batch.clone()

        def update_priority(self, index, priority) -> int:
            raise AssertionError("a uniform batch carries no weights: no priority updates")

    first = make_learner(FixedBatch(), batch_size=32, prefetch=0)
    first.step(5)
    first.mark_published()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    second = make_learner(FixedBatch(), batch_size=32, prefetch=0)
    second.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert second.steps == 5 and second.policy_version == 5
    first.step(3)
    second.step(3)
    for (k, a), (_, b) in zip(first.algorithm.state_dict().items(), second.algorithm.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_sample_errors_reach_the_caller(tmp_path: Path) -> None:
    with ReplayBuffer.create(tmp_path / "rb", capacity=10, seed=0) as rb:
        learner = make_learner(rb, batch_size=4, prefetch=2)
        try:
            with pytest.raises(ValueError, match="the buffer is empty"):
                learner.step(1)
        finally:
            learner.close()


class SamplerSource(RecordingSource):
    """A source that fetches ahead itself, as ``BufferClient.sampler`` does: records
    each ``sampler`` call and whether its generator was closed."""

    def __init__(self, buffer: ReplayBuffer) -> None:
        super().__init__(buffer)
        self.sampler_calls: list[tuple[int, int]] = []
        self.closed = 0

    def sampler(self, n: int, *, prefetch: int = 2):
        self.sampler_calls.append((n, prefetch))
        try:
            while True:
                yield self.sample(n)
        finally:
            self.closed += 1


def test_reads_through_the_sources_sampler(tmp_path: Path) -> None:
    with ReplayBuffer.create(tmp_path / "rb", capacity=100, seed=0) as rb:
        source = SamplerSource(rb)
        learner = make_learner(source, batch_size=8, prefetch=3)
        # A failing sampler's error reaches the caller; the next call starts a new one.
        with pytest.raises(ValueError, match="the buffer is empty"):
            learner.step(1)
        assert source.sampler_calls == [(8, 3)] and source.closed == 1
        rb.extend(bandit_rows(64))
        learner.step(4)
        learner.step(2)
        assert source.sampler_calls == [(8, 3), (8, 3)]  # one sampler across step calls
        assert len(source.sampled) == 6
        learner.close()
    assert source.closed == 2


def test_n_step_with_sequence_sampler(tmp_path: Path) -> None:
    # Two 6-step episodes, rewards 1 per step, the second ends terminated.
    n = 12
    episode = torch.arange(n) // 6
    step = torch.arange(n) % 6
    terminated = step == 5
    obs = torch.rand(n, 4)
    rows = TensorDict(
        {
            "observation": obs,
            "action": torch.zeros(n, dtype=torch.int64),
            ("next", "observation"): obs,
            ("next", "reward"): torch.ones(n, 1),
            ("next", "terminated"): terminated.unsqueeze(-1),
            ("next", "truncated"): torch.zeros(n, 1, dtype=torch.bool),
            ("next", "done"): terminated.unsqueeze(-1),
            "episode_id": episode,
            "step": step,
            "policy_version": torch.zeros(n, dtype=torch.int64),
        },
        [n],
    )
    with ReplayBuffer.create(tmp_path / "rb", capacity=100, sampler={"type": "sequence", "length": 3}, seed=0) as rb:
        rb.extend(rows)
        net = build_policy(PolicyConfig(hidden=(8,)), OBS_SPACE, ACT_SPACE)
        learner = Learner(DQNLoss(net, n_step=3), rb, batch_size=4, prefetch=0)
        metrics = learner.step(2)
    assert metrics["learner/steps"] == 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"batch_size": 0}, r"batch_size=0 must be >= 1", id="batch_size"),
        pytest.param({"prefetch": -1}, r"prefetch=-1 must be >= 0", id="prefetch"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with ReplayBuffer.create(tmp_path / "rb", capacity=10) as rb:
        with pytest.raises(ValueError, match=match):
            make_learner(rb, **kwargs)


def test_bad_step_count(tmp_path: Path) -> None:
    with ReplayBuffer.create(tmp_path / "rb", capacity=10) as rb:
        learner = make_learner(rb)
        with pytest.raises(ValueError, match=r"num_steps=0 must be >= 1"):
            learner.step(0)
