"""``rlfleet bench buffer --quick`` runs and prints every figure in the documented form."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re

import pytest

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
# after the atari lines, with the atari extra (EnvPool Pong)
PONG = ["sample uniform pong 3-step stacks", "sample uniform out= pong 3-step stacks",
        "sample prioritized pong 3-step stacks", "sample prioritized out= pong 3-step stacks"]
HAVE_ENVPOOL = importlib.util.find_spec("envpool") is not None
BYTES = re.compile(r"^pong rows: ([\d,]+) transitions in (\d+) episode\(s\) .*: ([\d,]+) bytes/transition stored "
                   r"with frame_stack, ([\d,]+) with two stacks")


def run(tmp_path, *extra: str) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    bench_buffer.add_arguments(parser)
    args = parser.parse_args(["--quick", "--repeats", "1", "--dir", str(tmp_path), *extra])
    assert bench_buffer.main(args) == 0


def test_quick_bench_prints_every_figure(tmp_path, capsys):
    run(tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    notes = [line for line in lines if line.startswith(("pong ", "bench buffer: skipping"))]
    if HAVE_ENVPOOL:
        assert [n.split(":")[0] for n in notes] == ["pong rows", "pong frame-stack buffer", "pong sample buffer"]
    else:
        assert len(notes) == 1 and notes[0].startswith("bench buffer: skipping the Pong frame-stack figures: ")
        assert 'pip install "rlfleet[' in notes[0]
    lines = [line for line in lines if line not in notes]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    assert [m["name"] for m in parsed] == (EXPECTED[:12] + PONG + EXPECTED[12:] if HAVE_ENVPOOL else EXPECTED)
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


@pytest.mark.atari
def test_pong_rows_take_one_frame_a_transition_on_disk(tmp_path, capsys):
    pytest.importorskip("envpool", reason='needs the atari extra: pip install -e ".[atari]"')
    run(tmp_path, "--schemas", "atari", "--frame-rows", "5000")
    lines = capsys.readouterr().out.splitlines()
    m = next(BYTES.match(line) for line in lines if BYTES.match(line))
    transitions, frames_once, two_stacks = (int(m[i].replace(",", "")) for i in (1, 3, 4))
    assert transitions == 600
    # 84 * 84 frame bytes plus 55 of ids, link, reward and flags, and a reset row per episode
    assert 84 * 84 + 55 <= frames_once <= 7_400
    assert two_stacks == 2 * 4 * 84 * 84 + 47
    pong = [LINE.match(line) for line in lines if "pong 3-step stacks" in line]
    assert [m["name"] for m in pong] == PONG and all(m["limit"] == "prealloc gather" for m in pong)
