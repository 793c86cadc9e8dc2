"""Concurrent extend and sample from threads: never a torn or half-written row."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from crash_writer import expected_rows
from rlfleet.buffer import ReplayBuffer
from rlfleet.buffer.indices import counter_of, with_tag


def check_batch(batch) -> None:
    idx = counter_of(batch["index"].reshape(-1).numpy())
    want = expected_rows(idx)
    for key, arr in want.items():
        got = batch.get(key).numpy().reshape(arr.shape)
        assert np.array_equal(got, arr), f"torn row in key {key}"


@pytest.mark.parametrize("sampler", ["uniform", "prioritized", "sequence", "without_replacement"])
def test_concurrent_extend_and_sample(tmp_path, sampler):
    spec = {"type": "sequence", "length": 3} if sampler == "sequence" else sampler
    # a tiny ring written fast, so samplers often copy rows the writer is overwriting
    rb = ReplayBuffer.create(tmp_path / "b", capacity=300, sampler=spec, seed=0)
    rb.extend_arrays(expected_rows(np.arange(0, 300)))
    errors: list[BaseException] = []
    stop = threading.Event()
    sampled = [0, 0]
    updated = [0]

    def writer() -> None:
        try:
            first = 300
            for i in range(150):
                n = 40 + (i * 37) % 200
                rb.extend_arrays(expected_rows(np.arange(first, first + n)))
                first += n
                # rows of the last batch and rows long overwritten: the live ones are
                # stored, the others skipped and counted (every sampler checks the call)
                gone = np.arange(max(0, first - 1000), max(0, first - 1000) + 20)
                index = with_tag(np.concatenate([np.arange(first - 50, first), gone]), rb.index_tag)
                skipped = rb.update_priority(index, np.full(70, 1.0 + i % 3))
                assert skipped == 20, skipped
                updated[0] += 50
        except BaseException as e:  # report in the main thread
            errors.append(e)
        finally:
            stop.set()

    def reader(k: int) -> None:
        try:
            while not stop.is_set():
                check_batch(rb.sample(64))
                sampled[k] += 1
                if k == 0:
                    window = rb[-20:]
                    x = window["x"].numpy()
                    assert np.array_equal(x, np.arange(x[0], x[0] + 20))
                    check_batch(window.set("index", window["x"]))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = rb.stats()
    rb.close()
    if errors:
        raise errors[0]
    assert sum(sampled) > 0
    assert stats["priority_updates"] == updated[0] == 150 * 50
    assert stats["priority_updates_skipped"] == 150 * 20


def test_getitem_returns_consistent_window_under_writes(tmp_path):
    rb = ReplayBuffer.create(tmp_path / "b", capacity=100)
    rb.extend_arrays(expected_rows(np.arange(100)))
    done = threading.Event()

    def writer():
        first = 100
        for _ in range(200):
            rb.extend_arrays(expected_rows(np.arange(first, first + 30)))
            first += 30
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        td = rb[torch.arange(0, 100, 7)]
        x = td["x"].numpy()
        assert np.array_equal(np.diff(x), np.full(len(x) - 1, 7))
        check_batch(td.set("index", td["x"]))
    t.join()
    rb.close()


def test_sample_never_sees_a_transiently_empty_window(tmp_path):
    # each extend overwrites the whole ring: between its eviction and its commit the
    # window is empty, and a concurrent sample must wait for the commit, not fail
    rb = ReplayBuffer.create(tmp_path / "b", capacity=50, sampler="without_replacement")
    rb.extend_arrays(expected_rows(np.arange(50)))
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        try:
            for i in range(150):
                rb.extend_arrays(expected_rows(np.arange(50 + 60 * i, 110 + 60 * i)))
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    samples = 0
    while not done.is_set():
        try:
            check_batch(rb.sample(50))
            samples += 1
        except BaseException as e:
            errors.append(e)
            break
    t.join()
    rb.close()
    if errors:
        raise errors[0]
    assert samples > 0
