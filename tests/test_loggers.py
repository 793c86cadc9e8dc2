"""``run.loggers``: TensorBoard and W&B get what ``metrics.jsonl`` gets, and resume with the run.

A real run of ``configs/smoke.yaml`` (cut to 768 frames) on the shared Ray cluster, then a
``--resume`` session of it, both with ``run.loggers=[tensorboard, wandb]`` and W&B offline
(through the config: nothing touches the network). The test reads back what the run left:
the TensorBoard event files with TensorBoard's own ``EventAccumulator``, and the W&B
offline run files (``run-<id>.wandb``, a LevelDB-style log of W&B protobuf records; 0.31
ships no Python reader for them, so a dozen lines here read it).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from rlfleet.launch import load_config, run
from rlfleet.launch.config import ConfigError, apply_overrides, parse_config, RunConfig
from rlfleet.launch.loggers import LoggerError, LoggerGroup, TensorBoardLogger, import_logger_module, scalars
from rlfleet.launch.rundir import RunDir
from rlfleet.launch.session import Session

ROOT = Path(__file__).resolve().parent.parent
FIRST_FRAMES, SECOND_FRAMES = 768, 1280
SMALL = [
    "collector.init_random_frames=256", "buffer.rate_limiter.min_size_to_sample=256", "policy.hidden=[16]",
    "run.log_every_s=0.2", "learner.checkpoint_every=100000",
    "run.loggers=[tensorboard, wandb]", "run.wandb.mode=offline", "run.wandb.project=rlfleet-tests",
    "run.wandb.tags=[ci]",
]


def _numeric(record: dict) -> dict:
    """What a logger must get of a metrics.jsonl record: its numbers, but the wall clock."""
    return {k: v for k, v in record.items()
            if k != "time" and isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- W&B files


def _wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, version),
    then 32 KiB blocks of chunks, each ``crc32 (4) | length (2) | type (1) | data``;
    types 1 full, 2 first, 3 middle, 4 last; a block tail under 7 bytes is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        body, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = body if kind in (1, 2) else pending + body
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _wandb_session(offline_dir: Path) -> dict:
    """One offline session's run id, config, history rows and metric definitions."""
    (path,) = offline_dir.glob("run-*.wandb")
    got: dict = {"history": [], "metrics": []}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            got["run_id"] = record.run.run_id
            got["project"] = record.run.project
            got["tags"] = list(record.run.tags)
            got["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            got["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "metric":
            got["metrics"].append((record.metric.name or record.metric.glob_name, record.metric.step_metric))
    return got


# --------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def logged_run(ray_cluster, tmp_path_factory):
    """A run of 768 frames, then a --resume session to 1280; the run directory, the
    metrics records of each session, and the frames the first one ended at."""
    root = tmp_path_factory.mktemp("runs")
    config = load_config(ROOT / "configs" / "smoke.yaml", [f"run.dir={root}", f"run.total_frames={FIRST_FRAMES}", *SMALL])
    first = run(config)
    assert first.stop_reason == "total_frames", first
    first_records = RunDir(first.run_dir).read_metrics()
    # what `rlfleet run --resume RUN_DIR run.total_frames=1280` does
    resumed = RunDir.open(first.run_dir).read_config([f"run.total_frames={SECOND_FRAMES}"])
    second = run(resumed, resume=first.run_dir)
    assert second.stop_reason == "total_frames" and second.run_dir == first.run_dir, second
    records = RunDir(first.run_dir).read_metrics()
    assert records[:len(first_records)] == first_records
    return first.run_dir, first_records, records[len(first_records):], first.frames


def test_tensorboard_holds_every_number_of_every_record_at_its_frames(logged_run):
    from tensorboard.backend.event_processing import event_accumulator as ea

    run_dir, first, second, _ = logged_run
    records = first + second
    assert len(first) >= 2 and len(second) >= 2
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in _numeric(record).items():
            # TensorBoard stores a scalar as float32
            expected.setdefault(key, []).append((record["frames"], float(np.float32(value))))
    assert {"frames", "frames_per_s", "return_mean", "buffer/size", "buffer/fill", "buffer/insert_wait_s",
            "buffer/sample_wait_s", "buffer/priority_updates_skipped", "learner/loss",
            "learner/policy_lag"} <= set(expected)

    acc = ea.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == points, tag


def test_tensorboard_shows_the_config_as_hparams_and_as_yaml(logged_run):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, *_ = logged_run
    acc = ea.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["learner.lr"].number_value == pytest.approx(0.003)
    assert hparams["run.total_frames"].number_value == FIRST_FRAMES  # the first session's config
    assert hparams["env.id"].string_value == "CartPole-v1"
    assert hparams["learner.double_dqn"].string_value == "true"
    assert hparams["run.loggers"].string_value == "['tensorboard', 'wandb']"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["return_mean", "frames_per_s", "learner/steps"]
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("config/text_summary")]
    assert len(texts) == 2  # one per session
    assert texts[0].startswith("```yaml\nname: smoke\n") and f"total_frames: {FIRST_FRAMES}\n" in texts[0]
    assert f"total_frames: {SECOND_FRAMES}\n" in texts[1]  # each session's own overrides


def test_wandb_offline_run_holds_every_record_and_the_config(logged_run):
    run_dir, first, second, _ = logged_run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    sessions = [_wandb_session(d) for d in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))]
    assert len(sessions) == 2
    rows = [row for s in sessions for row in s["history"]]
    records = first + second
    # W&B's _step is the record's position in metrics.jsonl, over both sessions
    assert [row.pop("_step") for row in rows] == list(range(len(records)))
    for row in rows:
        del row["_runtime"], row["_timestamp"]
    assert rows == [_numeric(r) for r in records]
    for session in sessions:
        assert (session["project"], session["tags"]) == ("rlfleet-tests", ["ci"])
        assert ("frames", "") in session["metrics"] and ("*", "frames") in session["metrics"]  # frames: the x-axis
        assert session["config"]["learner"]["lr"] == pytest.approx(0.003)
        assert session["config"]["run"]["loggers"] == ["tensorboard", "wandb"]
    assert [s["config"]["run"]["total_frames"] for s in sessions] == [FIRST_FRAMES, SECOND_FRAMES]


def test_resume_continues_the_tensorboard_directory_and_the_wandb_run(logged_run):
    run_dir, first, second, first_frames = logged_run
    # one TensorBoard directory, one event file per session; steps go on from the resume
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert second[0]["frames"] == first_frames >= FIRST_FRAMES
    assert [r["frames"] for r in first + second] == sorted(r["frames"] for r in first + second)
    # one W&B run id, kept in the run directory, used by both sessions
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[1] for d in offline] == [run_id, run_id]
    assert [_wandb_session(d)["run_id"] for d in offline] == [run_id, run_id]


# --------------------------------------------------------------------------- without Ray


def test_a_missing_logger_package_names_the_extra_to_install():
    packages = {"tensorboard": ("rlfleet_no_such_module.tensorboard", "tensorboard")}
    with pytest.raises(LoggerError) as info:
        import_logger_module("tensorboard", packages)
    assert str(info.value).startswith(
        "run.loggers includes 'tensorboard' but the tensorboard package is not installed: "
        'pip install "rlfleet[tensorboard]" (import rlfleet_no_such_module.tensorboard failed: '
        "No module named 'rlfleet_no_such_module'"
    )
    assert isinstance(info.value, RuntimeError)  # `rlfleet run` prints it as one line
    assert import_logger_module("wandb").__name__ == "wandb"


BAD_LOGGERS = [
    ("unknown", "run: {loggers: [tensorbord]}", r"^<string>: run.loggers\[0\]: 'tensorbord' is not one of 'tensorboard', 'wandb'$"),
    ("unknown_second", "run: {loggers: [wandb, mlflow]}", r"run.loggers\[1\]: 'mlflow' is not one of 'tensorboard', 'wandb'$"),
    ("twice", "run: {loggers: [wandb, wandb]}", r"run.loggers\[1\]: 'wandb' is listed twice in \['wandb', 'wandb'\]$"),
    ("not_a_list", "run: {loggers: tensorboard}", r"run.loggers: expected list of 'tensorboard' \| 'wandb', got 'tensorboard'"),
    ("wandb_mode", "run: {wandb: {mode: cloud}}", r"run.wandb.mode: 'cloud' is not one of 'online', 'offline', 'disabled'$"),
]


@pytest.mark.parametrize("text,match", [c[1:] for c in BAD_LOGGERS], ids=[c[0] for c in BAD_LOGGERS])
def test_an_unknown_logger_is_a_config_error(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(text)


def test_logger_overrides_on_the_command_line():
    config = apply_overrides(RunConfig(), ["run.loggers=[tensorboard, wandb]", "run.wandb.mode=offline"])
    assert config.run.loggers == ("tensorboard", "wandb") and config.run.wandb.mode == "offline"
    assert apply_overrides(config, ["run.loggers=[]"]).run.loggers == ()
    with pytest.raises(ConfigError, match=r"^override 'run.loggers=\[tb\]': run.loggers\[0\]: 'tb' is not one of"):
        apply_overrides(config, ["run.loggers=[tb]"])


def test_scalars_are_the_numeric_leaves_flattened_with_slashes():
    record = {"time": 1.7e9, "frames": 640, "return_mean": None, "loss": float("nan"), "ok": True,
              "learner": {"loss": 0.5, "name": "dqn", "deep": {"x": 2}}, "buffer/size": np.int64(7)}
    assert scalars(record) == {"frames": 640, "ok": 1, "learner/loss": 0.5, "learner/deep/x": 2, "buffer/size": 7}


class _BrokenLogger:
    """A logger whose backend fails on the second record (a full disk, a lost W&B service)."""

    def __init__(self) -> None:
        self.written, self.closed = 0, []

    def write(self, record) -> None:
        self.written += 1
        if self.written == 2:
            raise OSError("no space left on device")

    def close(self, *, failed: bool = False) -> None:
        self.closed.append(failed)


def test_a_failing_logger_is_dropped_and_metrics_jsonl_keeps_every_record(tmp_path, caplog):
    from tensorboard.backend.event_processing import event_accumulator as ea

    config = parse_config("run: {loggers: [tensorboard]}")
    run_dir = RunDir.create(tmp_path, "broken")
    broken = _BrokenLogger()
    session = Session(config, run_dir, 0, 0.0, started=time.monotonic(), progress=None, stop_event=None)
    session.loggers = LoggerGroup({"broken": broken, "tensorboard": TensorBoardLogger(run_dir, config)})
    for frames in (0, 100, 200):
        session.frames = frames
        session.log(0.0)
    session.stop_reason = "total_frames"
    session.loggers.close()
    assert [r["frames"] for r in run_dir.read_metrics()] == [0, 100, 200]
    assert (broken.written, broken.closed) == (2, [True])  # closed once, as failed, then left alone
    assert "the broken logger failed; it gets no more records (metrics.jsonl keeps every one)" in caplog.text
    acc = ea.EventAccumulator(str(run_dir.tensorboard_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("frames")] == [0, 100, 200]  # the others go on


WITHOUT_EXTRAS = r'''
import sys, tempfile
for name in ("wandb", "tensorboard", "torch.utils.tensorboard", "tensorboardX"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import rlfleet.launch.cli, rlfleet.launch.job, rlfleet.launch.session  # nothing imports them eagerly
from rlfleet.launch.config import RunConfig, apply_overrides
from rlfleet.launch.loggers import LoggerError, open_loggers
from rlfleet.launch.preflight import check_loggers
from rlfleet.launch.rundir import RunDir
config = RunConfig()
check_loggers(config)
run_dir = RunDir.create(tempfile.mkdtemp(), "plain")
loggers = open_loggers(config, run_dir, frames_before=0, records_before=0)
loggers.write({"frames": 1, "fps": 2.0})
loggers.close(failed=False)
for name in ("tensorboard", "wandb"):
    try:
        check_loggers(apply_overrides(config, [f"run.loggers=[{name}]"]))
    except LoggerError as e:
        print(e)
'''


def test_a_run_without_the_logger_extras_installed_needs_none_and_says_which_to_install():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("run.loggers includes 'tensorboard' but the tensorboard package is not installed: "
                               'pip install "rlfleet[tensorboard]" (import torch.utils.tensorboard failed')
    assert lines[1].startswith("run.loggers includes 'wandb' but the wandb package is not installed: "
                               'pip install "rlfleet[wandb]" (import wandb failed')


def test_a_record_after_a_torn_metrics_line_starts_a_line_of_its_own(tmp_path):
    run_dir = RunDir.create(tmp_path, "torn")
    run_dir.append_metrics({"frames": 1})
    with open(run_dir.metrics_path, "a") as f:
        f.write('{"frames": 2, "fp')  # a session killed mid-write
    run_dir.append_metrics({"frames": 3})
    assert [r["frames"] for r in run_dir.read_metrics()] == [1, 3]
