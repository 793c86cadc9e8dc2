"""One load-test client process: a writer thread and a sampler thread per buffer.

Run by ``tests/test_service_load.py`` as a separate process that joins the test
session's Ray cluster by address (``RAY_ADDRESS``, ``RAY_AUTH_MODE=token``)::

    python tests/load_client.py WORKDIR PROC

``WORKDIR/plan.json`` lists phases, one buffer each: ``{"name", "extends", "rows",
"samples", "sample_n"}``. The client waits for ``WORKDIR/up`` (the services run), and
for each phase connects, writes ``ready-<phase>-<PROC>`` and waits for ``go-<phase>`` so
every client starts at once. Then the writer extends ``extends`` batches of ``rows`` rows
while the sampler draws ``samples`` batches of ``sample_n`` rows, both at once, as an actor
and a learner would (a writer and a sampler in one thread could wait on each other
through the rate limiter). Row content encodes where it came from: ``key = PROC << 32 |
seq << 10 | j`` and ``observation = [PROC, seq, j, key % 9973]``, ``("next",
"observation") = observation + 1``; the sampler checks every sampled row against its key.

Writes ``result-<phase>-<PROC>.json``: the (key, global index) pairs it inserted, the
(index, key) pairs it sampled, sample latencies in seconds, and any errors.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
from tensordict import TensorDict

from rlfleet.buffer import BufferClient


def batch(proc: int, seq: int, rows: int) -> TensorDict:
    j = torch.arange(rows, dtype=torch.int64)
    key = (proc << 32) | (seq << 10) | j
    obs = torch.stack([torch.full((rows,), float(proc)), torch.full((rows,), float(seq)), j.float(),
                       (key % 9973).float()], dim=1)
    return TensorDict({"key": key, "observation": obs, "next": {"observation": obs + 1}}, batch_size=[rows])


def check_rows(td: TensorDict) -> None:
    key = td["key"]
    obs = td["observation"]
    expected = torch.stack([(key >> 32).float(), ((key >> 10) & 0x3FFFFF).float(), (key & 0x3FF).float(),
                            (key % 9973).float()], dim=1)
    if not torch.equal(obs, expected) or not torch.equal(td["next", "observation"], expected + 1):
        bad = int((obs != expected).any(dim=1).nonzero()[0, 0]) if not torch.equal(obs, expected) else 0
        raise AssertionError(f"sampled row with key {int(key[bad])} holds {obs[bad].tolist()}")


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.02)


def run_phase(work: Path, phase: int, proc: int, spec: dict) -> bool:
    rows, sample_n = int(spec["rows"]), int(spec["sample_n"])
    client = BufferClient.connect(spec["name"], seed=proc)
    (work / f"ready-{phase}-{proc}").touch()
    wait_for(work / f"go-{phase}")

    inserted: list[tuple[int, int]] = []
    sampled: list[tuple[int, int]] = []
    latencies: list[float] = []
    errors: list[str] = []

    def writer() -> None:
        try:
            for seq in range(int(spec["extends"])):
                td = batch(proc, seq, rows)
                index = client.extend(td)
                inserted.extend(zip(td["key"].tolist(), index.tolist()))
        except BaseException:  # reported to the test, which fails on any
            errors.append(traceback.format_exc())

    def sampler() -> None:
        try:
            for _ in range(int(spec["samples"])):
                t0 = time.perf_counter()
                td = client.sample(sample_n)
                latencies.append(time.perf_counter() - t0)
                check_rows(td)
                sampled.extend(zip(td["index"].tolist(), td["key"].tolist()))
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=writer), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {"proc": proc, "inserted": inserted, "sampled": sampled, "latencies": latencies, "errors": errors}
    tmp = work / f"result-{phase}-{proc}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(work / f"result-{phase}-{proc}.json")
    return not errors


def main() -> int:
    work, proc = Path(sys.argv[1]), int(sys.argv[2])
    phases = json.loads((work / "plan.json").read_text())
    wait_for(work / "up")
    ok = True
    for phase, spec in enumerate(phases):
        ok = run_phase(work, phase, proc, spec) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
