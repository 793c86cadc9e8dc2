"""The driver loop of ``rlfleet run`` against validating fakes of the fleet and learner group.

The fakes check the calling protocol (no step before the buffer holds
``min_size_to_sample`` rows, ``resume`` only after ``pause``) and produce frames at a fixed
rate per poll, so the loop's pacing and stop logic are exact and need no Ray.
"""

from __future__ import annotations

import threading
import time

import pytest

from rlfleet.launch.config import parse_config
from rlfleet.launch.session import Session
from rlfleet.launch.rundir import RunDir


class FakeFleet:
    """Makes ``frames_per_poll`` frames at each ``stats()`` unless paused."""

    def __init__(self, frames_per_poll: int, returns_per_poll: list[float] | None = None,
                 first_poll_frames: int = 0) -> None:
        self.frames = first_poll_frames
        self.frames_per_poll = frames_per_poll
        self.paused = False
        self.pauses = 0
        self.returns: list[float] = []
        self.returns_per_poll = returns_per_poll or []

    def stats(self) -> dict:
        if not self.paused:
            self.frames += self.frames_per_poll
            self.returns.extend(self.returns_per_poll)
        return {"frames": self.frames, "episodes": len(self.returns), "recent_returns": self.returns[-100:],
                "policy_version": 0, "restarts": 0}

    def pause(self) -> None:
        assert not self.paused, "pause() while paused"
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        assert self.paused, "resume() while running"
        self.paused = False

    def health_check(self) -> int:
        return 0


class FakeClient:
    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    def __len__(self) -> int:
        return self.fleet.frames

    def stats(self) -> dict:
        return {"total": {"size": self.fleet.frames}, "shards": [{"shard": 0, "pid": 1, "size": self.fleet.frames}]}


class FakeGroup:
    def __init__(self, client: FakeClient, min_rows: int) -> None:
        self.client = client
        self.min_rows = min_rows
        self.steps = 0
        self.calls: list[int] = []
        self.paused_during_steps: list[bool] = []

    def step(self, n: int) -> dict[str, float]:
        assert len(self.client) >= self.min_rows, "stepped before min_size_to_sample rows"
        assert n >= 1
        self.steps += n
        self.calls.append(n)
        self.paused_during_steps.append(self.client.fleet.paused)
        return {"learner/steps": float(self.steps), "learner/loss": 0.5, "learner/policy_version": float(self.steps)}


def _session(tmp_path, text: str, fleet: FakeFleet, stop_event: threading.Event | None = None):
    config = parse_config(text)
    run_dir = RunDir.create(tmp_path, "loop")
    records: list[dict] = []
    session = Session(config, run_dir, 0, 0.0, started=time.monotonic(),
                      progress=records.append, stop_event=stop_event)
    session.fleet = fleet
    session.client = FakeClient(fleet)
    session.group = FakeGroup(session.client, config.buffer.rate_limiter.min_size_to_sample)
    return session, records


def _paced_session(tmp_path, fleet: FakeFleet, total_frames: int, ratio: float, run_extra: str = ""):
    """A session pacing ``ratio`` learner steps per frame, learning from row 256."""
    run = f"total_frames: {total_frames}, learner_steps_per_frame: {ratio}, "
    run += run_extra or "steps_per_iteration: 50, log_every_s: 0.001"
    return _session(tmp_path, "buffer: {rate_limiter: {min_size_to_sample: 256}}\n" f"run: {{{run}}}", fleet)


def test_paced_loop_takes_turns_and_keeps_the_step_ratio(tmp_path):
    fleet = FakeFleet(frames_per_poll=64)
    session, records = _paced_session(tmp_path, fleet, 20000, 1.0)
    session.loop()
    assert session.stop_reason == "total_frames"
    assert session.frames >= 20000
    # Learning starts at the first poll with 256 rows (frame 256); at total_frames the
    # learners take the steps the last frames paid for: one per frame since.
    expected = session.frames - 256
    assert session.group.steps == expected
    assert max(session.group.calls) == 50
    # Turns: the learner only stepped while the collectors were paused.
    assert session.group.paused_during_steps == [True] * len(session.group.calls)
    assert fleet.pauses > 100
    assert records[-1]["frames"] == session.frames
    assert records[-1]["learner/steps"] == session.group.steps
    assert session.run_dir.read_metrics()[-1]["frames"] == session.frames


def test_pacing_counts_from_min_rows_when_the_loop_notices_them_late(tmp_path):
    # The collectors ran unpaced while the loop's first pass was busy: 3000 frames by its
    # first poll. The learners still owe one step per frame since row 256.
    fleet = FakeFleet(frames_per_poll=64, first_poll_frames=3000)
    session, _ = _paced_session(tmp_path, fleet, 8000, 1.0)
    session.loop()
    assert session.stop_reason == "total_frames"
    assert session.group.steps == session.frames - 256
    # the debt of the late start was paid with the collectors paused
    assert session.group.calls[:5] == [50] * 5
    assert session.group.paused_during_steps == [True] * len(session.group.calls)


def test_a_run_that_reaches_total_frames_between_polls_still_takes_the_steps_they_paid_for(tmp_path):
    # The collectors hold the frame budget themselves: all 8000 frames arrive before the
    # loop's first poll (a resumed run with a small target, fast collectors).
    fleet = FakeFleet(frames_per_poll=0, first_poll_frames=8000)
    session, records = _paced_session(tmp_path, fleet, 8000, 0.5)
    session.loop()
    assert session.stop_reason == "total_frames"
    assert session.group.steps == (8000 - 256) // 2
    assert set(session.group.calls[:-1]) == {50}
    assert fleet.pauses == 1 and fleet.paused  # no frames past the budget while the learners finish
    assert records[-1]["learner/steps"] == (8000 - 256) // 2


def test_the_time_limit_cuts_the_last_learner_steps_short_with_a_warning(tmp_path, caplog):
    fleet = FakeFleet(frames_per_poll=0, first_poll_frames=8000)
    session, _ = _paced_session(tmp_path, fleet, 8000, 0.5, "time_limit_s: 5")
    session.started -= 10.0
    with caplog.at_level("WARNING", logger="rlfleet.launch.session"):
        session.loop()
    assert session.stop_reason == "total_frames"
    assert session.group.calls == []
    assert "time_limit_s reached: the learners stop 3872 steps short of the pacing" in caplog.text


def test_unpaced_loop_steps_in_fixed_chunks_and_stops_at_the_target_return(tmp_path):
    fleet = FakeFleet(frames_per_poll=100, returns_per_poll=[500.0])
    session, records = _session(
        tmp_path,
        "buffer: {rate_limiter: {min_size_to_sample: 300}}\n"
        "run: {total_frames: 100000, target_return: 475, return_window: 20, steps_per_iteration: 7}",
        fleet,
    )
    session.loop()
    assert session.stop_reason == "target_return"
    assert fleet.frames == 2000  # the 20th episode arrives with the 20th poll
    assert set(session.group.calls) == {7}
    assert fleet.pauses == 0
    assert records[-1]["return_mean"] == 500.0


def test_stop_event_interrupts_the_loop(tmp_path):
    event = threading.Event()
    event.set()
    fleet = FakeFleet(frames_per_poll=10)
    session, records = _session(tmp_path, "run: {total_frames: 100000}", fleet, stop_event=event)
    session.loop()
    assert session.stop_reason == "interrupted"
    assert session.group.calls == []
    assert len(records) == 1


@pytest.mark.parametrize("limit", [0.3])
def test_time_limit_stops_a_loop_waiting_for_rows(tmp_path, limit):
    fleet = FakeFleet(frames_per_poll=0)
    session, _ = _session(tmp_path, f"run: {{time_limit_s: {limit}}}", fleet)
    session.loop()
    assert session.stop_reason == "time_limit"
    assert session.group.calls == []
