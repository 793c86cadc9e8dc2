"""``rlfleet bench buffer --quick`` runs and prints every figure in the documented form."""

from __future__ import annotations

import argparse
import json
import re

from rlfleet.launch.bench import buffer as bench_buffer

LINE = re.compile(
    r"^(?P<name>\S.*?)\s{2,}(?P<setting>\S+)\s+(?P<gbps>[\d.]+) GB/s\s+(?P<rows>[\d,]+) rows/s"
    r"\s+(?P<ratio>[\d.]+)x (?P<limit>.+?) \((?P<limit_value>[\d.,]+) (?:GB/s|rows/s)\)(?P<rest>.*)$"
)

EXPECTED = [
    "write cartpole filling", "write cartpole steady", "sample uniform cartpole",
    "sample uniform cartpole out=", "sample_arrays uniform cartpole", "sample+update prioritized cartpole",
    "write atari filling", "write atari steady", "sample uniform atari", "sample uniform atari out=",
    "sample_arrays uniform atari", "sample+update prioritized atari",
    "sample sequence cartpole 10,000 rows", "sample sequence cartpole 100,000 rows",
]


def run(tmp_path, *extra: str) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    bench_buffer.add_arguments(parser)
    args = parser.parse_args(["--quick", "--repeats", "1", "--dir", str(tmp_path), *extra])
    assert bench_buffer.main(args) == 0


def test_quick_bench_prints_every_figure(tmp_path, capsys):
    run(tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    assert [m["name"] for m in parsed] == EXPECTED
    for m in parsed:
        assert float(m["gbps"]) >= 0 and int(m["rows"].replace(",", "")) > 0 and float(m["ratio"]) > 0
    limits = {m["name"]: m["limit"] for m in parsed}
    assert limits["write cartpole filling"] == "np.memmap fill"
    assert limits["write atari steady"] == "np.memmap write"
    assert "memcpy" in parsed[1]["rest"]
    assert limits["sample uniform atari"] == limits["sample uniform cartpole out="] == "prealloc gather"
    assert "fresh gather" in parsed[2]["rest"]
    assert limits["sample+update prioritized cartpole"] == "uniform sample"
    assert limits["sample sequence cartpole 100,000 rows"] == "at 10,000 rows"
    assert list(tmp_path.iterdir()) == []  # scratch files removed


def test_quick_bench_json(tmp_path, capsys):
    run(tmp_path, "--json", "--schemas", "cartpole")
    out = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in out["results"]]
    assert names == [n for n in EXPECTED if "atari" not in n]
    for r in out["results"]:
        assert r["rows_per_s"] > 0 and r["limits"] and r["limits"][0]["ratio"] > 0
