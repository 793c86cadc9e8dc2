"""Loggers: each ``metrics.jsonl`` record, also sent to TensorBoard and Weights & Biases.

Runs on the driver, inside ``rlfleet run``'s session; not thread-safe (the one driver
thread that writes ``metrics.jsonl`` calls it). ``metrics.jsonl`` stays the source of
truth: the session writes its line first, and a logger that fails is closed with a
warning while the file goes on. ``run.loggers`` names the loggers of a run; the loop that
calls them, in ``rlfleet.launch.session``::

    loggers = open_loggers(config, run_dir)            # before Ray starts
    while running:
        run_dir.append_metrics(record)                 # every run.log_every_s
        loggers.write(record)
    loggers.close(failed=stop_reason == "error")       # on every exit path

What each receives: every numeric leaf of the record (``int``, ``float``, ``bool``;
nested mappings flattened with ``/``), except ``time``, the wall clock, which TensorBoard
and W&B stamp on every point themselves (and a float32 TensorBoard value cannot hold to
the second). None and NaN (a metric not defined yet) are left out, as in the file.

The step is ``frames``, env frames over all sessions of the run (resumes included):
TensorBoard's global step, and W&B's x-axis (``define_metric``). W&B's own ``_step`` must
rise strictly and two records can share a frame count (collectors wait while paced
learners catch up), so it is the record's position in ``metrics.jsonl``, which also goes
on across resumes. The resolved config goes along: TensorBoard's HPARAMS tab (flattened
with ``.``, as ``key=value`` overrides write it; the first session's) and each session's
YAML under TEXT; W&B's run config (each session's: a resume may override keys).

``--resume``: TensorBoard appends a new event file to the same ``<run dir>/tensorboard/``
(steps go on from the resumed frames; points a killed session logged past them are
purged); W&B continues the run whose id ``<run dir>/wandb_run_id`` holds
(``resume="allow"``; an offline session writes one more ``offline-run-*`` directory with
that id, and ``wandb sync <run dir>/wandb/offline-run-*`` uploads them as one run).

Packages are imported only when a run asks for them; a missing one is a
:class:`LoggerError` naming the extra to install, raised by ``preflight.check_loggers``
before anything starts.
"""

from __future__ import annotations

import importlib
import logging
import math
import secrets
import string
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from rlfleet.launch.config import RunConfig, config_to_dict, dump_config
from rlfleet.launch.rundir import RunDir

__all__ = [
    "LOGGER_PACKAGES",
    "Logger",
    "LoggerError",
    "LoggerGroup",
    "TensorBoardLogger",
    "WandbLogger",
    "import_logger_module",
    "open_loggers",
    "scalars",
]

log = logging.getLogger(__name__)

# logger name -> (module to import, pip extra of rlfleet that installs it)
LOGGER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}

# metrics the TensorBoard HPARAMS table shows beside the config
_HPARAM_METRICS = ("return_mean", "frames_per_s", "learner/steps")


class LoggerError(RuntimeError):
    """A logger in ``run.loggers`` cannot be imported or opened; the message says why and the fix."""


class Logger(Protocol):
    """Where metrics records go besides ``metrics.jsonl`` (see the module docstring)."""

    def write(self, record: Mapping[str, Any]) -> None:
        """Send one metrics record (the dict ``metrics.jsonl`` got as a line)."""

    def close(self, *, failed: bool = False) -> None:
        """Flush and close; ``failed``: the run ended in an error."""


def import_logger_module(name: str, packages: Mapping[str, tuple[str, str]] = LOGGER_PACKAGES) -> ModuleType:
    """The module logger ``name`` writes with (``packages[name]``), imported now.

    Raises:
        LoggerError: the module does not import: names the logger, the package and the
            extra that installs it, e.g. ``pip install "rlfleet[tensorboard]"``.
        ValueError: ``name`` is not a logger.
    """
    if name not in packages:
        raise ValueError(f"run.loggers: {name!r} is not one of {', '.join(repr(n) for n in packages)}")
    module, extra = packages[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LoggerError(
            f"run.loggers includes {name!r} but the {extra} package is not installed: "
            f'pip install "rlfleet[{extra}]" (import {module} failed: {e})'
        ) from e


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
    """The numeric leaves of a metrics record, nested keys joined with ``/``.

    ``time`` (at the top) is left out, as are None, NaN and infinities; bools become
    0 and 1. ``{"frames": 640, "learner": {"loss": 0.5}}`` gives
    ``{"frames": 640, "learner/loss": 0.5}``.
    """
    out: dict[str, int | float] = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if not prefix and key == "time":
            continue
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{tag}/"))
        elif isinstance(value, bool):
            out[tag] = int(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[tag] = value
        elif hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            item = value.item()
            if isinstance(item, (int, float)) and math.isfinite(item):
                out[tag] = item
    return out


def _flat_config(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Config leaves as ``("learner.lr", 0.0005)``: numbers, strings, bools; lists as text."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield from _flat_config(value, f"{prefix}{key}.")
    elif isinstance(data, (list, tuple)):
        yield prefix[:-1], str(list(data))
    elif data is not None:
        yield prefix[:-1], data


class TensorBoardLogger:
    """Scalars to ``<run dir>/tensorboard/`` through ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        run_dir: the run directory.
        config: the resolved config: the HPARAMS tab (the first session's) and the
            YAML under TEXT (each session's, at its first step).
        frames_before: frames of earlier sessions (a resume): the first step of this
            one; points past it from a killed session are purged.
    """

    def __init__(self, run_dir: RunDir, config: RunConfig, *, frames_before: int = 0) -> None:
        tensorboard = import_logger_module("tensorboard")
        from torch.utils.tensorboard.summary import hparams

        self.log_dir = run_dir.tensorboard_dir
        self.writer = tensorboard.SummaryWriter(
            log_dir=str(self.log_dir), purge_step=frames_before + 1 if frames_before else None
        )
        if not frames_before:
            # Into this run's own directory, not a sub-run as add_hparams does, so HPARAMS
            # shows one row per run beside its scalars. Once: TensorBoard keeps the first.
            hparam_dict = {k: str(v).lower() if isinstance(v, bool) else v
                           for k, v in _flat_config(config_to_dict(config))}
            for summary in hparams(hparam_dict, {k: math.nan for k in _HPARAM_METRICS}):
                self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```yaml\n" + dump_config(config) + "```", frames_before)
        self.writer.flush()
        log.info("TensorBoard: %s (tensorboard --logdir %s)", self.log_dir, self.log_dir.parent.parent)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["frames"])
        walltime = record.get("time")
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=walltime)
        self.writer.flush()  # a record every few seconds: TensorBoard shows it at once

    def close(self, *, failed: bool = False) -> None:
        self.writer.close()


class WandbLogger:
    """Records to a Weights & Biases run, ``mode`` online, offline or disabled.

    The run's files go to ``<run dir>/wandb/``; its id is ``<run dir>/wandb_run_id``
    (made on the first session), so a resumed run continues it.

    Args:
        run_dir: the run directory; its name is the W&B run's name.
        config: the resolved config (the W&B run config); ``config.run.wandb`` says where.
        records_before: metrics records of earlier sessions (W&B's next ``_step``).
    """

    def __init__(self, run_dir: RunDir, config: RunConfig, *, records_before: int = 0) -> None:
        wandb = import_logger_module("wandb")
        settings = config.run.wandb
        run_id = run_dir.read_wandb_run_id()
        if run_id is None:
            alphabet = string.ascii_lowercase + string.digits
            run_id = "".join(secrets.choice(alphabet) for _ in range(8))
            if settings.mode != "disabled":
                run_dir.write_wandb_run_id(run_id)  # before init: a killed session keeps it
        try:
            self.run = wandb.init(
                project=settings.project, entity=settings.entity, group=settings.group,
                tags=list(settings.tags), mode=settings.mode, dir=str(run_dir.path),
                id=run_id, name=run_dir.path.name, resume="allow",
                config=config_to_dict(config), allow_val_change=True,
                # the command line owns the screen (a live progress line): W&B prints
                # nothing and captures no console; its location is logged below
                settings=wandb.Settings(silent=True, console="off", reinit="create_new"),
            )
            self.run.define_metric("frames")
            self.run.define_metric("*", step_metric="frames")
        except Exception as e:
            auth = isinstance(e, getattr(wandb.errors, "AuthenticationError", ())) or "api key" in str(e).lower()
            fix = ("log in with `wandb login` (or set WANDB_API_KEY), or set run.wandb.mode=offline to write "
                   "locally only") if auth else ("check run.wandb (project, entity) and the wandb version "
                                                  "(rlfleet needs wandb>=0.19.10), or set run.wandb.mode=offline")
            raise LoggerError(
                f"run.loggers: wandb.init failed (run.wandb.mode={settings.mode}, "
                f"project={settings.project!r}): {type(e).__name__}: {str(e).rstrip('.')}; {fix}"
            ) from e
        self.next_step = records_before
        if settings.mode == "offline":
            log.info("W&B offline run %s in %s (upload with `wandb sync %s`)",
                     run_id, Path(self.run.dir).parent, run_dir.path / "wandb" / "offline-run-*")
        elif settings.mode == "online":
            log.info("W&B run %s: %s", run_id, self.run.url)

    def write(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=self.next_step)
        self.next_step += 1

    def close(self, *, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class LoggerGroup:
    """The run's loggers as one: a logger that fails is closed and dropped, with a warning.

    What the session holds; ``write`` and ``close`` never raise (``Exception``).
    """

    def __init__(self, loggers: Mapping[str, Logger]) -> None:
        self.loggers = dict(loggers)

    def write(self, record: Mapping[str, Any]) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                logger.write(record)
            except Exception:
                log.warning("the %s logger failed; it gets no more records (metrics.jsonl keeps "
                            "every one)", name, exc_info=True)
                del self.loggers[name]
                self._close(name, logger, failed=True)

    def close(self, *, failed: bool = False) -> None:
        for name, logger in self.loggers.items():
            self._close(name, logger, failed=failed)
        self.loggers.clear()

    @staticmethod
    def _close(name: str, logger: Logger, *, failed: bool) -> None:
        try:
            logger.close(failed=failed)
        except Exception:
            log.warning("closing the %s logger failed", name, exc_info=True)


def open_loggers(config: RunConfig, run_dir: RunDir, *, frames_before: int = 0, records_before: int = 0) -> LoggerGroup:
    """Open the loggers ``config.run.loggers`` names, for one session of the run.

    Args:
        config: the resolved config.
        run_dir: the run directory (``tensorboard/``, ``wandb/`` and ``wandb_run_id`` go there).
        frames_before: frames of earlier sessions (a resume), where TensorBoard's steps go on.
        records_before: ``metrics.jsonl`` records of earlier sessions, where W&B's go on.

    Raises:
        LoggerError: a package is missing or W&B does not start (e.g. not logged in);
            the loggers opened before it are closed.
    """
    opened: dict[str, Logger] = {}
    try:
        for name in config.run.loggers:
            if name == "tensorboard":
                opened[name] = TensorBoardLogger(run_dir, config, frames_before=frames_before)
            elif name == "wandb":
                opened[name] = WandbLogger(run_dir, config, records_before=records_before)
    except BaseException:
        LoggerGroup(opened).close(failed=True)
        raise
    return LoggerGroup(opened)
