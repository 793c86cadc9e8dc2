"""``rlfleet run``: collectors, the replay service and the learner group, as one job.

Runs on the driver. One call of :func:`run` does, in order::

    logger packages, runtime env, env and policy checked here  ->  run directory, loggers
    (TensorBoard, W&B)  ->  Ray (an embedded local Ray, or join a cluster, through
    rlfleet.buffer.init_ray, with ray.runtime_env)  ->  placement check, placement groups
    ReplayService (buffer in <run dir>/buffer)  ->  LearnerGroup (+ weight transport)
    CollectorFleet.start()  ->  Session.loop: LearnerGroup.step(k), fleet stats, metrics.jsonl
    stop (total_frames | target_return | time_limit | Ctrl-C)  ->  Session.finish: checkpoint,
    export, plot, summary  ->  shut down what this call started, also on errors

It runs past 400 lines because that sequence, with each step's failure handling, reads
best in one place; the loop itself is ``session``.

The loop paces learning when ``run.learner_steps_per_frame`` is set: collectors and
learners take turns (the collectors are paused while the learners take the steps the
new frames paid for), so the ratio is exact to one collector batch and a run's result
does not depend on how the machine's cores are shared between collecting and learning.
A run that stops at ``total_frames`` first takes the learner steps its last frames paid
for, so it ends with ``ratio x (frames - the frame that filled the buffer)`` steps.
Turns give up overlap; to overlap collecting and learning with a bounded ratio, leave it
unset and use the buffer's rate limiter (``buffer.rate_limiter.samples_per_insert``).

Which Ray: ``ray.address: null`` always starts an embedded Ray of this process (never a
cluster found on the machine, whatever ``RAY_ADDRESS`` says); ``"auto"`` or an address
joins that cluster within ``ray.connect_timeout_s``. A process that already called
``ray.init`` runs on that Ray.

Names: the run directory's name (``<config name>-<time>``) names the replay service and
every actor of the run (``rlfleet:<run dir name>:<component>``), in the Ray namespace
``ray.namespace``; ``config.name`` stays the config's own name.

``--resume RUN_DIR`` reopens the run's buffer and last learner checkpoint and continues
counting frames from where the run stopped; the loggers continue the same TensorBoard
directory and W&B run (see ``loggers``). Not thread-safe: one run per process. This
module holds the wiring (what starts, in which order, with which names); the loop, the
stop rules and the shutdown live in ``session``; the command line in ``cli``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlfleet.launch.config import RunConfig
from rlfleet.launch.placement import cluster_nodes, plan_placement, reserve
from rlfleet.launch.loggers import open_loggers
from rlfleet.launch.preflight import (
    buffer_schema,
    check_loggers,
    check_placement,
    check_resume_schema,
    check_runtime_env,
    required_resources,
    resume_exploration,
)
from rlfleet.launch.rundir import RunDir
from rlfleet.launch.session import Session

__all__ = ["RunResult", "run", "start_ray"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a run did (``run`` returns it; ``summary.json`` holds the same and more).

    Attributes:
        run_dir: the run directory.
        frames: frames collected, over all sessions of the run (resumes included).
        learner_steps: learner steps taken, over all sessions.
        wall_s: wall time, over all sessions.
        mean_return: mean return of the last ``run.return_window`` episodes (None: none
            finished).
        stop_reason: ``total_frames``, ``target_return``, ``time_limit``, ``interrupted``,
            ``terminated``, ``node_lost`` or ``error``.
        episodes: episodes finished in this session.
        policy_version: the last policy version the learners published.
        startup_s: this session's start-up (Ray, placement, actors) before collecting.
        frames_per_s: this session's frames per second of collecting, start-up excluded.
        policy_path: the exported policy (``policy.pt2``), None if none was written.
    """

    run_dir: Path
    frames: int
    learner_steps: int
    wall_s: float
    mean_return: float | None
    stop_reason: str
    episodes: int = 0
    policy_version: int = 0
    startup_s: float | None = None
    frames_per_s: float | None = None
    policy_path: Path | None = None


class RunTerminated(SystemExit):
    """SIGTERM ended a run (``ray job stop``, a scheduler, ``kill``): raised by ``run``
    after the run finished cleanly and wrote its summary, so the process still exits as
    the signal asked. ``result`` is the :class:`RunResult` (``stop_reason="terminated"``);
    the CLI prints it before exiting."""

    def __init__(self, code: object, result: RunResult) -> None:
        super().__init__(code)
        self.result = result


# --------------------------------------------------------------------------- Ray


def _dashboard_works() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("aiohttp", "ray.dashboard"))


def start_ray(config: RunConfig) -> Any:
    """Start (``ray.address: null``) or join Ray for the run; returns the ``ClusterInfo``.

    ``rlfleet.buffer.init_ray`` does the work (the bounded join, the one rule of which
    cluster); this adds the run's choices: ``ray.runtime_env`` for the run's job, and
    for an embedded Ray enough logical CPUs for what the run asks for, and the dashboard
    when its packages import.

    Raises:
        RuntimeError: Ray started or joined, but its job lacks fields of
            ``ray.runtime_env`` (Ray is shut down again): the actors would fail later,
            far from the cause. A process that initialised Ray before the run keeps its
            own runtime env: a warning says so.
    """
    from rlfleet.buffer import init_ray

    section = config.ray
    options = {} if section.runtime_env is None else {"runtime_env": section.runtime_env}
    if section.address is not None:
        cluster = init_ray(section.address, namespace=section.namespace, timeout_s=section.connect_timeout_s, **options)
        _check_runtime_env_applied(section.runtime_env, cluster)
        return cluster
    if os.environ.get("RAY_ADDRESS"):
        logger.warning(
            "RAY_ADDRESS=%s is set, but ray.address is null: this run starts its own embedded "
            "Ray; set ray.address=auto (or the address) to run on that cluster",
            os.environ["RAY_ADDRESS"],
        )
    # Logical CPUs only place actors: an embedded Ray gets at least what the run asks for.
    num_cpus = section.num_cpus or max(os.cpu_count() or 1, int(required_resources(config)["CPU"] + 0.999))
    dashboard = _dashboard_works() if section.include_dashboard is None else section.include_dashboard
    cluster = init_ray(
        "local", namespace=section.namespace, timeout_s=section.connect_timeout_s,
        num_cpus=num_cpus, include_dashboard=dashboard, **options,
    )
    _check_runtime_env_applied(section.runtime_env, cluster)
    return cluster


def _check_runtime_env_applied(runtime_env: dict[str, Any] | None, cluster: Any) -> None:
    """Refuse to run without the ``ray.runtime_env`` the config asks for: its actors would
    fail later and far from the cause (a missing package, an unset variable)."""
    import ray

    if not runtime_env:
        return
    try:
        applied = dict(ray.get_runtime_context().runtime_env or {})
    except Exception:  # a Ray that cannot say (Ray Client): trust ray.init
        return
    # "excludes" only filters the upload of working_dir / py_modules: Ray drops it after
    missing = sorted(set(runtime_env) - set(applied) - {"excludes"})
    if not missing:
        return
    if not cluster.started:
        logger.warning(
            "ray.runtime_env is not applied (%s): this process initialised Ray before the run, "
            "and Ray keeps that job's runtime env; pass runtime_env=... to that ray.init instead",
            ", ".join(missing),
        )
        return
    ray.shutdown()
    how = "started an embedded Ray" if cluster.embedded else "joined the cluster"
    raise RuntimeError(
        f"ray.runtime_env: the run {how} at {cluster.address}, but Ray's job came up without "
        f"the runtime env fields {', '.join(missing)}; submit the run with `ray job submit "
        "--runtime-env-json ...` instead, or leave ray.runtime_env null"
    )


# --------------------------------------------------------------------------- run


@dataclass(frozen=True)
class _Before:
    """What earlier sessions of a resumed run did (zeros for a new run)."""

    frames: int = 0
    wall_s: float = 0.0
    first_incarnation: int = 0
    records: int = 0  # metrics.jsonl records


def _spaces(config: RunConfig) -> tuple[Any, Any]:
    """The env's spaces, after building the env and the policy once: a bad env id or
    network factory fails here, before a run directory or Ray exists."""
    from rlfleet.collector.envs import make_env
    from rlfleet.collector.policies import build_policy

    env = make_env(config.env, seed=config.seed)
    observation_space, action_space = env.observation_space, env.action_space
    env.close()
    build_policy(config.policy, observation_space, action_space)
    return observation_space, action_space


def _run_dir(
    config: RunConfig, resume: str | os.PathLike | None, spaces: tuple[Any, Any]
) -> tuple[RunConfig, RunDir, Path, _Before]:
    """The run directory (new, or the resumed one checked against the env), the config
    to run (a resumed run's exploration goes on where it stopped), the buffer's path, and
    what earlier sessions did."""
    if resume is None:
        run_dir = RunDir.create(config.run.dir, config.name)
        run_dir.write_config(config)
        buffer_path = Path(config.buffer.path) if config.buffer.path else run_dir.buffer_dir
        return config, run_dir, buffer_path, _Before()
    run_dir = RunDir.open(resume)
    records = run_dir.read_metrics()
    previous = run_dir.read_summary() or (records or [{}])[-1]
    # Collector incarnations go on from the last session's, so episode ids stay unique
    # in the buffer both sessions write.
    before = _Before(
        frames=int(previous.get("frames") or 0),
        wall_s=float(previous.get("wall_s") or 0.0),
        first_incarnation=int(previous.get("collector/next_incarnation") or 0),
        records=len(records),
    )
    buffer_path = Path(config.buffer.path) if config.buffer.path else run_dir.buffer_dir
    check_resume_schema(buffer_schema(buffer_path), *spaces, str(buffer_path))
    run_dir.write_config(config)  # the overrides of this session, for export and resume
    logger.info("resuming %s at %d frames", run_dir.path, before.frames)
    return resume_exploration(config, before.frames), run_dir, buffer_path, before


def run(
    config: RunConfig,
    *,
    resume: str | os.PathLike | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_event: threading.Event | None = None,
) -> RunResult:
    """Run collectors, the replay service and the learners until a stop condition.

    Runs on the driver; one at a time per process. This is what ``rlfleet run`` calls::

        from rlfleet.launch import load_config, run
        config = load_config("configs/smoke.yaml", {"run.total_frames": 2000})
        result = run(config)          # a RunResult; the run directory is result.run_dir

    With ``ray.address: null`` it starts an embedded local Ray (unless this process
    already initialised Ray), else it joins the cluster at ``ray.address`` within
    ``ray.connect_timeout_s``. It shuts down everything it started before returning, also
    on errors and on Ctrl-C (which ends the run cleanly with ``stop_reason="interrupted"``).

    Args:
        config: the run; with ``resume``, the config to continue with (normally
            ``RunDir.open(resume).read_config()``, maybe with overrides).
        resume: a run directory to continue from its buffer and last checkpoint.
        progress: called with each metrics record (the CLI's live display).
        stop_event: set it from another thread to stop the run cleanly.

    Returns:
        A :class:`RunResult`.

    Raises:
        RunTerminated: SIGTERM ended the run (after it finished cleanly; carries the result).
        ValueError: a bad env id or policy factory (before anything starts), or the
            learners or collectors cannot be placed on the cluster
            (``PlacementError`` names the bundles that do not fit).
        ShardUnavailable: a node holding a shard left the cluster mid-run (the message
            names the node and the shards; ``summary.json`` says ``node_lost``).
        SchemaMismatch: a resumed run's buffer differs from what the env produces.
        ClusterConnectError: ``ray.address`` names a cluster that does not answer,
            refuses this process's token, or runs other Ray/Python versions.
        ConfigError: ``ray.runtime_env`` holds a field Ray refuses (before anything starts).
        LoggerError: a package of ``run.loggers`` is not installed (before anything
            starts), or W&B does not start (before Ray).
    """
    import ray

    from rlfleet.buffer import ReplayService
    from rlfleet.collector import CollectorFleet
    from rlfleet.launch.learners import LearnerGroup

    started = time.monotonic()
    # what can be refused without starting anything: logger packages, the runtime env,
    # the env and the policy
    check_loggers(config)
    check_runtime_env(config)
    observation_space, action_space = _spaces(config)
    config, run_dir, buffer_path, before = _run_dir(config, resume, (observation_space, action_space))
    # The service and every actor are named after the run directory, unique per run, so
    # two runs of one config on a shared cluster do not collide.
    run_name, namespace = run_dir.path.name, config.ray.namespace
    collector = config.collector
    if config.run.learner_steps_per_frame is not None:
        # Pacing takes turns on the frames the collectors report: report every batch.
        collector = dataclasses.replace(collector, report_interval_s=0.0)

    session = Session(config, run_dir, before.frames, before.wall_s, started, progress, stop_event)
    phase = _Phases()
    try:
        # before Ray: a W&B that does not start (not logged in) fails in seconds
        session.loggers = open_loggers(config, run_dir, frames_before=before.frames, records_before=before.records)
        if config.run.loggers:
            phase(f"loggers open: {', '.join(config.run.loggers)}")
        cluster = start_ray(config)
    except BaseException:
        if session.loggers is not None:
            session.loggers.close(failed=True)
        if resume is None:  # nothing ran: leave no empty run directory behind
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise
    phase(cluster.describe())
    terminated: SystemExit | None = None
    try:
        check_placement(config, ray.cluster_resources())
        session.service_name, session.buffer_path = run_name, buffer_path
        session.placement = reserve(
            plan_placement(config, run_name, cluster_nodes(), ray.get_runtime_context().get_node_id()),
            timeout_s=config.ray.placement_timeout_s,
        )
        phase("placement groups reserved")
        session.service = ReplayService.launch(
            run_name, buffer_path, detached=False, seed=config.seed, namespace=namespace,
            nodes=list(session.placement.shard_nodes),
            **config.buffer.service_kwargs(config.env, observation_space),
        )
        session.client = session.service.client(seed=config.seed)
        phase("replay service ready")
        # The fleet holds total_frames by itself: the loop below may be busy (a learner
        # step, a shard restarting) when the last frames arrive.
        fleet = session.fleet = CollectorFleet(
            run_name, session.client, env=config.env, collector=collector, policy=config.policy,
            seed=config.seed, namespace=namespace, first_incarnation=before.first_incarnation,
            placement_group=session.placement.group("collector"),
            max_frames=max(1, config.run.total_frames - before.frames),
        )
        # Learner and collector actors take seconds each to start (imports, gloo): start
        # the collectors on a helper thread meanwhile, paused from their first moment, so
        # they do not spend the exploration schedule before the learners exist.
        # The fleet tolerates a receiver being attached while it starts (new actors read
        # it from the fleet's registry). Leaving the pool waits for the start.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlfleet-start") as pool:
            fleet_started = pool.submit(fleet.start, paused=True)
            session.group = LearnerGroup(
                config.learner, config.policy, run_name=run_name, buffer=run_name,
                observation_space=observation_space, action_space=action_space, run_dir=run_dir.path,
                seed=config.seed, namespace=namespace, fleet=fleet, resume=resume is not None,
                placement_group=session.placement.group("learner"),
            )
        fleet_started.result()  # the fleet's start error, if any, here
        phase("learners and collectors ready")
        session.group.publish()
        fleet.resume()
        session.collecting_since = time.monotonic()
        logger.info("start-up took %.1f s; collecting", session.collecting_since - started)
        session.loop_or_report_lost_shards()
    except KeyboardInterrupt:
        session.stop_reason = "interrupted"
        logger.info("interrupted: stopping cleanly")
    except SystemExit as e:
        # Ray's driver turns SIGTERM into sys.exit: finish the run, then exit as asked.
        session.stop_reason = "terminated"
        terminated = e
    finally:
        summary = session.finish(observation_space, action_space)
        if cluster.started:
            try:
                ray.shutdown()
            except Exception:
                logger.exception("while stopping the run: stopping Ray failed")
    result = RunResult(
        run_dir=run_dir.path,
        frames=summary["frames"],
        learner_steps=summary["learner_steps"],
        wall_s=summary["wall_s"],
        mean_return=summary["mean_return"],
        stop_reason=session.stop_reason,
        episodes=summary["episodes"],
        policy_version=summary["policy_version"],
        startup_s=summary["startup_s"],
        frames_per_s=summary["frames_per_s"],
        policy_path=Path(summary["policy_path"]) if summary["policy_path"] else None,
    )
    if terminated is not None:
        raise RunTerminated(terminated.code, result) from None
    return result


class _Phases:
    """Logs how long each start-up phase took (start-up dominates short runs)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        logger.info("%s (%.1f s)", what, now - self.last)
        self.last = now
