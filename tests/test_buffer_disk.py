"""Disk: sparse overcommit, a full disk as a clean OSError, and ``check_buffer``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from crash_writer import expected_rows
from rlfleet.buffer import ReplayBuffer
from rlfleet.buffer.check import check_buffer
from rlfleet.buffer.indices import counter_of
from rlfleet.launch.check import check, check_arguments


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cartpole_rows(first: int, n: int) -> dict[tuple[str, ...], np.ndarray]:
    idx = np.arange(first, first + n)
    obs = np.repeat(idx[:, None].astype(np.float32), 4, axis=1)
    return {
        ("observation",): obs, ("next", "observation"): obs + 1, ("action",): idx,
        ("reward",): np.ones(n, np.float32), ("done",): idx % 100 == 99,
    }


def test_one_terabyte_sparse_buffer_stays_small(tmp_path):
    path = tmp_path / "big"
    rb = ReplayBuffer.create(path, capacity="1TB", overcommit=True, seed=0)
    rss_before = rss_bytes()
    for first in range(0, 50_000, 5_000):
        rb.extend_arrays(cartpole_rows(first, 5_000))
    for _ in range(50):
        batch = rb.sample_arrays(256)
        assert np.array_equal(batch[("action",)], counter_of(batch[("index",)]))
    assert rb.capacity == 10**12 // (16 + 16 + 8 + 4 + 1)
    stats = rb.stats()
    assert stats["size"] == 50_000
    # disk: the rows written plus the blocks reserved ahead of the cursor, not 1 TB
    assert stats["bytes_on_disk"] < 200 * 2**20
    assert rss_bytes() - rss_before < 200 * 2**20
    rb.close()
    assert sum(f.stat().st_size for f in (path / "data").rglob("*.memmap")) >= 10**12 - 64
    with ReplayBuffer.open(path) as rb:
        assert len(rb) == 50_000 and int(rb[-1]["action"]) == 49_999


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB tmpfs mounted under tmp_path (needs mount rights: root here and in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        reason = f"cannot mount a small tmpfs here: {res.stderr.decode().strip()}"
        print(f"disk-full suite skipped: {reason}")  # -ra shows the skip reason as well
        pytest.skip(reason)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_a_clean_oserror(small_disk, capsys):
    path = small_disk / "b"
    with ReplayBuffer.create(path, capacity=100_000) as rb:  # 100 MB of rows on an 8 MB disk
        with pytest.raises(ValueError, match=r"capacity=100000 needs .* but only .* is free .*overcommit=True"):
            rb.extend_arrays(expected_rows(np.arange(10)))
        assert rb.schema is None
    # a filler file, deleted later to show that the buffer writes on once space is back
    filler = small_disk / "filler"
    filler.write_bytes(b"\1" * 256 * 1024)
    path2 = small_disk / "c"
    rb = ReplayBuffer.create(path2, capacity=100_000, overcommit=True)
    first = 0
    with pytest.raises(OSError, match=r"extend: cannot reserve \d+ bytes on disk for .*\.memmap .*No space left"):
        while first < 100_000:
            rb.extend_arrays(expected_rows(np.arange(first, first + 500)))
            first += 500
    assert 0 < first < 100_000
    assert len(rb) == first and rb.total_inserted == first  # the failed batch left no trace
    # then row by row: the error comes at the first row whose disk blocks cannot be had
    with pytest.raises(OSError, match=r"No space left") as err:
        while first < 100_000:
            rb.extend_arrays(expected_rows(np.arange(first, first + 1)))
            first += 1
    assert err.value.errno == errno.ENOSPC and str(path2) in str(err.value)
    failed_at = first
    page = os.sysconf("SC_PAGE_SIZE")
    free_at_failure = shutil.disk_usage(small_disk).free
    assert free_at_failure < page  # the disk really was full for that row, not earlier
    assert len(rb) == first and rb.total_inserted == first
    batch = rb.sample(100)
    assert np.array_equal(batch["x"].numpy(), counter_of(batch["index"].numpy()))
    # the process lives and the buffer works on once space comes back
    filler.unlink()
    rb.extend_arrays(expected_rows(np.arange(first, first + 10)))
    first += 10
    rb.close()
    report = check_buffer(path2)
    assert report.ok and report.size == first and report.rows_checked == first
    with ReplayBuffer.open(path2) as rb:
        assert len(rb) == first and rb.total_inserted == first
        got = rb[:]
        for key, want in expected_rows(np.arange(first)).items():
            assert np.array_equal(got.get(key).numpy(), want), key
    with capsys.disabled():
        print(f"\ndisk-full suite: 8 MB tmpfs, OSError(ENOSPC) at row {failed_at} with "
              f"{free_at_failure} bytes free, process alive, {first} rows written in all, "
              f"rows checked after reopen={first} rows lost=0")


def run_check_cli(path, as_json=False) -> int:
    parser = argparse.ArgumentParser()
    check_arguments(parser)
    return check(parser.parse_args([str(path)] + (["--json"] if as_json else [])))


def test_check_reports_intact_and_damaged_buffers(tmp_path, capsys):
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=50, sampler="prioritized") as rb:
        rb.extend_arrays(expected_rows(np.arange(70)))
    report = check_buffer(path)
    assert report.ok and report.size == 50 and report.total_inserted == 70 and report.rows_checked == 50
    assert report.schema["observation"] == "uint8[16, 64]"
    assert run_check_cli(path) == 0
    assert "OK" in capsys.readouterr().out

    # damage 1: a NaN priority of a live row
    prio = np.memmap(path / "priorities.bin", dtype=np.float64, mode="r+", shape=(50,))
    prio[3] = np.nan
    prio.flush()
    del prio
    report = check_buffer(path)
    assert report.problems == ["priority of slot 3 is nan: not finite and non-negative"]
    assert run_check_cli(path, as_json=True) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["buffers"][0]["problems"] == report.problems

    # damage 2: a truncated data file
    os.truncate(path / "data" / "observation.memmap", 1000)
    report = check_buffer(path)
    assert not report.ok and "observation.memmap is 1000 bytes, expected 51200" in report.problems[0]

    # damage 3: header window past capacity
    header = np.memmap(path / "header.bin", dtype=np.int64, mode="r+", shape=(8,))
    header[2] = 0
    header.flush()
    del header
    assert check_buffer(path).problems == ["header window holds 70 rows, more than capacity 50"]

    report = check_buffer(tmp_path)  # a directory that holds a buffer is not one
    assert not report.is_buffer and not report.ok
    assert report.problems == [f"{tmp_path} has no meta.json: it is not an rlfleet buffer directory"]


def test_check_command_line_on_sharded_directory(tmp_path, capsys):
    from rlfleet.launch.cli import main as cli_main

    for k in range(2):
        with ReplayBuffer.create(tmp_path / "svc" / f"shard-{k}", capacity=10) as rb:
            rb.extend_arrays(expected_rows(np.arange(5 * (k + 1))))
    assert cli_main(["check", str(tmp_path / "svc")]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK") == 2 and "2 shards: all OK" in out
    os.truncate(tmp_path / "svc" / "shard-1" / "data" / "x.memmap", 8)
    assert cli_main(["check", str(tmp_path / "svc")]) == 1
    out = capsys.readouterr().out
    assert "shard-1: DAMAGED" in out and "x.memmap is 8 bytes, expected 80" in out
    assert "2 shards: 1 DAMAGED" in out


def test_check_command_line_exit_statuses(tmp_path, capsys):
    """0 ok or repairable, 1 damaged, 2 not a buffer (with the run directory's buffer named)."""
    from rlfleet.launch.cli import main as cli_main

    run_dir = tmp_path / "run"
    with ReplayBuffer.create(run_dir / "buffer" / "shard-0", capacity=10) as rb:
        rb.extend_arrays(expected_rows(np.arange(4)))
    assert cli_main(["check", str(run_dir)]) == 2
    out = capsys.readouterr().out
    assert out == (f"{run_dir}: not a buffer ({run_dir} has no meta.json; a run directory keeps "
                   f"its buffer in {run_dir / 'buffer'}: run `rlfleet check {run_dir / 'buffer'}`)\n")
    assert cli_main(["check", str(run_dir / "buffer")]) == 0
    assert "1 shards: all OK" not in capsys.readouterr().out  # one shard: no summary line
    missing = tmp_path / "nothing"
    assert cli_main(["check", str(missing)]) == 2
    assert capsys.readouterr().out == f"{missing}: not a buffer ({missing} does not exist)\n"
    (tmp_path / "empty").mkdir()
    assert cli_main(["check", str(tmp_path / "empty")]) == 2
    assert "not a buffer" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert cli_main(["check", str(tmp_path / "file"), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["exit_status"] == 2 and out["buffers"][0]["is_buffer"] is False
    assert out["buffers"][0]["problems"] == [f"{tmp_path / 'file'} is a file, not a buffer directory"]

    # a shard without meta.json inside a sharded directory is damage, not "not a buffer"
    (run_dir / "buffer" / "shard-1").mkdir()
    assert cli_main(["check", str(run_dir / "buffer")]) == 1
    out = capsys.readouterr().out
    assert "shard-1: not a buffer" in out and "2 shards: 1 DAMAGED" in out

    # a kill between the two window stores of an oversized extend: repairable, exit 0
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=10) as rb:
        rb.extend_arrays(expected_rows(np.arange(7)))
    header = np.memmap(path / "header.bin", dtype=np.int64, mode="r+", shape=(8,))
    header[2] = 20  # start of an extend of 23 rows after 7: 7 + 23 - 10
    header.flush()
    del header
    assert cli_main(["check", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"buffer {path}: OK (repairable: header window start=20 > end=7: an extend "
                     f"of more rows than the capacity was killed before its commit; the window "
                     f"opens empty at 7, no committed row lost; ReplayBuffer.open repairs it)")
    assert run_check_cli(path, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["buffers"][0]["repairs"] and out["buffers"][0]["size"] == 0


def test_check_help_documents_the_exit_statuses(capsys):
    from rlfleet.launch.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["check", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--upgrade" in out
    assert "exit status:\n  0  every buffer is intact, or in a state a killed writer leaves" in out
    assert "\n  1  a buffer is damaged" in out and "\n  2  PATH is not a buffer" in out
