"""The rate limiter on its own: plain threads, no Ray."""

from __future__ import annotations

import threading

import pytest

from rlfleet.buffer.errors import InsertTimeout, SampleTimeout
from rlfleet.buffer.rate_limiter import RateLimiter, RateLimiterSpec


def test_sample_waits_for_min_size_then_times_out_naming_the_state():
    limiter = RateLimiter(RateLimiterSpec(min_size_to_sample=10, timeout_s=5.0))
    limiter.acquire_insert(4)
    limiter.set_size(4)
    with pytest.raises(SampleTimeout, match=r"sample of 3 rows waited 0.05s .*size=4, "
                       r"min_size_to_sample=10, inserted=4, sampled=0.*holds 4 of the 10 rows"):
        limiter.acquire_sample(3, timeout_s=0.05)
    state = limiter.state()
    assert (state["samples"], state["sample_waits"], state["sample_timeouts"]) == (0, 1, 1)


def test_a_blocked_sample_is_released_by_an_insert_from_another_thread():
    limiter = RateLimiter(RateLimiterSpec(min_size_to_sample=5, timeout_s=30.0))
    done = threading.Event()

    def sampler():
        limiter.acquire_sample(2)
        done.set()

    t = threading.Thread(target=sampler)
    t.start()
    assert not done.wait(0.05)
    limiter.acquire_insert(5)
    limiter.set_size(5)
    t.join(30)
    assert done.is_set()
    assert limiter.state()["samples"] == 2 and limiter.state()["sample_waits"] == 1


def test_empty_shard_never_samples_even_with_min_size_zero():
    limiter = RateLimiter(RateLimiterSpec(min_size_to_sample=0))
    with pytest.raises(SampleTimeout, match="holds 0 of the 1 rows"):
        limiter.acquire_sample(1, timeout_s=0.01)


def test_insert_waits_when_samplers_are_behind_the_ratio():
    spec = RateLimiterSpec(min_size_to_sample=10, samples_per_insert=2.0, error_margin=4.0)
    limiter = RateLimiter(spec)
    limiter.acquire_insert(10)  # filling up to min size is free
    limiter.set_size(10)
    limiter.acquire_insert(2)   # deficit 24 = centre 20 + 4: at the margin, allowed
    with pytest.raises(InsertTimeout, match=r"insert of 1 rows waited 0.02s.*inserted=12, "
                       r"sampled=0, samples_per_insert=2.0, error_margin=4.0, "
                       r"ratio_offset=\+4.0 rows"):
        limiter.acquire_insert(1, timeout_s=0.02)
    limiter.acquire_sample(3)
    limiter.acquire_insert(1)   # deficit 21 + 2 = 23 <= 24
    assert limiter.state()["inserts"] == 13 and limiter.state()["ratio_offset"] == 3.0


def test_cancel_undoes_a_failed_operation():
    limiter = RateLimiter(RateLimiterSpec(min_size_to_sample=1, samples_per_insert=1.0,
                                          error_margin=10))
    limiter.acquire_insert(5)
    limiter.cancel_insert(5)
    limiter.acquire_insert(3)
    limiter.set_size(3)
    limiter.acquire_sample(2)
    limiter.cancel_sample(2)
    state = limiter.state()
    assert (state["inserts"], state["samples"], state["ratio_offset"]) == (3, 0, 2.0)


def test_batches_larger_than_the_margin_never_deadlock():
    # margin 0 with batches of 100 and 64: one side is always admitted
    spec = RateLimiterSpec(min_size_to_sample=1, samples_per_insert=1.0, error_margin=0.0,
                           timeout_s=10.0)
    limiter = RateLimiter(spec)
    offsets = []
    lock = threading.Lock()

    def writer():
        for _ in range(40):
            limiter.acquire_insert(100)
            limiter.set_size(100)
            with lock:
                offsets.append(limiter.state()["ratio_offset"])

    def sampler():
        # 62 batches: enough for the writer's last batch (it needs 3900 sampled)
        for _ in range(62):
            limiter.acquire_sample(64)
            with lock:
                offsets.append(limiter.state()["ratio_offset"])

    threads = [threading.Thread(target=writer), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    state = limiter.state()
    assert (state["inserts"], state["samples"]) == (4000, 3968)
    # |offset| never exceeds the larger batch
    assert max(abs(o) for o in offsets) <= 100


def test_concurrent_writer_and_sampler_hold_the_ratio_within_the_margin():
    spi, margin, min_size = 4.0, 200.0, 50
    spec = RateLimiterSpec(min_size_to_sample=min_size, samples_per_insert=spi,
                           error_margin=margin, timeout_s=10.0)
    limiter = RateLimiter(spec)
    seen = []
    lock = threading.Lock()

    def record():
        s = limiter.state()
        with lock:
            seen.append((s["inserts"], s["samples"], s["ratio_offset"]))

    def writer():
        for i in range(100):
            limiter.acquire_insert(10)   # moves the deficit by 40 <= margin
            limiter.set_size(10 * (i + 1))
            record()

    def sampler():
        # 4 * (1000 - 50) = 3800 rows: what the ratio owes once the writer is done
        for _ in range(190):
            limiter.acquire_sample(20)   # 20 <= margin
            record()

    stop_writing = threading.Thread(target=writer)
    sampling = threading.Thread(target=sampler)
    stop_writing.start()
    sampling.start()
    stop_writing.join(60)
    sampling.join(60)
    state = limiter.state()
    assert (state["inserts"], state["samples"]) == (1000, 3800)
    for inserts, samples, offset in seen:
        assert abs(offset) <= margin, (inserts, samples, offset)
        assert offset == pytest.approx(spi * inserts - samples - spi * min_size)


def test_restart_starts_balanced_on_the_rows_already_held():
    spec = RateLimiterSpec(min_size_to_sample=100, samples_per_insert=2.0, error_margin=10.0)
    limiter = RateLimiter(spec, size=500)
    state = limiter.state()
    assert state["ratio_offset"] == 0.0 and state["size"] == 500
    limiter.acquire_sample(10)   # within the margin
    with pytest.raises(SampleTimeout, match="sampling is ahead of the samples_per_insert ratio"):
        limiter.acquire_sample(11, timeout_s=0.01)


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"min_size_to_sample": -1}, r"rate_limiter.min_size_to_sample=-1: must be an int >= 0"),
        ({"min_size_to_sample": 2.5}, r"min_size_to_sample=2.5: must be an int"),
        ({"samples_per_insert": 0}, r"samples_per_insert=0: must be a finite number > 0"),
        ({"samples_per_insert": float("nan")}, r"samples_per_insert=nan"),
        ({"error_margin": -1.0}, r"error_margin=-1.0: must be a finite number >= 0"),
        ({"timeout_s": 0}, r"timeout_s=0: must be a number of seconds > 0"),
        ({"min_size": 5}, r"unknown key\(s\) \['min_size'\]; known keys are"),
        ([1, 2], r"expected a mapping"),
    ],
)
def test_bad_settings_are_refused(mapping, message):
    with pytest.raises(ValueError, match=message):
        RateLimiterSpec.from_mapping(mapping)


def test_settings_round_trip_through_a_mapping():
    spec = RateLimiterSpec.from_mapping({"min_size_to_sample": 7, "samples_per_insert": 0.5,
                                         "error_margin": 3, "timeout_s": 2.0})
    assert RateLimiterSpec.from_mapping(spec.to_mapping()) == spec
    assert RateLimiterSpec.from_mapping(None) == RateLimiterSpec()


# -- the buffer-wide limiter's owner (shard 0), without Ray ------------------------------------


def test_owner_credits_rows_a_shard_held_before_it_started_as_a_reopened_limiter_does():
    from rlfleet.buffer.shared_limiter import LimiterOwner

    spec = RateLimiterSpec(min_size_to_sample=100, samples_per_insert=2.0, error_margin=10.0)
    owner = LimiterOwner(spec, num_shards=3, own_size=30)
    owner.report_size(1, 200)
    owner.report_size(2, 270)
    owner.report_size(2, 100)  # a late report of an older size changes nothing
    fresh = RateLimiter(spec, size=500)  # one limiter reopened over the same 500 rows
    for key in ("size", "inserts", "samples", "ratio_offset"):
        assert owner.limiter.state()[key] == fresh.state()[key], key
    # rows it admitted are not credited again when their shard reports them
    owner.acquire("insert", 4, None, 1, 200)
    owner.report_size(1, 204)
    fresh.acquire_insert(4)
    assert owner.limiter.state()["ratio_offset"] == fresh.state()["ratio_offset"] == 8.0
    assert owner.limiter.state()["size"] == 504


def test_owner_counts_no_rows_when_a_full_shard_keeps_overwriting():
    from rlfleet.buffer.shared_limiter import LimiterOwner

    spec = RateLimiterSpec(min_size_to_sample=10, samples_per_insert=1.0, error_margin=1000.0)
    owner = LimiterOwner(spec, num_shards=2, own_size=0)
    for size in (0, 20, 20, 20, 20):  # shard 1 is full after the first 20 rows
        owner.acquire("insert", 20, None, 1, size)
        owner.report_size(1, 20)
    state = owner.limiter.state()
    assert (state["size"], state["inserts"], state["ratio_offset"]) == (20, 100, 90.0)
    owner.cancel("insert", 20, 1)
    assert owner.limiter.state()["inserts"] == 80
