"""The run directory, the returns plot and the progress display (no Ray)."""

from __future__ import annotations

import io
import json
import math

import pytest

from rlfleet.launch.config import RunConfig, parse_config
from rlfleet.launch.plots import plot_returns
from rlfleet.launch.progress import Progress, format_progress, format_summary
from rlfleet.launch.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_create_names_the_directory_after_the_run_and_never_reuses_one(tmp_path):
    now = 1_700_000_000.0
    first = RunDir.create(tmp_path / "runs", "cartpole", now=now)
    second = RunDir.create(tmp_path / "runs", "cartpole", now=now)
    assert first.path.parent == tmp_path / "runs"
    assert first.path.name.startswith("cartpole-")
    assert second.path.name == first.path.name + "-2"
    assert first.checkpoints_dir.is_dir() and second.checkpoints_dir.is_dir()


def test_config_round_trips_through_the_run_directory(tmp_path):
    config = parse_config("name: t\nlearner: {lr: 0.003}\npolicy: {hidden: [8]}\nenv: {kwargs: {a: 1}}")
    run_dir = RunDir.create(tmp_path, config.name)
    run_dir.write_config(config)
    assert run_dir.read_config() == config
    assert RunDir.open(run_dir.path).read_config(["learner.lr=0.5"]).learner.lr == 0.5


def test_open_refuses_what_is_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run directory '.*missing' does not exist"):
        RunDir.open(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"holds no config.yaml: it is not a run directory"):
        RunDir.open(tmp_path)


def test_metrics_append_as_json_lines_and_skip_a_torn_tail(tmp_path):
    run_dir = RunDir.create(tmp_path, "m")
    run_dir.append_metrics({"frames": 10, "return_mean": None, "learner/loss": math.nan})
    run_dir.append_metrics({"frames": 20, "return_mean": 12.5})
    with open(run_dir.metrics_path, "a") as f:
        f.write('{"frames": 3')  # a run killed mid-line
    records = run_dir.read_metrics()
    assert records == [
        {"frames": 10, "return_mean": None, "learner/loss": None},
        {"frames": 20, "return_mean": 12.5},
    ]
    lines = run_dir.metrics_path.read_text().splitlines()
    assert json.loads(lines[0]) == records[0]


def test_summary_round_trips(tmp_path):
    run_dir = RunDir.create(tmp_path, "s")
    assert run_dir.read_summary() is None
    run_dir.write_summary({"frames": 5, "mean_return": math.inf})
    assert run_dir.read_summary() == {"frames": 5, "mean_return": None}


def test_plot_writes_a_png_with_and_without_data(tmp_path):
    records = [{"frames": f, "return_mean": f / 10, "learner/steps": f // 4} for f in range(0, 5000, 500)]
    records.insert(3, {"frames": 1200, "return_mean": None})
    path = plot_returns(records, tmp_path / "returns.png", title="t", target_return=400)
    assert path.read_bytes()[:8] == PNG_MAGIC
    empty = plot_returns([], tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("*.tmp*"))


def test_progress_prints_plain_lines_off_a_terminal():
    out = io.StringIO()
    display = Progress(out)
    assert display.live is False
    display.update({"wall_s": 3.2, "frames": 12_345, "frames_per_s": 2000.0, "buffer/size": 12_000,
                    "learner/steps": 800, "learner/steps_per_s": 250.0, "return_mean": 31.25,
                    "episodes": 400, "learner/policy_lag": 1.5})
    display.update({"frames": 0})
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "3s  frames 12.3k  (2.0k/s)  buffer 12.0k  learner 800 steps (250/s)  return 31.2  "
        "episodes 400  lag 1.5 learner steps"
    )
    assert lines[1] == format_progress({"frames": 0})
    assert "return -" in lines[1]


def test_progress_rewrites_one_line_on_a_terminal_and_ends_it_before_the_summary():
    out = io.StringIO()
    display = Progress(out, live=True)
    display.update({"frames": 1})
    display.update({"frames": 2})
    display.summary({"run_dir": "runs/x", "stop_reason": "target_return", "frames": 2, "wall_s": 1.0})
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 2
    assert "\nrun finished\n" in text
    assert "stopped by" in text and "target_return" in text


def test_summary_table_aligns_its_rows():
    table = format_summary({"run_dir": "r", "frames": 10, "wall_s": 2.5, "mean_return": 500.0,
                            "policy_path": "r/policy.pt2"})
    rows = table.splitlines()
    assert rows[0].split() == ["run", "directory", "r"]
    assert "mean return (last episodes)  500.0" in table
    assert rows[-1].endswith("r/policy.pt2")
    column = 2 + len("mean return (last episodes)") + 2  # the longest label sets the column
    assert all(row[column - 2:column] == "  " and row[column] != " " for row in rows)


def test_default_config_is_what_an_empty_file_gives():
    assert parse_config("") == RunConfig()


def test_a_log_record_never_lands_on_the_live_line():
    import logging

    out = io.StringIO()
    display = Progress(out, live=True)
    logger = logging.getLogger("rlfleet.test.progress")
    logger.propagate = False
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        with display.keep_logs_apart(logger):
            display.update({"frames": 1})
            logger.warning("restarted 1 collector actor(s)")
        assert logger.handlers == [handler]  # put back as it was
    finally:
        logger.removeHandler(handler)
    line = format_progress({"frames": 1})
    # the line, wiped before the record, the record on a line of its own, the line again
    assert out.getvalue() == f"\r\x1b[2K{line}\r\x1b[2KWARNING restarted 1 collector actor(s)\n{line}"


def test_summary_shows_start_up_apart_from_collecting_and_lag_in_learner_steps():
    table = format_summary({"run_dir": "r", "frames": 6016, "wall_s": 39.7, "startup_s": 30.9,
                            "frames_per_s": 807.2})
    assert "  start-up                     30.9 s (Ray, placement, actors)" in table.splitlines()
    assert "  frames/s collecting          807" in table.splitlines()
    assert format_progress({"learner/policy_lag": 411.7}).endswith("lag 411.7 learner steps")
