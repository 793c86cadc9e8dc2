"""Bad input through the sharded service, property-based: schema mismatches, bad
priorities and bad indices sent by a ``BufferClient`` (and straight to a shard actor)
are refused with the buffer's own errors, and every shard stays up and unchanged.

Runs on the session's Ray cluster (``conftest.ray_cluster``); indices follow
``rlfleet.buffer.indices`` (the client sets the shard bits, each shard checks its tag).
The helpers are those of ``test_bad_input_props.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlfleet.buffer import SchemaMismatch, StaleIndexError
from rlfleet.buffer.indices import COUNTER_BITS, clear_shard, shard_of, tag_of, with_shard
from rlfleet.buffer.storage import format_key
from test_bad_input_props import make_rows, no_hang, to_td

# --------------------------------------------------------------------------- through the service

SVC = "props-svc"


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """2 prioritized shards of capacity 20 each, 50 rows written (both rings wrapped)."""
    from rlfleet.buffer import ReplayService

    svc = ReplayService.launch(SVC, tmp_path_factory.mktemp("svc"), capacity=40, num_shards=2,
                               sampler={"type": "prioritized", "alpha": 1.0, "beta": 0.4},
                               rate_limiter={"min_size_to_sample": 1}, seed=0)
    client = svc.client(seed=0)
    for first in range(0, 50, 10):
        client.extend(to_td(make_rows(SERVICE_SCHEMA, first, 10), 10))
    yield client
    ReplayService.shutdown(SVC, delete=True)


SERVICE_SCHEMA = {("observation",): ((3,), np.dtype(np.float32)), ("action",): ((), np.dtype(np.int64)),
                  ("next", "observation"): ((3,), np.dtype(np.float32))}


def shard_view(client) -> list[tuple]:
    """Per shard: pid (a restart changes it) and the numbers a bad call must not change."""
    import ray

    shards = [ray.get_actor(f"rlfleet:{SVC}:shard-{k}", namespace="rlfleet") for k in range(2)]
    pids = ray.get([s.ping.remote() for s in shards], timeout=30)
    stats = client.stats()["shards"]
    return [(pid, s["size"], s["total_inserted"], s["priority_mass"]) for pid, s in zip(pids, stats)]


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutation=st.sampled_from(["dtype", "drop", "add", "shape"]), key=st.sampled_from(list(SERVICE_SCHEMA)),
       prio_kind=st.sampled_from(["negative", "nan", "inf", "short", "overflow"]),
       index_kind=st.sampled_from(["foreign_shard", "foreign_tag", "never_written"]))
def test_bad_calls_through_the_client_are_refused_and_shards_stay_up(service, mutation, key, prio_kind, index_kind):
    import ray

    client = service
    before = shard_view(client)
    bad = dict(SERVICE_SCHEMA)
    if mutation == "dtype":
        bad[key] = (bad[key][0], np.dtype(np.float64) if bad[key][1] != np.float64 else np.dtype(np.int32))
        expect = rf"key '{re.escape(format_key(key))}' has dtype"
    elif mutation == "drop":
        del bad[key]
        expect = rf"batch lacks key '{re.escape(format_key(key))}'"
    elif mutation == "add":
        bad[("extra",)] = ((), np.dtype(np.float32))
        expect = r"batch has key 'extra' that the buffer schema lacks"
    else:
        bad[key] = (bad[key][0] + (2,), bad[key][1])
        expect = rf"key '{re.escape(format_key(key))}' has per-row shape"
    arrays = make_rows(bad, 0, 4)
    with no_hang(60):
        with pytest.raises(SchemaMismatch, match=expect):
            client.extend(to_td(arrays, 4))
        # a writer that bypasses the client meets the same check in the shard actor
        shard = ray.get_actor(f"rlfleet:{SVC}:shard-1", namespace="rlfleet")
        with pytest.raises(SchemaMismatch, match=expect):
            ray.get(shard.extend.remote(arrays), timeout=30)

        index = client.sample(8)["index"].numpy()
        prio = np.ones(len(index))
        if prio_kind == "short":
            prio, expect = prio[:-1], r"pass one priority per index"
        elif prio_kind == "overflow":
            prio[2], expect = 1e308, r"priority\[\d+\]=1e\+308 is above .*p\*\*alpha"
        else:
            prio[2] = {"negative": -1.0, "nan": np.nan, "inf": np.inf}[prio_kind]
            expect = r"priority\[2\]=.* is not a finite number >= 0"
        with pytest.raises(ValueError, match=expect):
            client.update_priority(index[:1] if prio_kind == "overflow" else index,
                                   prio[2:3] if prio_kind == "overflow" else prio)
        # indices as rlfleet.buffer.indices lays them out: the client sets the shard bits
        # and clears them on the way to the shard, whose tag check sees the rest. Both
        # indices go to one shard: the client does not make a call that spans shards
        # atomic, so a shard that refuses cannot undo another's update.
        index = client.sample(64)["index"].numpy()
        index = index[shard_of(index) == shard_of(index[0])][:2].copy()
        if index_kind == "foreign_shard":
            index[1] = with_shard(clear_shard(index[1:2]), 5)[0]
            error, expect = StaleIndexError, r"index\[1\]=\d+ names shard 5, but buffer 'props-svc' has shards 0..1"
        elif index_kind == "foreign_tag":
            other = (int(tag_of(index[1])) + 1) % 4096
            index[1] = (index[1] & ~np.int64(4095 << 51)) | np.int64(other << 51)
            error, expect = StaleIndexError, r"index\[1\]=\d+ belongs to .*another buffer"
        else:
            local = 10**6
            index[1] = (index[1] >> COUNTER_BITS << COUNTER_BITS) | local
            error, expect = StaleIndexError, rf"index\[1\]=\d+ names row {local}\b.* never written"
        with pytest.raises(error, match=expect):
            client.update_priority(index, np.ones(len(index)))
    assert shard_view(client) == before
