"""DQN loss: exact TD targets (double / vanilla, terminated / truncated, n-step), target
updates, bad arguments, and learning a known Q-function from a real ReplayBuffer."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from rlfleet.launch.learners.dqn import DQNLoss


def linear_q(weight: list[list[float]]) -> nn.Linear:
    """``q = obs @ weight.T``: Q-values a test can compute by hand."""
    net = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor(weight))
    return net


def one_step_batch(*, terminated: bool = False, truncated: bool = False) -> TensorDict:
    done = terminated or truncated
    return TensorDict(
        {
            "observation": torch.tensor([[3.0, 4.0]]),
            "action": torch.tensor([0]),
            ("next", "observation"): torch.tensor([[1.0, 2.0]]),
            ("next", "reward"): torch.tensor([[1.0]]),
            ("next", "terminated"): torch.tensor([[terminated]]),
            ("next", "truncated"): torch.tensor([[truncated]]),
            ("next", "done"): torch.tensor([[done]]),
        },
        [1],
    )


def make_loss(**kwargs) -> DQNLoss:
    loss = DQNLoss(linear_q([[1.0, 0.0], [0.0, 1.0]]), gamma=0.5, **kwargs)
    with torch.no_grad():
        loss.target.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 1.0]]))
    return loss


# next obs [1, 2]: online q = [1, 2] picks action 1; target q = [5, 2].
# double: 1 + 0.5 * 2 = 2; vanilla: 1 + 0.5 * 5 = 3.5. The prediction is q(obs)[0] = 3.
@pytest.mark.parametrize(
    ("double_dqn", "terminated", "truncated", "target"),
    [
        pytest.param(True, False, False, 2.0, id="double"),
        pytest.param(False, False, False, 3.5, id="vanilla"),
        pytest.param(True, True, False, 1.0, id="terminated-no-bootstrap"),
        pytest.param(True, False, True, 2.0, id="truncated-bootstraps"),
    ],
)
def test_one_step_target(double_dqn: bool, terminated: bool, truncated: bool, target: float) -> None:
    loss = make_loss(double_dqn=double_dqn)
    out = loss(one_step_batch(terminated=terminated, truncated=truncated))
    assert out.td_error.tolist() == [target - 3.0]
    expected = torch.nn.functional.huber_loss(torch.tensor([3.0]), torch.tensor([target]))
    assert torch.allclose(out.loss, expected)
    assert out.metrics["q_mean"] == 3.0
    assert out.metrics["target_mean"] == target


def test_importance_weights_scale_loss() -> None:
    loss = make_loss()
    batch = one_step_batch()
    plain = loss(batch).loss
    batch["weight"] = torch.tensor([0.25])
    assert torch.allclose(loss(batch).loss, plain * 0.25)


def test_n_step_target() -> None:
    # Three sequences of 3 rows, gamma 0.5, rewards [1, 2, 4]; next obs of every row is
    # [1, 2] (double value 2). Row 0 of each is obs [3, 4], action 0 (prediction 3).
    def seq(done_at: int | None, terminated: bool) -> dict:
        done = torch.zeros(3, dtype=torch.bool)
        term = torch.zeros(3, dtype=torch.bool)
        if done_at is not None:
            done[done_at] = True
            term[done_at] = terminated
        return {
            "observation": torch.tensor([[3.0, 4.0]] * 3),
            "action": torch.tensor([0, 1, 1]),
            ("next", "observation"): torch.tensor([[1.0, 2.0]] * 3),
            ("next", "reward"): torch.tensor([[1.0], [2.0], [4.0]]),
            ("next", "terminated"): term.unsqueeze(-1),
            ("next", "truncated"): (done & ~term).unsqueeze(-1),
            ("next", "done"): done.unsqueeze(-1),
        }

    rows = [seq(None, False), seq(1, True), seq(0, False)]
    batch = TensorDict({k: torch.stack([r[k] for r in rows]) for k in rows[0]}, [3, 3])
    loss = make_loss(n_step=3)
    out = loss(batch)
    expected = [
        1 + 0.5 * 2 + 0.25 * 4 + 0.125 * 2,  # no done: 3 rewards + gamma^3 bootstrap
        1 + 0.5 * 2,  # terminated at row 1: 2 rewards, no bootstrap
        1 + 0.5 * 2,  # truncated at row 0: 1 reward + gamma^1 bootstrap
    ]
    assert torch.allclose(out.td_error, torch.tensor(expected) - 3.0)


def test_hard_target_update_period() -> None:
    loss = make_loss(target_update_every=3)
    loss.after_step(1)
    loss.after_step(2)
    assert not torch.equal(loss.target.weight, loss.online.weight)
    loss.after_step(3)
    assert torch.equal(loss.target.weight, loss.online.weight)


def test_soft_target_update() -> None:
    loss = make_loss(target_update_every=0, tau=0.25)
    loss.after_step(1)
    # 0.75 * target + 0.25 * online
    assert torch.allclose(loss.target.weight, torch.tensor([[4.0, 0.0], [0.0, 1.0]]))


def test_update_steps_optimizer_and_target() -> None:
    loss = make_loss(target_update_every=1, lr=0.1)
    before = loss.online.weight.detach().clone()
    metrics, td_error = loss.update(one_step_batch(), step=1)
    assert not torch.equal(loss.online.weight, before)
    assert torch.equal(loss.target.weight, loss.online.weight)
    assert td_error.shape == (1,)
    assert {"loss", "q_mean", "target_mean", "grad_norm"} <= set(metrics)


def test_state_dict_keys_are_the_networks() -> None:
    loss = make_loss()
    assert sorted(loss.state_dict()) == ["online.weight", "target.weight"]
    assert list(loss.policy.state_dict()) == ["weight"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"gamma": 1.5}, r"gamma=1.5 is outside \[0, 1\]", id="gamma"),
        pytest.param({"n_step": 0}, r"n_step=0 must be >= 1", id="n_step"),
        pytest.param({"target_update_every": -1}, r"target_update_every=-1 must be >= 0", id="period"),
        pytest.param({"target_update_every": 0, "tau": 0.0}, r"tau=0.0 must be in \(0, 1\]", id="tau"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DQNLoss(linear_q([[1.0, 0.0], [0.0, 1.0]]), **kwargs)


def test_n_step_needs_sequences() -> None:
    loss = make_loss(n_step=3)
    with pytest.raises(ValueError, match=r"n_step=3 needs a \[B, n\] batch .* got batch_size \(1,\)"):
        loss(one_step_batch())
    wrong_length = TensorDict({k: v.unsqueeze(1).expand(1, 2, *v.shape[1:]) for k, v in one_step_batch().items(True, True)}, [1, 2])
    with pytest.raises(ValueError, match=r"sequences have length 2, n_step is 3"):
        loss(wrong_length)
