"""TorchRL interop: a batch sampled from a buffer that ``rlfleet run`` filled feeds
TorchRL's ``DQNLoss``, ``SACLoss`` and TD(0) value estimator as it comes, no renaming.

Rows are in TorchRL's layout (buffer format 2, DESIGN.md "Data"), so TorchRL finds
``("next", "reward")``, ``("next", "terminated")`` and ``("next", "done")`` where it
looks. rlfleet stores Discrete actions as int64 indices ``[N]``, so the DQN side uses
TorchRL's ``action_space="categorical"`` (not its default one-hot).

Needs the ``[torchrl]`` extra, which lives in its own venv (TorchRL 0.14 pins
``tensordict<0.15``): without torchrl the whole module is skipped, and CI's torchrl
step first checks that it imports, so it cannot pass by skipping. Each run is a real
``rlfleet run`` in this process, on the session's local Ray cluster, a few hundred frames
long.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torch import nn

from rlfleet.buffer import ReplayBuffer
from rlfleet.launch import load_config, run

torchrl = pytest.importorskip("torchrl")

from tensordict.nn import NormalParamExtractor, TensorDictModule  # noqa: E402
from torchrl.data import Bounded, Categorical  # noqa: E402
from torchrl.modules import MLP, ProbabilisticActor, QValueActor, TanhNormal, ValueOperator  # noqa: E402
from torchrl.objectives import DQNLoss, SACLoss  # noqa: E402
from torchrl.objectives.value import TD0Estimator  # noqa: E402

# The losses are built without a target-network updater: nothing here trains for long.
pytestmark = pytest.mark.filterwarnings("ignore:No target network updater:UserWarning")

ROOT = Path(__file__).resolve().parent.parent
BATCH = 256


def _layout(obs_shape: tuple[int, ...], action: tuple[tuple[int, ...], str]) -> dict:
    """A format-2 buffer schema: ``{key: (per-row shape, dtype)}``."""
    schema = {
        ("observation",): (obs_shape, "float32"),
        ("action",): action,
        ("next", "observation"): (obs_shape, "float32"),
        ("next", "reward"): ((1,), "float32"),
        ("next", "terminated"): ((1,), "bool"),
        ("next", "truncated"): ((1,), "bool"),
        ("next", "done"): ((1,), "bool"),
    }
    for key in ("episode_id", "step", "collector_id", "policy_version"):
        schema[(key,)] = ((), "int64")
    return {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in schema.items()}


def _run_and_sample(root: Path, config_file: str, overrides: list[str],
                    expected_schema: dict) -> tuple[TensorDict, TensorDict]:
    """Run ``configs/<config_file>`` with ``overrides``, check the layout of the buffer
    it left; return a sample of ``BATCH`` rows of it and all its committed rows."""
    config = load_config(ROOT / "configs" / config_file, [f"run.dir={root}", *overrides])
    result = run(config)
    assert result.stop_reason == "total_frames", result
    with ReplayBuffer.open(result.run_dir / "buffer" / "shard-0", seed=0) as rb:
        schema = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in rb.schema.items()}
        assert schema == expected_schema
        assert len(rb) >= config.run.total_frames
        batch = rb.sample(BATCH)
        rows = rb[:]
    assert batch.batch_size == torch.Size([BATCH])
    return batch, rows


@pytest.fixture(scope="module")
def cartpole_run(ray_cluster, tmp_path_factory) -> tuple[TensorDict, TensorDict]:
    """A tiny CartPole DQN run (512 frames, all random actions): a sample and all rows."""
    return _run_and_sample(tmp_path_factory.mktemp("dqn"), "smoke.yaml", [
        "run.total_frames=512", "collector.init_random_frames=512",
        "buffer.rate_limiter.min_size_to_sample=256", "policy.hidden=[16]",
    ], _layout((4,), ((), "int64")))


@pytest.fixture(scope="module")
def cartpole_batch(cartpole_run: tuple[TensorDict, TensorDict]) -> TensorDict:
    return cartpole_run[0]


@pytest.fixture(scope="module")
def cartpole_rows(cartpole_run: tuple[TensorDict, TensorDict]) -> TensorDict:
    return cartpole_run[1]


@pytest.fixture(scope="module")
def pendulum_batch(ray_cluster, tmp_path_factory) -> TensorDict:
    """A tiny Pendulum SAC run (400 frames), then one sample of it."""
    return _run_and_sample(tmp_path_factory.mktemp("sac"), "pendulum_sac.yaml", [
        "run.total_frames=400", "collector.frames_per_batch=200", "collector.init_random_frames=200",
        "buffer.rate_limiter.min_size_to_sample=200", "policy.hidden=[16]", "learner.batch_size=32",
        "run.learner_steps_per_frame=0.1", "run.target_return=null",
    ], _layout((3,), ((1,), "float32")))[0]


def _grads_finite(module: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.isfinite(g).all() for g in grads.values())
    return grads


def test_cartpole_batch_feeds_torchrl_dqn_loss(cartpole_batch: TensorDict) -> None:
    batch = cartpole_batch.clone()
    # the batch holds episode ends, so the no-bootstrap branch of the target is exercised
    assert batch["next", "terminated"].any() and (~batch["next", "terminated"]).any()
    torch.manual_seed(0)
    net = MLP(in_features=4, out_features=2, num_cells=[32])
    actor = QValueActor(net, in_keys=["observation"], spec=Categorical(2), action_space="categorical")
    loss_module = DQNLoss(actor, action_space="categorical", delay_value=True)
    loss = loss_module(batch)["loss"]
    assert loss.shape == () and torch.isfinite(loss)
    # TorchRL's DQN with its default TD(0), gamma 0.99 and a target equal to the online
    # net (no update yet): r + gamma * (1 - terminated) * max_a Q(s', a), L2 loss.
    with torch.no_grad():
        obs, action = cartpole_batch["observation"], cartpole_batch["action"]
        q = net(obs).gather(1, action.unsqueeze(1)).squeeze(1)
        reward = cartpole_batch["next", "reward"][:, 0]
        alive = (~cartpole_batch["next", "terminated"][:, 0]).float()
        target = reward + 0.99 * alive * net(cartpole_batch["next", "observation"]).max(-1).values
        expected = ((q - target) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    grads = _grads_finite(loss_module)
    assert any(bool((g != 0).any()) for g in grads.values())
    # TorchRL wrote its priorities next to rlfleet's index: one per row, ready to send back.
    assert batch["td_error"].shape == (BATCH, 1)
    assert torch.equal(batch["index"], cartpole_batch["index"])


def test_cartpole_batch_feeds_torchrl_td0_estimator(cartpole_batch: TensorDict) -> None:
    batch = cartpole_batch.clone()
    torch.manual_seed(0)
    value = ValueOperator(MLP(in_features=4, out_features=1, num_cells=[16]), in_keys=["observation"])
    estimator = TD0Estimator(gamma=0.9, value_network=value)
    estimator(batch)
    with torch.no_grad():
        alive = (~batch["next", "terminated"]).float()
        expected = batch["next", "reward"] + 0.9 * alive * value.module(batch["next", "observation"])
        torch.testing.assert_close(batch["value_target"], expected)
        torch.testing.assert_close(batch["advantage"], expected - value.module(batch["observation"]))
    assert batch["value_target"].shape == (BATCH, 1)


def test_pendulum_batch_feeds_torchrl_sac_loss(pendulum_batch: TensorDict) -> None:
    batch = pendulum_batch.clone()
    assert batch["action"].shape == (BATCH, 1) and (batch["action"].abs() <= 2.0).all()
    torch.manual_seed(0)
    actor_net = nn.Sequential(MLP(in_features=3, out_features=2, num_cells=[32]), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        spec=Bounded(-2.0, 2.0, (1,)),
        distribution_class=TanhNormal,
        distribution_kwargs={"low": -2.0, "high": 2.0},
    )
    critic = ValueOperator(MLP(in_features=4, out_features=1, num_cells=[32]), in_keys=["observation", "action"])
    loss_module = SACLoss(actor_network=actor, qvalue_network=critic, num_qvalue_nets=2)
    out = loss_module(batch)
    parts = {k: out[k] for k in ("loss_actor", "loss_qvalue", "loss_alpha")}
    for name, value in parts.items():
        assert value.shape == () and torch.isfinite(value), name
    sum(parts.values()).backward()
    grads = _grads_finite(loss_module)
    prefixes = {name.split(".")[0] for name, g in grads.items() if (g != 0).any()}
    assert prefixes == {"log_alpha", "actor_network_params", "qvalue_network_params"}


def test_the_readme_torchrl_block_trains_on_a_prioritized_buffer(cartpole_rows: TensorDict, tmp_path: Path) -> None:
    """README's TorchRL block, run as written on a prioritized buffer holding the rows of
    an ``rlfleet run``: TorchRL weighs the loss by rlfleet's ``weight`` and its ``td_error``
    goes back as priorities."""
    import re

    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme:torchrl -->\n```python\n(.*?)^```\n", readme, re.M | re.S)
    assert match, "README.md has no block after <!-- readme:torchrl -->"
    with ReplayBuffer.create(tmp_path / "prio", capacity=4096, seed=0,
                             sampler={"type": "prioritized", "alpha": 0.6, "beta": 0.4}) as rb:
        rb.extend(cartpole_rows)
        torch.manual_seed(0)
        namespace = {"rb": rb}
        exec(compile(match.group(1), "README.md torchrl block", "exec"), namespace)
        batch, loss = namespace["batch"], namespace["loss"]
        assert namespace["skipped"] == 0
        assert rb.stats()["priority_updates"] == BATCH
        slots = (batch["index"].numpy() & ((1 << 44) - 1)) % rb.capacity
        stored = np.fromfile(tmp_path / "prio" / "priorities.bin", dtype=np.float64)[slots]
        np.testing.assert_allclose(stored, batch["td_error"][:, 0].detach().numpy(), rtol=1e-6)
        # the next batch is drawn by those priorities: TorchRL weighs its loss by them
        batch = rb.sample(BATCH)
        assert not torch.allclose(batch["weight"], torch.ones(BATCH))
        weighted = loss(batch.clone())["loss"]
        loss.set_keys(priority_weight="no_such_key")
        unweighted = loss(batch.clone())["loss"]
        assert not torch.allclose(weighted, unweighted)
