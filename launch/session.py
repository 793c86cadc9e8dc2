"""One session of ``rlfleet run``: the paced driver loop, its stop rules, its metrics, and
its shutdown (checkpoint, policy export, plot, summary).

Runs on the driver, inside :func:`rlfleet.launch.run.run`, which starts the parts and
hands them to a :class:`Session`; the session then holds everything that must be stopped
on every exit path. ``Session.loop`` learns, polls the fleet, writes ``metrics.jsonl``
(then hands each record to the run's loggers: TensorBoard, W&B) and paces (see ``run``'s
docstring); ``Session.finish`` stops the collectors, saves the final checkpoint and
policy, stops the learners and the service, writes ``summary.json`` and ``returns.png``,
and closes the loggers. Not thread-safe: one driver thread drives a session
(``stop_event`` may be set from any thread).

Split from ``job.py``: start-up (what to start, in which order) reads on its own there,
and the loop and shutdown share this one object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlfleet.launch.config import RunConfig
from rlfleet.launch.rundir import RunDir

__all__ = ["NODE_LOSS_WAIT_S", "Session", "Stop", "mean", "window_returns"]

logger = logging.getLogger(__name__)

# Longest wait for Ray to declare a silent node dead (its health check gives up after
# about 15 s), so an error caused by a lost shard is reported as that loss.
NODE_LOSS_WAIT_S = 30.0


class Stop:
    """Why the loop should stop now, or None."""

    def __init__(self, config: RunConfig, frames_before: int, started: float) -> None:
        self.run = config.run
        self.frames_before = frames_before
        self.started = started

    def __call__(self, frames: int, recent_returns: list[float], now: float) -> str | None:
        if frames >= self.run.total_frames:
            return "total_frames"
        if self.run.target_return is not None and len(recent_returns) >= self.run.return_window:
            if mean(recent_returns[-self.run.return_window:]) >= self.run.target_return:
                return "target_return"
        if now - self.started >= self.run.time_limit_s:
            return "time_limit"
        return None


def window_returns(stats: dict[str, Any], window: int) -> list[float]:
    """The returns of about the last ``window`` episodes, an equal share from each collector.

    The fleet's ``recent_returns`` lists collectors one after the other, so its tail
    would be one collector's episodes; each collector's own list is in time order.
    """
    reports = [r for r in stats.get("collectors") or [] if r and "recent_returns" in r]
    if len(reports) > 1:
        share = -(-window // len(reports))
        return [float(x) for r in reports for x in list(r["recent_returns"])[-share:]]
    return [float(x) for x in list(stats.get("recent_returns", []))[-window:]]


def mean(values: list[float]) -> float | None:
    """The mean of ``values``, None for none."""
    return sum(values) / len(values) if values else None


class Session:
    """The state of one session of a run, so that Ctrl-C anywhere still finishes it well."""

    def __init__(self, config, run_dir, frames_before, wall_before, started, progress, stop_event) -> None:
        self.config: RunConfig = config
        self.run_dir: RunDir = run_dir
        self.frames_before = frames_before
        self.wall_before = wall_before
        self.started = started
        self.progress = progress
        self.stop_event = stop_event
        self.service_name = ""
        self.buffer_path: Path | None = None
        self.placement = None
        self.service = self.client = self.fleet = self.group = None
        # the run's TensorBoard / W&B loggers (a LoggerGroup), opened by the job
        self.loggers = None
        self.stop_reason = "error"
        # when the collectors were let go: start-up ends there, collection rates start there
        self.collecting_since: float | None = None
        self.frames = frames_before
        self.stats: dict[str, Any] = {}
        self.learner_metrics: dict[str, float] = {}
        # shard number -> pid last seen: a new pid means Ray restarted that shard
        self.shard_pids: dict[int, int] = {}
        self.shard_restarts = 0

    def loop_or_report_lost_shards(self) -> None:
        """``loop``; when a shard's node left the cluster, raise saying so instead."""
        try:
            self.loop()
        except Exception as e:
            if self.stop_reason == "node_lost":  # raised by the loop's own check
                raise
            # A lost node surfaces first as a failed sample, insert or learner call; when
            # shards live on other nodes, give Ray the time to notice the node is gone.
            multi_node = len(set(self.placement.shard_nodes)) > 1 if self.placement else False
            self.raise_if_shards_lost(NODE_LOSS_WAIT_S if multi_node else 0.0, cause=e)
            raise

    def raise_if_shards_lost(self, wait_s: float = 0.0, cause: BaseException | None = None) -> None:
        """Raise ``ShardUnavailable`` naming node and shards if a shard's node is gone."""
        from rlfleet.buffer import ShardUnavailable

        if self.placement is None:
            return
        deadline = time.monotonic() + wait_s
        while True:
            message = self.placement.lost_shards_message(self.service_name, self.buffer_path)
            if message:
                self.stop_reason = "node_lost"
                raise ShardUnavailable(message) from cause
            if time.monotonic() >= deadline:
                return
            time.sleep(1.0)

    def loop(self) -> None:
        """Learn, poll, log and pace until a stop condition; sets ``stop_reason``."""
        config, section = self.config, self.config.run
        fleet, group, client = self.fleet, self.group, self.client
        should_stop = Stop(config, self.frames_before, self.started)
        limiter = config.buffer.rate_limiter
        # with a samples-per-insert ratio over several shards the minimum is buffer-wide
        # (shard 0 keeps the buffer's counts), otherwise every shard needs its own
        buffer_wide = limiter.samples_per_insert is not None and config.buffer.num_shards > 1
        min_rows = limiter.min_size_to_sample * (1 if buffer_wide else config.buffer.num_shards)
        k = section.steps_per_iteration
        ratio = section.learner_steps_per_frame
        learn_start_frames: int | None = None
        steps_this_session = 0
        paused = False
        last_log = last_health = 0.0
        last_frames, last_time = self.frames, time.monotonic()
        while True:
            now = time.monotonic()
            self.stats = fleet.stats()
            self.frames = self.frames_before + int(self.stats.get("frames", 0))
            recent = window_returns(self.stats, section.return_window)
            if self.stop_event is not None and self.stop_event.is_set():
                reason = "interrupted"
            else:
                reason = should_stop(self.frames, recent, now)
            # With pacing, a run that reached total_frames still owes the learner steps its
            # last frames paid for (the collectors hold the frame budget themselves and can
            # reach it between two polls): take them before stopping, within time_limit_s,
            # with the collectors paused (the last grant may round the budget up by a batch).
            if reason == "total_frames" and ratio is not None:
                if learn_start_frames is None and len(client) >= min_rows:
                    learn_start_frames = self._learn_start(len(client), min_rows)
                owed = 0.0
                if learn_start_frames is not None:
                    owed = ratio * (self.frames - learn_start_frames) - steps_this_session
                if owed >= 1 and now - self.started < section.time_limit_s:
                    reason = None
                elif owed >= 1:
                    logger.warning("time_limit_s reached: the learners stop %d steps short of the pacing", int(owed))
            if now - last_log >= section.log_every_s or reason:
                fps = (self.frames - last_frames) / max(now - last_time, 1e-9) if last_log else 0.0
                last_frames, last_time = self.frames, now
                self.log(fps)
                last_log = now
            if reason:
                self.stop_reason = reason
                return
            if now - last_health >= 5.0:
                self.raise_if_shards_lost()
                restarted = fleet.health_check()
                if restarted:
                    logger.warning("restarted %d collector actor(s)", restarted)
                last_health = now
            if learn_start_frames is None:
                rows = len(client)
                if rows < min_rows:
                    time.sleep(0.1)
                    continue
                learn_start_frames = self._learn_start(rows, min_rows)
            if ratio is None:
                self.learner_metrics = group.step(k)
                continue
            # Paced: collectors and learners take turns. The collectors run until the
            # learners owe at least one step, then wait while the learners catch up, so
            # every frame is collected by weights at most one round old and the ratio
            # holds to one collector batch whatever the relative speeds.
            behind = ratio * (self.frames - learn_start_frames) - steps_this_session
            if behind >= 1:
                if not paused:
                    fleet.pause()
                    paused = True
                n = int(min(k, behind))
                self.learner_metrics = group.step(n)
                steps_this_session += n
            else:
                if paused:
                    fleet.resume()
                    paused = False
                time.sleep(0.02)

    def _learn_start(self, rows: int, min_rows: int) -> int:
        """The frame that brought the buffer to ``min_rows``, where pacing counts from.

        Not the frame the loop first saw them at: the rows past ``min_rows`` were collected
        since (a slow first pass of the loop lets the collectors run on unpaced for
        thousands of frames).
        """
        return self.frames - min(rows - min_rows, self.frames - self.frames_before)

    def log(self, fps: float) -> None:
        """Append one metrics record and show it."""
        recent = window_returns(self.stats, self.config.run.return_window)
        record: dict[str, Any] = {
            "time": time.time(),
            "wall_s": time.monotonic() - self.started + self.wall_before,
            "frames": self.frames,
            "frames_per_s": fps,
            "episodes": int(self.stats.get("episodes", 0)),
            "return_mean": mean(recent[-self.config.run.return_window:]),
            "return_last": recent[-1] if recent else None,
            **self._buffer_numbers(),
            "collector/policy_version": self.stats.get("policy_version"),
            "collector/restarts": self.stats.get("restarts", 0),
            "collector/next_incarnation": self.stats.get("next_incarnation", 0),
            "learner/steps": 0,
        }
        record.update(self.learner_metrics)
        self.run_dir.append_metrics(record)  # first: the file is the record of the run
        if self.loggers is not None:
            self.loggers.write(record)  # never raises: a failing logger is dropped
        if self.progress is not None:
            self.progress(record)

    def _buffer_numbers(self) -> dict[str, float]:
        """Rows in the buffer and its fill, the rate limiter's waits so far (seconds the
        collectors' inserts and the learners' samples were held, summed over shards),
        priority updates skipped (overwritten rows), and shard restarts seen so far (a
        shard answering from a new process). ``stats`` never raises: a shard that does
        not answer is left out."""
        if self.client is None:
            return {"buffer/size": 0, "buffer/restarts": self.shard_restarts}
        stats = self.client.stats()
        for row in stats["shards"]:
            k, pid = row.get("shard"), row.get("pid")
            if pid is None:
                continue
            if self.shard_pids.get(k, pid) != pid:
                self.shard_restarts += 1
                logger.warning("replay shard %d was restarted (its committed rows are kept)", k)
            self.shard_pids[k] = pid
        # rlfleet's client reports all of these; a client that reports only sizes gives only the size
        total = stats["total"]
        limiter = total.get("rate_limiter", {})
        numbers = {"buffer/size": int(total["size"]), "buffer/restarts": self.shard_restarts}
        if total.get("capacity"):
            numbers["buffer/fill"] = total["size"] / total["capacity"]
        for key in ("insert_wait_s", "sample_wait_s"):
            if key in limiter:
                numbers[f"buffer/{key}"] = float(limiter[key])
        if "priority_updates_skipped" in total:
            numbers["buffer/priority_updates_skipped"] = int(total["priority_updates_skipped"])
        return numbers

    def finish(self, observation_space: Any, action_space: Any) -> dict[str, Any]:
        """Stop what was started, write the run's files; logs (never raises) on cleanup errors.

        The loggers are closed last, whatever happens before."""
        try:
            return self._finish(observation_space, action_space)
        finally:
            if self.loggers is not None:
                self.loggers.close(failed=self.stop_reason in ("error", "node_lost"))

    def _finish(self, observation_space: Any, action_space: Any) -> dict[str, Any]:
        import torch

        from rlfleet.buffer import ReplayService
        from rlfleet.launch.plots import plot_returns

        run_dir, config = self.run_dir, self.config
        ended = time.monotonic()

        def attempt(what: str, fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception:
                logger.exception("while stopping the run: %s failed", what)
                return None

        if self.fleet is not None:
            final = attempt("collector stats", self.fleet.stats)
            if final:
                self.stats = final
                self.frames = self.frames_before + int(final.get("frames", 0))
            attempt("stopping the collectors", self.fleet.stop)
        policy_path = None
        if self.group is not None:
            attempt("the final checkpoint", self.group.save_checkpoint)
            state = attempt("reading the policy", self.group.policy_state_dict)
            if state is not None:
                state = {k: v.detach().to("cpu") for k, v in state.items()}
                attempt("saving policy_state.pt", lambda: torch.save(state, run_dir.policy_state_path))
                policy_path = attempt(
                    "exporting the policy", lambda: _export(config, run_dir, state, observation_space, action_space)
                )
            attempt("stopping the learners", self.group.shutdown)
        if self.service is not None:
            attempt(
                "stopping the replay service",
                lambda: ReplayService.shutdown(self.service_name, namespace=config.ray.namespace),
            )
        if self.placement is not None:
            attempt("removing the placement groups", self.placement.remove)

        recent = window_returns(self.stats, config.run.return_window)
        records = run_dir.read_metrics()
        wall_s = round(time.monotonic() - self.started + self.wall_before, 3)
        since = self.collecting_since
        collecting_s = ended - since if since is not None else 0.0
        steps = self.learner_metrics.get("learner/steps") or _last(records, "learner/steps") or 0
        summary = {
            "run_dir": str(run_dir.path),
            "stop_reason": self.stop_reason,
            "frames": int(self.frames),
            "learner_steps": int(steps),
            "wall_s": wall_s,
            # start-up (Ray, placement, actors: tens of seconds) is not collection time
            "startup_s": round(since - self.started, 3) if since is not None else None,
            "collecting_s": round(collecting_s, 3),
            "frames_per_s": (self.frames - self.frames_before) / collecting_s if collecting_s > 0 else None,
            "episodes": int(self.stats.get("episodes", 0)),
            "mean_return": mean(recent[-config.run.return_window:]),
            "policy_version": int(self.learner_metrics.get("learner/policy_version") or 0),
            "restarts": int(self.stats.get("restarts", 0)),
            "shard_restarts": self.shard_restarts,
            "collector/next_incarnation": int(self.stats.get("next_incarnation", 0)),
            "policy_path": str(policy_path) if policy_path else None,
        }
        attempt("writing summary.json", lambda: run_dir.write_summary(summary))
        attempt(
            "plotting returns.png",
            lambda: plot_returns(records, run_dir.plot_path, title=config.name, target_return=config.run.target_return),
        )
        return summary


def _export(config: RunConfig, run_dir: RunDir, state: dict, observation_space: Any, action_space: Any) -> Path:
    from rlfleet.collector.policies import build_policy
    from rlfleet.launch.export import export_policy

    policy = build_policy(config.policy, observation_space, action_space)
    policy.load_state_dict(state)
    run_dir.write_policy_info(export_policy(policy, observation_space, action_space, run_dir.policy_path))
    return run_dir.policy_path


def _last(records: list[dict[str, Any]], key: str) -> Any:
    for r in reversed(records):
        if r.get(key) is not None:
            return r[key]
    return None
