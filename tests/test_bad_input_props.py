"""Bad input, property-based: random schemas, batch sizes, priorities, indices, configs.

Every generated case must end in the documented result or a clear rlfleet error naming
what is wrong, never a hang, a crashed actor, or a changed buffer. "Unchanged" is checked
byte for byte: the committed counters, every stored row, ``meta.json``, ``header.bin``
and (prioritized) ``priorities.bin``.

Buffers live under the session's temporary directory (one per example); the same bad
calls through the client and the shard actors are in ``test_bad_input_service_props.py``.
A SIGALRM guard turns a hang into a failure. The default run keeps ``max_examples``
small; the ``slow`` variants draw more. The module passes 400 lines because each
property keeps its generator, its oracle and its checks together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from rlfleet.buffer import ReplayBuffer, SchemaMismatch, StaleIndexError
from rlfleet.buffer.indices import counter_of, with_shard, with_tag
from rlfleet.buffer.storage import format_key
from rlfleet.launch.config import ConfigError, RunConfig, config_to_dict, parse_config

FAST = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [np.bool_, np.uint8, np.int32, np.int64, np.float16, np.float32, np.float64]
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail instead of hanging: SIGALRM raises in the main thread after ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds}s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- helpers

@st.composite
def schemas(draw) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """1-5 leaves, nested up to 3 deep, no leaf a prefix of another."""
    out: dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]] = {}
    for _ in range(draw(st.integers(1, 5))):
        key = tuple(draw(st.lists(NAMES, min_size=1, max_size=3)))
        clash = any(k[: len(key)] == key or key[: len(k)] == k for k in out)
        if clash or key in (("index",), ("weight",)):
            continue
        shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        out[key] = (shape, np.dtype(draw(st.sampled_from(DTYPES))))
    if not out:
        out[("obs",)] = ((2,), np.dtype(np.float32))
    return out


def make_rows(schema, first: int, n: int) -> dict[tuple[str, ...], np.ndarray]:
    """Rows whose values are a function of the global row index."""
    idx = np.arange(first, first + n)
    out = {}
    for j, (key, (shape, dtype)) in enumerate(schema.items()):
        size = int(np.prod(shape, dtype=np.int64))
        base = (idx[:, None] * 7 + np.arange(size)[None, :] + j) % 100
        arr = base.reshape((n, *shape))
        out[key] = (arr % 2 == 1) if dtype == np.bool_ else arr.astype(dtype)
    return out


def to_td(arrays: dict[tuple[str, ...], np.ndarray], n: int) -> TensorDict:
    nested: dict[str, Any] = {}
    for key, arr in arrays.items():
        node = nested
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = torch.from_numpy(np.ascontiguousarray(arr))
    return TensorDict(nested, batch_size=[n])


def snapshot(rb: ReplayBuffer) -> tuple:
    """Everything a refused call must leave as it was."""
    rows = {}
    if len(rb) and rb.schema:
        got = rb[:]
        rows = {k: got.get(k).numpy().tobytes() for k in rb.schema}
    files = {name: (rb.path / name).read_bytes()
             for name in ("meta.json", "header.bin", "priorities.bin") if (rb.path / name).exists()}
    return rb.total_inserted, len(rb), rows, files


_counter = iter(range(10**9))


def fresh_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "props" / f"b{next(_counter)}"


# --------------------------------------------------------------------------- schemas

MUTATIONS = ["drop", "add", "dtype", "shape"]


def check_schema_mismatch(tmp_path_factory, schema, n_first, mutation, pick, new_dtype, extra_dim):
    cap = 8
    with no_hang(), ReplayBuffer.create(fresh_dir(tmp_path_factory), capacity=cap) as rb:
        rb.extend(to_td(make_rows(schema, 0, n_first), n_first))
        before = snapshot(rb)
        keys = list(schema)
        key = keys[pick % len(keys)]
        bad = dict(schema)
        if mutation == "drop" and len(keys) > 1:
            del bad[key]
            expect = rf"batch lacks key '{re.escape(format_key(key))}'"
        elif mutation == "add" or mutation == "drop":
            key = key[:-1] + ("zz_extra",)
            bad[key] = ((), np.dtype(np.float32))
            expect = rf"batch has key '{re.escape(format_key(key))}' that the buffer schema lacks"
        elif mutation == "dtype":
            shape, dtype = schema[key]
            other = np.dtype(new_dtype) if np.dtype(new_dtype) != dtype else np.dtype(np.int16)
            bad[key] = (shape, other)
            expect = rf"key '{re.escape(format_key(key))}' has dtype {other}, buffer schema says {dtype}"
        else:
            shape, dtype = schema[key]
            new_shape = shape + (extra_dim,) if len(shape) < 3 else shape[:-1]
            bad[key] = (new_shape, dtype)
            expect = rf"key '{re.escape(format_key(key))}' has per-row shape {re.escape(str(list(new_shape)))}"
        m = 3
        with pytest.raises(SchemaMismatch, match=expect):
            rb.extend(to_td(make_rows(bad, rb.total_inserted, m), m))
        assert snapshot(rb) == before
        # the buffer still takes a batch of its own schema
        rb.extend(to_td(make_rows(schema, rb.total_inserted, 2), 2))
        assert rb.total_inserted == n_first + 2


schema_case = dict(
    schema=schemas(), n_first=st.integers(1, 9), mutation=st.sampled_from(MUTATIONS),
    pick=st.integers(0, 10), new_dtype=st.sampled_from(DTYPES), extra_dim=st.integers(1, 3),
)


@FAST
@given(**schema_case)
def test_mutated_schema_is_refused_naming_the_key(tmp_path_factory, **case):
    check_schema_mismatch(tmp_path_factory, **case)


@pytest.mark.slow
@SLOW
@given(**schema_case)
def test_mutated_schema_is_refused_naming_the_key_many(tmp_path_factory, **case):
    check_schema_mismatch(tmp_path_factory, **case)


# --------------------------------------------------------------------------- batch sizes

def check_batch_sizes(tmp_path_factory, schema, cap, kinds):
    """Batches of 0, 1, capacity and capacity + 1 rows (and a few others): the returned
    indices, the window and the stored rows are exactly what extend documents."""
    with no_hang(), ReplayBuffer.create(fresh_dir(tmp_path_factory), capacity=cap, seed=0) as rb:
        total = 0
        for kind in kinds:
            n = {"zero": 0, "one": 1, "cap": cap, "cap+1": cap + 1, "2cap+3": 2 * cap + 3}[kind]
            index = rb.extend(to_td(make_rows(schema, total, n), n))
            assert index.dtype == torch.int64
            assert index.tolist() == with_tag(np.arange(total, total + n), rb.index_tag).tolist()
            total += n
            assert rb.total_inserted == total and len(rb) == min(cap, total)
            if len(rb):
                got, want = rb[:], make_rows(schema, total - len(rb), len(rb))
                for key, arr in want.items():
                    assert np.array_equal(got.get(key).numpy(), arr), key
                batch = rb.sample(5)
                assert batch.batch_size == torch.Size([5])
                counter = counter_of(batch["index"].numpy())
                assert ((counter >= total - len(rb)) & (counter < total)).all()
            elif rb.schema is not None:
                with pytest.raises(ValueError, match=r"sample: the buffer is empty"):
                    rb.sample(1)
        for bad_n in (0, -1, 1.5, True, "3"):
            with pytest.raises(ValueError, match=r"sample: n=.* must be a positive int"):
                rb.sample(bad_n)


batch_case = dict(
    schema=schemas(), cap=st.integers(1, 12),
    kinds=st.lists(st.sampled_from(["zero", "one", "cap", "cap+1", "2cap+3"]), min_size=1, max_size=6),
)


@FAST
@given(**batch_case)
def test_batch_sizes_zero_one_capacity_and_above(tmp_path_factory, **case):
    check_batch_sizes(tmp_path_factory, **case)


@pytest.mark.slow
@SLOW
@given(**batch_case)
def test_batch_sizes_zero_one_capacity_and_above_many(tmp_path_factory, **case):
    check_batch_sizes(tmp_path_factory, **case)


# --------------------------------------------------------------------------- priorities and indices

BAD_PRIORITIES = ["negative", "nan", "inf", "-inf", "overflow", "short", "long", "2d"]
BAD_INDICES = ["stale", "never_written", "negative", "foreign_shard", "foreign_tag", "float", "2d"]


def check_bad_priority_calls(tmp_path_factory, cap, n_rows, alpha, prio_kind, index_kind, pos):
    sampler = {"type": "prioritized", "alpha": alpha, "beta": 0.4}
    with no_hang(), ReplayBuffer.create(fresh_dir(tmp_path_factory), capacity=cap,
                                        sampler=sampler, seed=0) as rb:
        rb.extend_arrays({("x",): np.arange(n_rows)})
        tag = rb.index_tag
        live = np.arange(rb.total_inserted - len(rb), rb.total_inserted)
        rb.update_priority(with_tag(live, tag), np.linspace(0.5, 2.0, len(live)))
        mass = rb.priority_mass
        before = snapshot(rb)
        k = len(live)
        at = pos % k
        # bad priorities on valid indices
        prio = np.ones(k)
        index = with_tag(live, tag)
        if prio_kind in ("negative", "nan", "inf", "-inf"):
            prio[at] = {"negative": -1e-3, "nan": np.nan, "inf": np.inf, "-inf": -np.inf}[prio_kind]
            expect = rf"priority\[{at}\]=.* is not a finite number >= 0"
        elif prio_kind == "overflow":
            # float max ** alpha summed over the capacity overflows for alpha >= 1 only
            prio[at] = np.finfo(np.float64).max if alpha >= 1 else np.inf
            expect = (rf"priority\[{at}\]=.* is above .*, the largest whose p\*\*alpha" if alpha >= 1
                      else rf"priority\[{at}\]=inf is not a finite number >= 0")
        else:
            prio = {"short": prio[:-1], "long": np.ones(k + 1), "2d": np.ones((k, 2))}[prio_kind]
            expect = r"priorities \(shape .*\) for .* indices \(shape .*\); pass one priority per index"
        with pytest.raises(ValueError, match=expect):
            rb.update_priority(index, prio)
        assert snapshot(rb) == before and rb.priority_mass == mass
        # bad indices with good priorities
        prio = np.ones(k)
        if index_kind == "stale":
            # not bad: the overwritten row is skipped and counted, the live rows stored
            if live[0] == 0:  # nothing overwritten yet: wrap the ring
                rb.extend_arrays({("x",): np.arange(rb.total_inserted, rb.total_inserted + cap)})
                live = np.arange(rb.total_inserted - len(rb), rb.total_inserted)
                k, at = len(live), pos % len(live)
                prio = np.ones(k)
            counters = live.copy()
            counters[at] = live[0] - 1
            old = np.fromfile(rb.path / "priorities.bin")[live[at] % cap]
            assert rb.update_priority(with_tag(counters, tag), prio * 3.0) == 1
            stored = np.fromfile(rb.path / "priorities.bin")
            assert (stored[np.delete(counters, at) % cap] == 3.0).all()
            assert stored[live[at] % cap] == old  # not in the call: unchanged
            assert rb.stats()["priority_updates_skipped"] == 1
            assert rb.priority_mass == pytest.approx(float(np.sum(stored[live % cap] ** alpha)), rel=1e-9)
            batch = rb.sample(16)
            assert torch.isfinite(batch["weight"]).all()
            return
        index = with_tag(live, tag)
        error = StaleIndexError
        if index_kind == "never_written":
            counter = rb.total_inserted + pos
            index[at] = with_tag(np.array([counter]), tag)[0]
            expect = (rf"index\[{at}\]={index[at]} names row {counter}, which was never written "
                      rf"\(this buffer has written rows 0..{rb.total_inserted - 1}\)")
        elif index_kind == "negative":
            index[at] = -1 - pos
            expect = rf"index\[{at}\]={index[at]} is negative; pass the int64 indices"
        elif index_kind == "foreign_shard":
            index[at] = with_shard(index[at:at + 1], 3)[0]
            expect = (rf"index\[{at}\]={index[at]} belongs to another buffer or to an earlier "
                      rf"buffer created at .*: it carries tag {tag} and shard 3")
        elif index_kind == "foreign_tag":
            index[at] = with_tag(live[at:at + 1], (tag + 1 + pos) % 4096)[0]
            expect = rf"index\[{at}\]={index[at]} belongs to another buffer"
        elif index_kind == "float":
            index = live.astype(np.float64) + 0.5
            expect, error = r"index has dtype float64; pass integer indices", ValueError
        else:
            index = index[:, None]
            prio = prio[:, None]
            expect, error = r"pass one priority per index", ValueError
        with pytest.raises(error, match=expect):
            rb.update_priority(index, prio)
        assert snapshot(rb) == before and rb.priority_mass == mass
        # the sampler still works and every weight is finite
        batch = rb.sample(16)
        assert torch.isfinite(batch["weight"]).all()


priority_case = dict(
    cap=st.integers(1, 16), n_rows=st.integers(1, 40), alpha=st.sampled_from([0.6, 1.0, 2.5]),
    prio_kind=st.sampled_from(BAD_PRIORITIES), index_kind=st.sampled_from(BAD_INDICES),
    pos=st.integers(0, 100),
)


@FAST
@given(**priority_case)
def test_bad_priorities_and_indices_change_nothing(tmp_path_factory, **case):
    check_bad_priority_calls(tmp_path_factory, **case)


@pytest.mark.slow
@SLOW
@given(**priority_case)
def test_bad_priorities_and_indices_change_nothing_many(tmp_path_factory, **case):
    check_bad_priority_calls(tmp_path_factory, **case)


@FAST
@given(huge=st.floats(min_value=1.0, max_value=1e150), alpha=st.sampled_from([0.6, 1.0, 2.0]))
def test_huge_finite_priorities_below_the_limit_keep_sampling_finite(tmp_path_factory, huge, alpha):
    sampler = {"type": "prioritized", "alpha": alpha, "beta": 0.4}
    with no_hang(), ReplayBuffer.create(fresh_dir(tmp_path_factory), capacity=64,
                                        sampler=sampler, seed=0) as rb:
        rb.extend_arrays({("x",): np.arange(64)})
        try:
            rb.update_priority(with_tag(np.arange(64), rb.index_tag), np.full(64, huge))
        except ValueError as e:  # refused only above the documented limit
            assert "the largest whose p**alpha" in str(e)
            assert huge ** alpha * 64 > 1e300
            return
        assert np.isfinite(rb.priority_mass) and rb.priority_mass > 0
        batch = rb.sample(32)
        assert torch.isfinite(batch["weight"]).all() and (batch["weight"] > 0).all()


# --------------------------------------------------------------------------- configs

def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, annotation) of every typed field of the config, recursively."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        out.append((path, tp))
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, path + ".")
    return out


def _sections(cls: type, prefix: str = "") -> list[tuple[str, list[str]]]:
    out = [(prefix.rstrip("."), [f.name for f in dataclasses.fields(cls)])]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _sections(hints[f.name], f"{prefix}{f.name}.")
    return out


LEAVES = [(p, tp) for p, tp in _leaves(RunConfig) if tp is not Any
          and not (tp is dict or typing.get_origin(tp) is dict)]
SECTIONS = _sections(RunConfig)
WRONG_VALUES = [[1, 2], {"zz": 1}, "not-a-value", True, 1.5]


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a value of this Python type could be right for the annotation (an oracle
    independent of the loader: types only, not ranges)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        return any(_accepts(a, value) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return False  # none of WRONG_VALUES is a valid section (a str names a bad type)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is tuple or origin is tuple:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return True


def _set(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def check_config(leaf, wrong, section, new_key, via_override):
    base = config_to_dict(RunConfig())
    base["buffer"]["sampler"] = {"type": "uniform"}
    path, tp = LEAVES[leaf % len(LEAVES)]
    value = WRONG_VALUES[wrong % len(WRONG_VALUES)]
    if not _accepts(tp, value):
        if via_override:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            call = lambda: parse_config(yaml.safe_dump(base), [f"{path}={text}"])  # noqa: E731
        else:
            data = yaml.safe_load(yaml.safe_dump(base))
            _set(data, path, value)
            call = lambda: parse_config(yaml.safe_dump(data))  # noqa: E731
        with no_hang(), pytest.raises(ConfigError) as err:
            call()
        assert path in str(err.value), str(err.value)
    # an unknown key at some depth
    where, valid = SECTIONS[section % len(SECTIONS)]
    if new_key in valid:
        return
    full = f"{where}.{new_key}" if where else new_key
    data = yaml.safe_load(yaml.safe_dump(base))
    _set(data, full, 1)
    with no_hang(), pytest.raises(ConfigError, match=rf"unknown key '{re.escape(full)}'"):
        parse_config(yaml.safe_dump(data))
    with no_hang(), pytest.raises(ConfigError, match=rf"unknown key '{re.escape(full)}'"):
        parse_config(yaml.safe_dump(base), [f"{full}=1"])


config_case = dict(
    leaf=st.integers(0, 1000), wrong=st.integers(0, 10), section=st.integers(0, 100),
    new_key=NAMES, via_override=st.booleans(),
)


@FAST
@given(**config_case)
def test_configs_with_wrong_types_and_unknown_keys_name_the_key(**case):
    check_config(**case)


@pytest.mark.slow
@SLOW
@given(**config_case)
def test_configs_with_wrong_types_and_unknown_keys_name_the_key_many(**case):
    check_config(**case)
