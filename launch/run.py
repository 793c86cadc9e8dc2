"""``rlfleet run``: collectors, the replay service and the learner group, as one job.

Runs on the driver. One call of :func:`run` does, in order::

    ray (embedded local, or join a cluster)  ->  placement check, placement groups
    ReplayService (buffer in <run dir>/buffer)  ->  LearnerGroup (+ weight transport)
    CollectorFleet.start()  ->  loop: LearnerGroup.step(k), fleet stats, metrics.jsonl
    stop (total_frames | target_return | time_limit | Ctrl-C)  ->  checkpoint, export,
    plot, summary  ->  shut down what this call started, also on errors

The loop paces learning when ``run.learner_steps_per_frame`` is set: collectors and
learners take turns (the collectors are paused while the learners take the steps the
new frames paid for), so the ratio is exact to one collector batch and a run's result
does not depend on how the machine's cores are shared between collecting and learning.
A run that stops at ``total_frames`` first takes the learner steps its last frames paid
for, so it ends with ``ratio x (frames - the frame that filled the buffer)`` steps.
Turns give up overlap; to overlap collecting and learning with a bounded ratio, leave it
unset and use the buffer's rate limiter (``buffer.rate_limiter.samples_per_insert``).

``--resume RUN_DIR`` reopens the run's buffer and last learner checkpoint and continues
counting frames from where the run stopped. Not thread-safe: one run per process.

The module runs a little past 600 lines on purpose: start-up, the paced loop and the
shutdown share one ``_Session`` (what was started, what must be stopped on every exit
path, the lost-node check); the pieces that stand alone already live elsewhere
(``placement``, ``learner_group``, ``rundir``, ``progress``, ``export``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlfleet.launch.config import ConfigError, RunConfig, load_config
from rlfleet.launch.preflight import (
    buffer_schema,
    check_placement,
    check_resume_schema,
    required_resources,
    resume_exploration,
)
from rlfleet.launch.placement import cluster_nodes, plan_placement, reserve
from rlfleet.launch.rundir import RunDir

__all__ = ["RunResult", "run", "run_command", "run_command_arguments"]

logger = logging.getLogger(__name__)

# Longest wait for Ray to declare a silent node dead (its health check gives up after
# about 15 s), so an error caused by a lost shard is reported as that loss.
NODE_LOSS_WAIT_S = 30.0


@dataclass(frozen=True)
class RunResult:
    """What a run did.

    Attributes:
        run_dir: the run directory.
        frames: frames collected, over all sessions of the run (resumes included).
        learner_steps: learner steps taken, over all sessions.
        wall_s: wall time, over all sessions.
        mean_return: mean return of the last ``run.return_window`` episodes (None: none
            finished).
        stop_reason: ``total_frames``, ``target_return``, ``time_limit`` or ``interrupted``.
        episodes: episodes finished in this session.
        policy_version: the last policy version the learners published.
    """

    run_dir: Path
    frames: int
    learner_steps: int
    wall_s: float
    mean_return: float | None
    stop_reason: str
    episodes: int = 0
    policy_version: int = 0


# --------------------------------------------------------------------------- Ray


def _dashboard_works() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("aiohttp", "ray.dashboard"))


def _init_ray(config: RunConfig) -> bool:
    """Start or join Ray; return True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        try:
            ray.init(address=address, namespace=config.ray.namespace, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ConnectionError(
                f"ray.address={address!r}: could not join the Ray cluster: {e}. Start one with "
                "`ray start --head`, or set ray.address=null for an embedded local Ray; a cluster "
                "with token authentication also needs RAY_AUTH_MODE=token in this environment"
            ) from e
        return True
    need_cpus = required_resources(config)["CPU"]
    # Logical CPUs only place actors: an embedded Ray gets at least what the run asks for.
    num_cpus = config.ray.num_cpus or max(os.cpu_count() or 1, int(need_cpus + 0.999))
    dashboard = _dashboard_works() if config.ray.include_dashboard is None else config.ray.include_dashboard
    ray.init(
        # "local": never join a cluster that `ray start` left on this machine (Ray would
        # otherwise pick it up from its temp dir and refuse num_cpus)
        address="local",
        namespace=config.ray.namespace,
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
    )
    return True


# --------------------------------------------------------------------------- the loop


class _Stop:
    """Why the loop should stop now, or None."""

    def __init__(self, config: RunConfig, frames_before: int, started: float) -> None:
        self.run = config.run
        self.frames_before = frames_before
        self.started = started

    def __call__(self, frames: int, recent_returns: list[float], now: float) -> str | None:
        if frames >= self.run.total_frames:
            return "total_frames"
        if self.run.target_return is not None and len(recent_returns) >= self.run.return_window:
            if _mean(recent_returns[-self.run.return_window:]) >= self.run.target_return:
                return "target_return"
        if now - self.started >= self.run.time_limit_s:
            return "time_limit"
        return None


def _window_returns(stats: dict[str, Any], window: int) -> list[float]:
    """The returns of about the last ``window`` episodes, an equal share from each collector.

    The fleet's ``recent_returns`` lists collectors one after the other, so its tail
    would be one collector's episodes; each collector's own list is in time order.
    """
    reports = [r for r in stats.get("collectors") or [] if r and "recent_returns" in r]
    if len(reports) > 1:
        share = -(-window // len(reports))
        return [float(x) for r in reports for x in list(r["recent_returns"])[-share:]]
    return [float(x) for x in list(stats.get("recent_returns", []))[-window:]]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run(
    config: RunConfig,
    *,
    resume: str | os.PathLike | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_event: threading.Event | None = None,
) -> RunResult:
    """Run collectors, the replay service and the learners until a stop condition.

    Runs on the driver; one at a time per process. Starts an embedded local Ray when
    none runs and ``config.ray.address`` (or ``RAY_ADDRESS``) is unset, and shuts down
    everything it started before returning, also on errors and on Ctrl-C (which ends the
    run cleanly with ``stop_reason="interrupted"``).

    Args:
        config: the run; with ``resume``, the config to continue with (normally
            ``RunDir.open(resume).read_config()``, maybe with overrides).
        resume: a run directory to continue from its buffer and last checkpoint.
        progress: called with each metrics record (the CLI's live display).
        stop_event: set it from another thread to stop the run cleanly.

    Returns:
        A :class:`RunResult`.

    Raises:
        ValueError: the learners or collectors cannot be placed on the cluster
            (``PlacementError`` names the bundles that do not fit).
        ShardUnavailable: a node holding a shard left the cluster mid-run (the message
            names the node and the shards; ``summary.json`` says ``node_lost``).
        SchemaMismatch: a resumed run's buffer differs from what the env produces.
    """
    import ray

    from rlfleet.buffer import ReplayService
    from rlfleet.collector import CollectorFleet
    from rlfleet.collector.envs import make_env
    from rlfleet.launch.learner_group import LearnerGroup

    started = time.monotonic()
    # The env first: a bad env id fails here, before a run directory or Ray exists.
    env = make_env(config.env, seed=config.seed)
    observation_space, action_space = env.observation_space, env.action_space
    env.close()
    if resume is not None:
        run_dir = RunDir.open(resume)
        previous = run_dir.read_summary() or (run_dir.read_metrics() or [{}])[-1]
        frames_before = int(previous.get("frames") or 0)
        wall_before = float(previous.get("wall_s") or 0.0)
        # Collector incarnations go on from the last session's, so episode ids stay unique
        # in the buffer both sessions write.
        first_incarnation = int(previous.get("collector/next_incarnation") or 0)
        buffer_path = Path(config.buffer.path) if config.buffer.path else run_dir.buffer_dir
        check_resume_schema(buffer_schema(buffer_path), observation_space, action_space, str(buffer_path))
        run_dir.write_config(config)  # the overrides of this session, for export and resume
        config = resume_exploration(config, frames_before)
        logger.info("resuming %s at %d frames", run_dir.path, frames_before)
    else:
        run_dir = RunDir.create(config.run.dir, config.name)
        run_dir.write_config(config)
        frames_before, wall_before, first_incarnation = 0, 0.0, 0
        buffer_path = Path(config.buffer.path) if config.buffer.path else run_dir.buffer_dir
    # Actors and the service are named after the run directory, unique per run, so two
    # runs of one config on a shared cluster do not collide.
    service_name = run_dir.path.name
    actor_config = dataclasses.replace(config, name=service_name)
    if config.run.learner_steps_per_frame is not None:
        # Pacing takes turns on the frames the collectors report: report every batch.
        actor_config = dataclasses.replace(
            actor_config, collector=dataclasses.replace(config.collector, report_interval_s=0.0))

    session = _Session(config, run_dir, frames_before, wall_before, started, progress, stop_event)
    phase = _Phases()
    try:
        ray_started = _init_ray(config)
    except BaseException:
        if resume is None:  # nothing ran: leave no empty run directory behind
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise
    phase("ray")
    try:
        check_placement(config, ray.cluster_resources())
        session.service_name, session.buffer_path = service_name, buffer_path
        session.placement = reserve(
            plan_placement(config, service_name, cluster_nodes(), ray.get_runtime_context().get_node_id()),
            timeout_s=config.ray.placement_timeout_s,
        )
        phase("placement groups")
        session.service = ReplayService.launch(
            service_name, buffer_path, detached=False, seed=config.seed,
            nodes=list(session.placement.shard_nodes), **config.buffer.service_kwargs()
        )
        session.client = session.service.client(seed=config.seed)
        phase("replay service")
        # The fleet holds total_frames by itself: the loop below may be busy (a learner
        # step, a shard restarting) when the last frames arrive.
        session.fleet = CollectorFleet(
            actor_config, session.client, first_incarnation=first_incarnation,
            placement_group=session.placement.group("collector"),
            max_frames=max(1, config.run.total_frames - frames_before),
        )
        # Learner and collector actors take seconds each to start (imports, gloo): start
        # the collectors on a helper thread meanwhile, paused from their first moment, so
        # they do not spend the exploration schedule before the learners exist.
        # The fleet tolerates a receiver being attached while it starts (new actors read
        # it from the fleet's registry).
        fleet = session.fleet
        fleet_start = _Background(lambda: fleet.start(paused=True))
        try:
            session.group = LearnerGroup(
                actor_config,
                service_name,
                observation_space,
                action_space,
                run_dir=run_dir.path,
                fleet=session.fleet,
                resume=resume is not None,
                placement_group=session.placement.group("learner"),
            )
        finally:
            fleet_start.join()
        phase("learners and collectors")
        session.group.publish()
        fleet.resume()
        session.loop_or_report_lost_shards()
    except KeyboardInterrupt:
        session.stop_reason = "interrupted"
        logger.info("interrupted: stopping cleanly")
    except SystemExit:
        # Ray's driver turns SIGTERM into sys.exit: finish the run, then exit as asked.
        session.stop_reason = "terminated"
        raise
    finally:
        summary = session.finish(observation_space, action_space)
        if ray_started:
            try:
                ray.shutdown()
            except Exception:
                logger.exception("while stopping the run: stopping Ray failed")
    return RunResult(
        run_dir=run_dir.path,
        frames=summary["frames"],
        learner_steps=summary["learner_steps"],
        wall_s=summary["wall_s"],
        mean_return=summary["mean_return"],
        stop_reason=session.stop_reason,
        episodes=summary["episodes"],
        policy_version=summary["policy_version"],
    )


class _Background:
    """Runs ``fn`` on a thread; ``join`` waits and re-raises its exception here."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="rlfleet-start", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as e:  # handed to the caller's thread by join()
            self._error = e

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class _Phases:
    """Logs how long each start-up phase took (start-up dominates short runs)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        logger.info("%s ready in %.1f s", what, now - self.last)
        self.last = now


class _Session:
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
        self.stop_reason = "error"
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
        should_stop = _Stop(config, self.frames_before, self.started)
        min_rows = config.buffer.rate_limiter.min_size_to_sample * config.buffer.num_shards
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
            recent = _window_returns(self.stats, section.return_window)
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
        recent = _window_returns(self.stats, self.config.run.return_window)
        record: dict[str, Any] = {
            "time": time.time(),
            "wall_s": time.monotonic() - self.started + self.wall_before,
            "frames": self.frames,
            "frames_per_s": fps,
            "episodes": int(self.stats.get("episodes", 0)),
            "return_mean": _mean(recent[-self.config.run.return_window:]),
            "return_last": recent[-1] if recent else None,
            **self._buffer_numbers(),
            "collector/policy_version": self.stats.get("policy_version"),
            "collector/restarts": self.stats.get("restarts", 0),
            "collector/next_incarnation": self.stats.get("next_incarnation", 0),
            "learner/steps": 0,
        }
        record.update(self.learner_metrics)
        self.run_dir.append_metrics(record)
        if self.progress is not None:
            self.progress(record)

    def _buffer_numbers(self) -> dict[str, int]:
        """Rows in the buffer, and shard restarts seen so far (a shard answering from a
        new process). ``stats`` never raises: a shard that does not answer is left out."""
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
        return {"buffer/size": int(stats["total"]["size"]), "buffer/restarts": self.shard_restarts}

    def finish(self, observation_space: Any, action_space: Any) -> dict[str, Any]:
        """Stop what was started, write the run's files; logs (never raises) on cleanup errors."""
        import torch

        from rlfleet.buffer import ReplayService
        from rlfleet.launch.plots import plot_returns

        run_dir, config = self.run_dir, self.config

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
            attempt("stopping the replay service", lambda: ReplayService.shutdown(self.service_name))
        if self.placement is not None:
            attempt("removing the placement groups", self.placement.remove)

        recent = _window_returns(self.stats, config.run.return_window)
        records = run_dir.read_metrics()
        wall_s = round(time.monotonic() - self.started + self.wall_before, 3)
        steps = self.learner_metrics.get("learner/steps") or _last(records, "learner/steps") or 0
        summary = {
            "run_dir": str(run_dir.path),
            "stop_reason": self.stop_reason,
            "frames": int(self.frames),
            "learner_steps": int(steps),
            "wall_s": wall_s,
            "frames_per_s": self.frames / wall_s if wall_s else None,
            "episodes": int(self.stats.get("episodes", 0)),
            "mean_return": _mean(recent[-config.run.return_window:]),
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


# --------------------------------------------------------------------------- CLI


def run_command_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``rlfleet run``."""
    parser.add_argument("config", metavar="CONFIG", nargs="?", help="a YAML run config, e.g. configs/cartpole_dqn.yaml")
    parser.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="override config leaves, e.g. learner.lr=1e-3")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its buffer and checkpoint")
    parser.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")


def run_command(args: argparse.Namespace) -> int:
    """``rlfleet run CONFIG [key=value ...]`` / ``rlfleet run --resume RUN_DIR [key=value ...]``."""
    from rlfleet.launch.progress import Progress

    overrides = list(args.overrides)
    try:
        if args.resume:
            if args.config is not None:
                if "=" not in args.config:
                    print("rlfleet run: give either CONFIG or --resume RUN_DIR, not both", file=sys.stderr)
                    return 2
                overrides.insert(0, args.config)
            config = RunDir.open(args.resume).read_config(overrides)
        else:
            if args.config is None:
                print("rlfleet run: a CONFIG file is needed (or --resume RUN_DIR)", file=sys.stderr)
                return 2
            config = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rlfleet run: {e}", file=sys.stderr)
        return 2

    display = Progress(live=False if args.plain else None)
    try:
        result = run(config, resume=args.resume, progress=display.update)
    except (ValueError, OSError, TimeoutError, RuntimeError) as e:
        display.close_line()
        logger.debug("run failed", exc_info=True)
        print(f"rlfleet run: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary = RunDir(result.run_dir).read_summary() or dataclasses.asdict(result)
    display.summary(summary)
    return 130 if result.stop_reason == "interrupted" else 0
