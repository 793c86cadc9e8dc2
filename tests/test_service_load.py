"""Load: N client processes extending and sampling one 2-shard service at once.

Each client (``tests/load_client.py``) is a separate Python process that joins the
session's Ray cluster by address, as a user's script would, and runs a writer thread and
a sampler thread together for a fixed count of operations. Every row encodes the
(process, batch, row) that wrote it, so at the end the test proves: no client saw an
error or a deadlock (a hard timeout fails the test instead of hanging), the service
counted exactly the rows the clients inserted and sampled, every row on disk appears
exactly once with its own content, and every sampled row is a row some client inserted,
at the index its insert returned. With the rate limiter on, the test also polls each
shard's limiter while the clients run: the samples-per-insert ratio stays within the
margin for the buffer as a whole (the limiter is buffer-wide: two shards, a ratio). Sample
latency p50/p99 is printed, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from rlfleet.buffer import ReplayBuffer, ReplayService
from rlfleet.buffer.indices import shard_of

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "load_client.py"
ROWS = 32        # rows per extend
SAMPLE_N = 32    # rows per sample
MIN_SIZE = 64    # the buffer's with the ratio on (buffer-wide limiter), each shard's without
SPI = 1.0        # samples per insert
# above any one move of the limiter's deficit (an insert moves it by SPI * ROWS, a sample
# by at most SAMPLE_N), so the ratio holds within it
MARGIN = 256.0


def plan(clients: int, extends: int, limited: bool) -> int:
    """Sample batches per client: with the ratio on, what the inserts pay for.

    The buffer-wide limiter holds ``sampled`` within ``MARGIN`` of ``SPI * (inserted -
    MIN_SIZE)``. Each client's plan rounds its share of that to the nearest batch, at
    most ``SAMPLE_N / 2`` rows off, so the total stays within the margin either way (for
    up to ``2 * MARGIN / SAMPLE_N`` = 16 clients): neither the last samples nor the last
    inserts wait for calls that will not come.
    """
    rows = extends * ROWS
    if not limited:
        return rows // SAMPLE_N
    return round(SPI * (rows - MIN_SIZE / clients) / SAMPLE_N)


class Clients:
    """N client processes joined to the session's cluster, released phase by phase."""

    def __init__(self, ray_cluster, workdir: Path, clients: int, phases: list[dict], timeout_s: float) -> None:
        self.workdir, self.clients, self.phases = workdir, clients, phases
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        (workdir / "plan.json").write_text(json.dumps(phases))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_ADDRESS=ray_cluster.address_info["address"], RAY_AUTH_MODE="token")
        self.logs = [open(workdir / f"client-{i}.log", "w") for i in range(clients)]
        self.procs = [subprocess.Popen([sys.executable, str(CLIENT), str(workdir), str(i)], cwd=ROOT, env=env,
                                       stdout=self.logs[i], stderr=subprocess.STDOUT) for i in range(clients)]

    def up(self) -> None:
        """The services run: let the clients connect."""
        (self.workdir / "up").touch()

    def run_phase(self, phase: int, poll=None) -> list[dict]:
        """Release every client into ``phase`` at once; wait (bounded) for their results."""
        self._wait_files(f"ready-{phase}-*", "connect")
        (self.workdir / f"go-{phase}").touch()
        self._wait_files(f"result-{phase}-*.json", "finish their operations", poll)
        return [json.loads((self.workdir / f"result-{phase}-{i}.json").read_text()) for i in range(self.clients)]

    def _wait_files(self, pattern: str, what: str, poll=None) -> None:
        while len(list(self.workdir.glob(pattern))) < self.clients:
            failed = [i for i, p in enumerate(self.procs) if p.poll() not in (None, 0)]
            assert not failed, f"client(s) {failed} failed:\n" + self.output(failed)
            if time.monotonic() > self.deadline:
                done = {p.name.split("-")[-1].split(".")[0] for p in self.workdir.glob(pattern)}
                stuck = [i for i in range(self.clients) if str(i) not in done]
                raise AssertionError(f"clients {stuck} did not {what} within {self.timeout_s:g} s: a deadlock "
                                     f"or a hang; logs:\n" + self.output(stuck))
            if poll is not None:
                poll()
            time.sleep(0.1)

    def close(self, wait: bool) -> list[int]:
        """Wait for the clients to exit (``wait``; else, or past the deadline, kill them);
        returns their exit codes."""
        for p in self.procs:
            try:
                p.wait(max(1.0, self.deadline - time.monotonic()) if wait else 0.1)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()
        return [p.returncode for p in self.procs]

    def output(self, which) -> str:
        return "\n".join(f"--- client {i}:\n" + (self.workdir / f"client-{i}.log").read_text()[-3000:]
                         for i in which)


class RatioWatch:
    """Polls the buffer-wide limiter while the clients run; keeps the worst offsets seen."""

    def __init__(self, client) -> None:
        self.client = client
        self.polls = 0
        self.high = -float("inf")   # inserts ahead of the ratio (rows)
        self.low = float("inf")     # samples ahead of the ratio, once sampling began

    def __call__(self) -> None:
        limiter = self.client.stats()["total"]["buffer_rate_limiter"]
        self.high = max(self.high, limiter["ratio_offset"])
        if limiter["samples"] > 0:
            self.low = min(self.low, limiter["ratio_offset"])
        self.polls += 1


def check_phase(buffer_dir: Path, stats: dict, results: list[dict], total_rows: int, sampled_rows: int) -> None:
    """Counts add up exactly; every row on disk once with its content; samples were inserted."""
    assert [r["errors"] for r in results] == [[]] * len(results)
    index_of = {key: index for r in results for key, index in r["inserted"]}
    sampled = [(index, key) for r in results for index, key in r["sampled"]]
    assert len(index_of) == sum(len(r["inserted"]) for r in results) == total_rows
    assert len(sampled) == sampled_rows
    # the service counted exactly what the clients did
    total = stats["total"]
    assert (total["total_inserted"], total["size"]) == (total_rows, total_rows)
    # no sample waited out its timeout (a writer that moves on to another shard after a
    # slice of its wait counts a timeout on the shard it left: those are not errors)
    assert total["rate_limiter"]["sample_timeouts"] == 0
    assert sum(s["rate_limiter"]["inserts"] for s in stats["shards"]) == total_rows
    assert sum(s["rate_limiter"]["samples"] for s in stats["shards"]) == sampled_rows
    # every sampled row was inserted by some client, at the index its extend returned
    key_at = {index: key for key, index in index_of.items()}
    assert len(key_at) == total_rows, "two inserted rows share a global index"
    wrong = [(i, k) for i, k in sampled if key_at.get(i) != k]
    assert not wrong, f"{len(wrong)} sampled rows are not what was inserted at their index, e.g. {wrong[:3]}"
    # every row on disk appears once, with its own content, on the shard its index names
    on_disk: dict[int, int] = {}
    for k in (0, 1):
        with ReplayBuffer.open(buffer_dir / f"shard-{k}") as rb:
            rows = rb[:]
        keys = rows["key"].numpy()
        obs = rows["observation"].numpy()
        expect = np.stack([keys >> 32, (keys >> 10) & 0x3FFFFF, keys & 0x3FF, keys % 9973], axis=1)
        assert np.array_equal(obs, expect.astype(np.float32)), f"shard {k}: a row's content is not its own"
        assert np.array_equal(rows["next", "observation"].numpy(), obs + 1)
        assert len(np.unique(keys)) == len(keys), f"shard {k} holds a row twice"
        for key in keys.tolist():
            assert key not in on_disk, f"row {key} is on both shards"
            on_disk[key] = k
    assert set(on_disk) == set(index_of)
    assert all(shard_of(index_of[key]) == k for key, k in on_disk.items())


LIMITER_OFF = {"min_size_to_sample": MIN_SIZE, "timeout_s": 120.0}
LIMITER_ON = {**LIMITER_OFF, "samples_per_insert": SPI, "error_margin": MARGIN}


@pytest.mark.parametrize("clients,extends,timeout_s", [
    pytest.param(4, 24, 240.0, id="4_clients", marks=pytest.mark.slow),
    pytest.param(16, 24, 600.0, id="16_clients", marks=pytest.mark.slow),
])
def test_clients_extend_and_sample_at_once_and_every_row_adds_up(ray_cluster, tmp_path, capsys, clients,
                                                                extends, timeout_s):
    total_rows = clients * extends * ROWS
    variants = [("on", LIMITER_ON), ("off", LIMITER_OFF)]
    phases = [{"name": f"svc-load-{clients}-{v}", "extends": extends, "rows": ROWS, "sample_n": SAMPLE_N,
               "samples": plan(clients, extends, limited=v == "on")} for v, _ in variants]
    workdir = tmp_path / "work"
    workdir.mkdir()
    # the clients import while the shards start
    group = Clients(ray_cluster, workdir, clients, phases, timeout_s)
    finished = False
    try:
        # both services at once: starting a shard's process is most of the setup
        with ThreadPoolExecutor(len(phases)) as pool:
            services = list(pool.map(
                lambda p, limiter: ReplayService.launch(p["name"], tmp_path / p["name"], capacity=2 * total_rows,
                                                        num_shards=2, seed=0, rate_limiter=limiter, detached=False,
                                                        timeout_s=timeout_s),
                phases, [limiter for _, limiter in variants]))
        group.up()
        figures = []
        for phase, (spec, (variant, _), svc) in enumerate(zip(phases, variants, services)):
            client = svc.client(seed=0)
            watch = RatioWatch(client)
            results = group.run_phase(phase, poll=watch if variant == "on" else None)
            stats = client.stats()
            ReplayService.shutdown(spec["name"])  # closes the shards: their files are complete on disk
            sampled_rows = clients * spec["samples"] * SAMPLE_N
            check_phase(tmp_path / spec["name"], stats, results, total_rows, sampled_rows)
            if variant == "on":
                assert watch.polls > 0
                assert watch.high <= MARGIN, f"inserts ran {watch.high:.0f} rows ahead of the ratio (margin {MARGIN:g})"
                assert watch.low >= -MARGIN, f"samples ran {-watch.low:.0f} rows ahead of the ratio (margin {MARGIN:g})"
                wide = stats["total"]["buffer_rate_limiter"]
                assert (wide["inserts"], wide["samples"]) == (total_rows, sampled_rows)
                assert -MARGIN <= wide["ratio_offset"] <= MARGIN, wide
            latencies = np.array([t for r in results for t in r["latencies"]]) * 1000
            p50, p99 = np.percentile(latencies, [50, 99])
            ratio = "" if variant == "off" else (f" ratio offset seen [{watch.low:+.0f}, {watch.high:+.0f}] rows "
                                                 f"(margin {MARGIN:g}, {watch.polls} polls)")
            figures.append(f"load: clients={clients} limiter={variant} inserts={total_rows} samples={sampled_rows} "
                           f"errors=0 sample latency p50={p50:.1f} ms p99={p99:.1f} ms{ratio}")
        finished = True
    finally:
        codes = group.close(wait=finished)
        for spec in phases:
            if spec["name"] in ReplayService.running():
                ReplayService.shutdown(spec["name"])
    assert codes == [0] * clients, f"exit codes {codes}; logs:\n" + group.output(range(clients))
    with capsys.disabled():
        print("\n" + "\n".join(figures))
