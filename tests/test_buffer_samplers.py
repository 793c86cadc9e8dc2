"""Samplers on real buffers: prioritized frequencies, epochs, episode sequences, sum-tree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer, SchemaMismatch, StaleIndexError
from rlfleet.buffer.indices import counter_of, with_tag
from rlfleet.buffer.samplers import uniform_indices
from rlfleet.buffer.sampling import check_sampler
from rlfleet.buffer.sumtree import SumTree


def ix(rb: ReplayBuffer, rows) -> np.ndarray:
    """The indices ``rb`` hands out for row counters ``rows``."""
    return with_tag(np.asarray(rows, dtype=np.int64), rb.index_tag)


def ctr(index) -> np.ndarray:
    return counter_of(np.asarray(index))

# chi-square critical values at p = 0.001
CHI2_999 = {4: 18.47, 9: 27.88}


def rows(first: int, n: int) -> TensorDict:
    ids = torch.arange(first, first + n)
    return TensorDict({"x": ids.clone(), "obs": ids[:, None].float().expand(n, 2).clone()}, batch_size=[n])


def episodes(lengths: list[int], first_row: int = 0, first_episode: int = 0) -> TensorDict:
    """Env-major rows: episode k has lengths[k] steps 0..len-1; ``x`` is the row number."""
    ep = torch.cat([torch.full((n,), first_episode + k, dtype=torch.int64) for k, n in enumerate(lengths)])
    step = torch.cat([torch.arange(n) for n in lengths])
    x = torch.arange(first_row, first_row + len(ep))
    return TensorDict({"episode_id": ep, "step": step, "x": x}, batch_size=[len(ep)])


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_prioritized_frequencies_match_priorities(tmp_path):
    alpha = 0.7
    with ReplayBuffer.create(tmp_path / "b", capacity=8, sampler={"type": "prioritized", "alpha": alpha, "beta": 0.5}, seed=7) as rb:
        rb.extend(rows(0, 6))
        prio = np.array([1.0, 2.0, 3.0, 4.0, 0.0, 6.0])
        rb.update_priority(torch.from_numpy(ix(rb, range(6))), torch.tensor(prio))
        batch = rb.sample_arrays(40_000)
        counts = np.bincount(ctr(batch[("index",)]), minlength=6)
        assert counts[4] == 0  # priority 0: never drawn
        live = prio != 0
        probs = prio[live] ** alpha / (prio[live] ** alpha).sum()
        assert chi_square(counts[live], probs) < CHI2_999[4]
        assert np.array_equal(batch[("x",)], ctr(batch[("index",)]))
        # weights: (N * P(i)) ** -beta over the batch max, N = 6 live rows
        p_i = prio ** alpha / (prio ** alpha).sum()
        raw = (6 * p_i[ctr(batch[("index",)])]) ** -0.5
        np.testing.assert_allclose(batch[("weight",)], raw / raw.max(), rtol=1e-6)
        assert batch[("weight",)].dtype == np.float32
        assert rb.priority_mass == pytest.approx((prio ** alpha).sum(), rel=1e-12)
        # what a shard returns: the rows' sampling masses p**alpha, no weights
        out, mass = rb.draw_arrays(10)
        assert ("weight",) not in out
        np.testing.assert_allclose(mass, prio[ctr(out[("index",)])] ** alpha, rtol=1e-12)
        td = rb.sample(64)
        assert td["weight"].dtype == torch.float32 and float(td["weight"].max()) == 1.0


def test_prioritized_new_rows_at_max_priority_and_reopen(tmp_path):
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=10, sampler={"type": "prioritized", "alpha": 1.0, "beta": 0.4}, seed=0) as rb:
        rb.extend(rows(0, 4))
        rb.update_priority(ix(rb, range(4)), np.array([1.0, 1.0, 9.0, 1.0]))
        rb.extend(rows(4, 2))  # enter at the max priority seen: 9
        assert rb.priority_mass == pytest.approx(1 + 1 + 9 + 1 + 9 + 9)
        rb.extend(rows(6, 8))  # wraps: rows 0..3 overwritten, their priority leaves the mass
        assert len(rb) == 10
        assert rb.priority_mass == pytest.approx(9 * 10)
        assert rb.update_priority(ix(rb, [4, 13, 3]), [2.0, 0.5, 7.0]) == 1  # row 3 was overwritten
        mass = rb.priority_mass
    with ReplayBuffer.open(path, seed=1) as rb:
        assert rb.sampler_type == "prioritized"
        assert rb.priority_mass == pytest.approx(mass)
        counts = np.bincount(ctr(rb.sample_arrays(30_000)[("index",)]) - 4, minlength=10)
        probs = np.array([2.0] + [9.0] * 8 + [0.5])
        assert chi_square(counts, probs / probs.sum()) < CHI2_999[9]
        rb.extend(rows(14, 1))  # max priority survives reopen
        assert rb.priority_mass == pytest.approx(mass - 2.0 + 9.0)  # row 4 (2.0) evicted, row 14 at 9


# bad priority updates (every refusal, with its message): tests/test_buffer_priorities.py


def test_update_priority_on_uniform_validates_then_ignores(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=10) as rb:
        rb.extend(rows(0, 5))
        assert rb.update_priority(ix(rb, [0, 1]), [3.0, 4.0]) == 0
        assert rb.priority_mass == 5
        with pytest.raises(StaleIndexError, match=r"names row 7, which was never written"):
            rb.update_priority(ix(rb, [7]), [1.0])


def test_all_zero_priorities_cannot_be_sampled(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=10, sampler="prioritized") as rb:
        rb.extend(rows(0, 3))
        rb.update_priority(ix(rb, [0, 1, 2]), [0.0, 0.0, 0.0])
        with pytest.raises(ValueError, match=r"every live row has priority 0"):
            rb.sample(2)


def test_without_replacement_returns_each_row_once_per_epoch(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=100, sampler="without_replacement", seed=5) as rb:
        rb.extend(rows(0, 60))
        for _ in range(3):  # three epochs of 60 rows in batches of 12
            seen = np.concatenate([ctr(rb.sample(12)["index"]) for _ in range(5)])
            assert sorted(seen.tolist()) == list(range(60))
        with pytest.raises(ValueError, match=r"n=61 is above the 60 rows left to draw without replacement"):
            rb.sample(61)


def test_without_replacement_skips_overwritten_rows(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=20, sampler="without_replacement", seed=2) as rb:
        rb.extend(rows(0, 20))
        first = ctr(rb.sample(5)["index"]).tolist()
        rb.extend(rows(20, 10))  # rows 0..9 leave; rows 20..29 join the next epoch
        rest = ctr(rb.sample(5)["index"]).tolist()  # at least 5 of rows 10..19 are left this epoch
        assert all(10 <= i < 20 for i in rest) and not set(rest) & set(first)
        assert len(set(rest)) == 5


def test_sequences_stay_inside_one_episode(tmp_path):
    rng = np.random.default_rng(0)
    length = 5
    with ReplayBuffer.create(tmp_path / "b", capacity=500, sampler={"type": "sequence", "length": length}, seed=3) as rb:
        row, episode = 0, 0
        for _ in range(12):  # wraps the ring several times
            lengths = rng.integers(1, 12, size=10).tolist()
            rb.extend(episodes(lengths, row, episode))
            row += sum(lengths)
            episode += len(lengths)
            batch = rb.sample(200)
            assert batch.batch_size == torch.Size([200, length])
            ep, step, idx = batch["episode_id"], batch["step"], torch.from_numpy(ctr(batch["index"]))
            assert (ep == ep[:, :1]).all()
            assert (step.diff(dim=1) == 1).all()
            assert (idx.diff(dim=1) == 1).all()
            assert torch.equal(batch["x"], idx)
            # inside the live window: never across the write cursor or overwritten rows
            assert int(idx.min()) >= rb.total_inserted - len(rb)
            assert int(idx.max()) < rb.total_inserted


def accepted(idx: np.ndarray, read) -> np.ndarray:
    """The rule, in numpy: a slice ``[n, L]`` is kept when its rows share one episode and
    ``step`` rises by exactly 1 along it."""
    episode, step = read(("episode_id",), idx), read(("step",), idx)
    return (episode == episode[:, :1]).all(axis=1) & (np.diff(step, axis=1) == 1).all(axis=1)


def test_the_compiled_sequence_check_keeps_exactly_the_valid_slices(tmp_path):
    """The numba slice picker keeps, in order, every start of a wrapped ring whose slice
    passes the rule, including slices across the ring's end and across a step hole."""
    length, capacity = 4, 97
    rng = np.random.default_rng(5)
    with ReplayBuffer.create(tmp_path / "b", capacity=capacity, sampler={"type": "sequence", "length": length}) as rb:
        row, episode = 0, 0
        lap_end = 3 * capacity  # global row 291 sits in slot 0: the ring's end is between
        while row < lap_end + 30:
            lengths = rng.integers(1, 14, size=6).tolist()
            if row < lap_end - 10 <= row + sum(lengths):
                lengths = [lap_end - 10 - row, 25, 12]  # an episode across the ring's end
            batch = episodes(lengths, row, episode)
            if lengths[-1] == 12 and len(lengths) == 3:
                batch["step"][-5:] += 1  # a hole: steps 0 .. 6, 8 .. 12 of one episode
            rb.extend(batch)
            row += len(batch)
            episode += len(lengths)
        sampler = rb._sampler
        start = rb.total_inserted - len(rb)
        idx = np.arange(start, rb.total_inserted - length + 1)[:, None] + np.arange(length)
        by_numpy = idx[accepted(idx, rb._reader.read_column)]
        compiled = sampler.keep(idx, len(idx), rb._reader.read_column)
        assert np.array_equal(compiled, by_numpy)
        assert 0 < len(compiled) < len(idx)
        hole_first = lap_end + 15 + 7  # the row after step 6 of the last episode
        assert not np.isin(np.arange(hole_first - 3, hole_first), compiled[:, 0]).any()
        assert np.isin([hole_first - 4, hole_first], compiled[:, 0]).all()
        wraps = (compiled[:, 0] % capacity) > capacity - length
        assert wraps.any(), "no kept slice crosses the ring's end: the case is not covered"
        assert np.array_equal(sampler.keep(idx, 5, rb._reader.read_column), by_numpy[:5])


def test_sequence_errors(tmp_path):
    with ReplayBuffer.create(tmp_path / "b", capacity=50, sampler={"type": "sequence", "length": 4}) as rb:
        with pytest.raises(SchemaMismatch, match=r"sampler 'sequence' needs key 'episode_id'"):
            rb.extend(rows(0, 5))
        assert rb.schema is None
        rb.extend(episodes([3]))
        with pytest.raises(ValueError, match=r"holds 3 rows, fewer than the sequence length 4"):
            rb.sample(1)
        rb.extend(episodes([2, 3], 3, 1))
        with pytest.raises(ValueError, match=r"no episode segment of 4 consecutive steps"):
            rb.sample(1)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("reservoir", r"sampler type 'reservoir' is unknown"),
        ({"type": "prioritized", "gamma": 1}, r"sampler 'prioritized' has no parameter 'gamma'"),
        ({"type": "prioritized", "alpha": -1}, r"sampler alpha=-1: must be a finite number >= 0"),
        ({"type": "prioritized", "beta": float("nan")}, r"sampler beta=nan"),
        ({"type": "sequence", "length": 0}, r"sampler length=0: must be an integer >= 1"),
        ({"type": "uniform", "length": 3}, r"sampler 'uniform' has no parameter 'length'"),
        (3, r"sampler=3: expected a name"),
    ],
)
def test_bad_sampler_specs(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        ReplayBuffer.create(tmp_path / "b", capacity=10, sampler=spec)


def test_sampler_spec_defaults_are_stored():
    assert check_sampler("prioritized") == {"type": "prioritized", "alpha": 0.6, "beta": 0.4}
    assert check_sampler({"type": "sequence"}) == {"type": "sequence", "length": 8}
    assert check_sampler({"type": "uniform"}) == {"type": "uniform"}
    assert check_sampler({"type": "prioritized", "alpha": 1}) == {"type": "prioritized", "alpha": 1.0, "beta": 0.4}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("reservoir", "sampler type 'reservoir' is unknown; choose one of uniform, without_replacement, "
                      "prioritized, sequence"),
        ({"type": "prioritized", "gamma": 1}, "sampler 'prioritized' has no parameter 'gamma'; it takes "
                                              "['alpha', 'beta']"),
        ({"type": "prioritized", "alpha": -1}, "sampler alpha=-1: must be a finite number >= 0 (default 0.6)"),
        ({"type": "prioritized", "beta": True}, "sampler beta=True: must be a finite number >= 0 (default 0.4)"),
        ({"type": "sequence", "length": 2.0}, "sampler length=2.0: must be an integer >= 1 (rows per slice; "
                                              "default 8)"),
        ({"alpha": 0.5}, "sampler type None is unknown; choose one of uniform, without_replacement, "
                         "prioritized, sequence"),
    ],
)
def test_check_sampler_names_the_key_the_value_and_the_range(spec, message):
    with pytest.raises(ValueError) as info:
        check_sampler(spec)
    assert str(info.value) == message


@pytest.mark.parametrize("size", [1, 7, 16, 17, 256, 257, 1000, 70_000])
def test_sumtree_find_matches_cumsum(size):
    rng = np.random.default_rng(size)
    tree = SumTree(size)
    values = rng.random(size) * (rng.random(size) > 0.3)
    tree.set(np.arange(size), values)
    if size > 2:
        tree.set_range(1, np.array([0.25, 0.0]))
        values[1:3] = [0.25, 0.0]
    assert tree.total == pytest.approx(values.sum(), rel=1e-12)
    if values.sum() == 0:
        return
    u = rng.random(5000) * values.sum()
    expected = np.searchsorted(np.cumsum(values), u, side="right")
    assert np.array_equal(tree.find(u), expected)
    slots, leaf = tree.draw(u)
    assert np.array_equal(slots, expected) and np.array_equal(leaf, values[expected])
    rebuilt = SumTree(size)
    rebuilt.rebuild(values)
    assert rebuilt.total == pytest.approx(tree.total, rel=1e-12)
    assert np.array_equal(rebuilt.find(u), expected)
    # parents stay exact sums after many scattered updates with duplicate slots
    for _ in range(50):
        slots = rng.integers(0, size, 64)
        new = rng.random(64)
        tree.set(slots, new)
        for s, v in zip(slots, new):  # the last value listed for a slot wins
            values[s] = v
    for lower, upper in zip(tree.levels, tree.levels[1:]):
        np.testing.assert_allclose(upper[: len(lower) // 16], lower.reshape(-1, 16).sum(axis=1), rtol=1e-13)
    assert tree.total == pytest.approx(values.sum(), rel=1e-12)


def test_sumtree_end_of_range_lands_on_last_positive_leaf():
    tree = SumTree(40)
    values = np.zeros(40)
    values[[3, 20]] = [1.0, 2.0]
    tree.rebuild(values)
    slots, leaf = tree.draw(np.array([0.0, 0.999, 1.0, 2.999, 3.0, 3.5, 1e9]))
    assert slots.tolist() == [3, 3, 20, 20, 20, 20, 20]
    assert leaf.tolist() == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_open_can_switch_sampler(tmp_path):
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=10) as rb:
        rb.extend(episodes([6, 6]))
    with ReplayBuffer.open(path, sampler={"type": "prioritized", "alpha": 1.0}) as rb:
        assert rb.sampler_type == "prioritized" and rb.priority_mass == pytest.approx(10.0)
        rb.update_priority(ix(rb, [2]), [5.0])
        assert rb.priority_mass == pytest.approx(14.0)
    with ReplayBuffer.open(path) as rb:
        assert rb.sampler_type == "prioritized" and rb.priority_mass == pytest.approx(14.0)
    with ReplayBuffer.open(path, sampler={"type": "sequence", "length": 3}) as rb:
        batch = rb.sample(20)
        assert (batch["episode_id"] == batch["episode_id"][:, :1]).all()
    with ReplayBuffer.create(tmp_path / "c", capacity=10) as rb:
        rb.extend(rows(0, 3))
    with pytest.raises(ValueError, match=r"sampler 'sequence' needs key 'episode_id'"):
        ReplayBuffer.open(tmp_path / "c", sampler="sequence")


@pytest.mark.parametrize("span", [1, 3, 1000, 2**31 + 5, 2**40 - 1, 2**52 + 1])
def test_uniform_scaling_never_reaches_the_span(span):
    largest = np.nextafter(1.0, 0.0)  # the largest value Generator.random returns
    assert int(np.float64(largest) * span) == span - 1
    idx = uniform_indices(np.random.default_rng(0), 10_000, 7, 7 + span)
    assert idx.min() >= 7 and idx.max() <= 7 + span - 1


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_sample_and_sample_arrays_give_the_same_weights_for_the_same_draw(tmp_path, beta):
    """One meaning of ``weight``: ``sample``, ``sample(out=)`` and ``sample_arrays`` of
    the same draw (same seed, same state) return the same float32 weights, normalised by
    the batch max; a sharded client computes them with the same function."""
    spec = {"type": "prioritized", "alpha": 0.7, "beta": beta}
    got = {}
    for how in ("sample", "out", "arrays"):
        with ReplayBuffer.create(tmp_path / how, capacity=64, sampler=spec, seed=3) as rb:
            rb.extend(rows(0, 40))
            rb.update_priority(ix(rb, range(40)), np.linspace(0.1, 4.0, 40))
            if how == "sample":
                td = rb.sample(256)
                got[how] = (td["index"].numpy(), td["weight"].numpy())
            elif how == "out":
                td = rb.sample(256)
                rb.sample(256, out=td)
                got[how] = (td["index"].numpy().copy(), td["weight"].numpy().copy())
            else:
                rb.sample_arrays(256)  # the same number of draws before, as "out" made
                out = rb.sample_arrays(256)
                got[how] = (out[("index",)], out[("weight",)])
    assert np.array_equal(ctr(got["out"][0]), ctr(got["arrays"][0]))  # the same draw
    np.testing.assert_array_equal(got["out"][1], got["arrays"][1])
    assert got["sample"][1].dtype == got["arrays"][1].dtype == np.float32
    index, weight = got["sample"]
    mass = (np.linspace(0.1, 4.0, 40) ** 0.7)[ctr(index)]
    np.testing.assert_allclose(weight, (mass.min() / mass) ** beta, rtol=1e-6)
    assert weight.max() == 1.0
