"""``BroadcastPublisher.close`` never waits on a weight group that is still forming.

A real ``TCPStore`` and a real gloo rendezvous on 127.0.0.1: one collector announces
itself and never joins, so the publisher sits in the rendezvous (``form_timeout_s``);
``close`` must return without it. Nothing here measures time: the proof is that
``close`` returned while the sender thread was still in the rendezvous.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from rlfleet.collector.weights_broadcast import BroadcastPublisher
from rlfleet.collector.weights_wire import JOINS_KEY

# a bound on the test's own wait for the publisher to start forming, not a timing check
WAIT_FOR_FORMING_S = 60.0


def test_close_returns_while_the_group_is_still_forming():
    # fleet=None: the group alone, no object-store fallback (no Ray here)
    publisher = BroadcastPublisher(fleet=None, num_collectors=1, host="127.0.0.1", form_timeout_s=30.0,
                                   op_timeout_s=5.0)
    try:
        publisher.publish({"w": torch.zeros(3)}, version=1)
        client = dist.TCPStore("127.0.0.1", publisher.port, None, False, timeout=timedelta(seconds=30))
        client.add(JOINS_KEY, 1)  # a collector announces itself ... and never joins the group
        deadline = time.monotonic() + WAIT_FOR_FORMING_S
        while not publisher._forming and time.monotonic() < deadline:
            time.sleep(0.05)
        assert publisher._forming, "the publisher never started forming the group"
        publisher.close()
        assert publisher._thread.is_alive() and publisher._forming  # close did not wait for it
        assert publisher.stats()["weights/group_ready"] == 0.0
        assert publisher.delivered_version == -1
    finally:
        publisher.close()
