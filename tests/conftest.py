"""Shared fixtures: one real local Ray cluster for the whole session.

Starting Ray costs about 5 s, so every test that needs it shares one cluster, capped
small (logical CPUs for placement, a 512 MB object store). Tests that need their own
cluster (multi-node, killing raylets) are marked ``slow`` and start their own.
"""

from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the session; yields ``ray.init``'s context.

    ``metrics_export_port`` is on the yielded object's ``.metrics_export_port`` so tests
    can scrape the node's Prometheus endpoint.
    """
    import ray

    port = _free_port()
    # address="local": always a fresh cluster of our own, never one that another
    # process (a multi-node test's `ray start`, a user's cluster) left running here
    ctx = ray.init(
        address="local",
        num_cpus=8,
        object_store_memory=512 * 1024**2,
        namespace="rlfleet",
        include_dashboard=False,
        _metrics_export_port=port,
        log_to_driver=False,
    )
    ctx.metrics_export_port = port
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    yield


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread, as a collector actor does; restore after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
