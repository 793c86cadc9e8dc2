"""The run directory: everything a run leaves behind, in one place a person can read.

Layout of ``<run.dir>/<name>-<YYYYmmdd-HHMMSS>/``::

    config.yaml       the resolved config (file + overrides); ``--resume`` reads it back
    metrics.jsonl     one JSON object per progress tick (frames, returns, learner metrics)
    returns.png       mean return against frames, learner steps on a second axis
    summary.json      the run's result: frames, learner steps, wall time, stop reason
    policy_state.pt   the final policy ``state_dict`` (``torch.save``; load weights_only)
    policy.pt2        the final policy exported with ``torch.export`` (loads without rlfleet)
    policy.json       what ``policy.pt2`` takes and returns
    checkpoints/      learner checkpoints (written by the learner group)
    buffer/           the replay buffer, one ``shard-<k>`` directory per shard
    tensorboard/      TensorBoard event files (``run.loggers: [tensorboard]``), one per session
    wandb/            W&B's own files (``run.loggers: [wandb]``), one directory per session
    wandb_run_id      the W&B run's id, so ``--resume`` continues that run

Runs on the driver. :meth:`RunDir.append_metrics` is thread-safe; the rest is meant for
one thread.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from rlfleet.buffer import check_name
from rlfleet.launch.config import RunConfig, dump_config, load_config

__all__ = ["RunDir"]

CONFIG_FILE = "config.yaml"


def _json_safe(value: Any) -> Any:
    # NaN and inf are not JSON; a metric that is not defined yet is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


class RunDir:
    """One run's directory (driver side).

    Create a new one with :meth:`create`, reopen a stopped one with :meth:`open`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, root: str | os.PathLike, name: str, *, now: float | None = None) -> RunDir:
        """Make a fresh ``<root>/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken).

        Raises:
            ValueError: ``name`` could escape ``root`` (the config's ``name`` rule applies).
            OSError: ``root`` cannot be created or written, naming it.
        """
        check_name(name, argument="run name")
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"run.dir {str(root)!r}: cannot create the runs directory: {e}") from e
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
        base = f"{name}-{stamp}"
        for k in range(1, 1000):
            path = root / (base if k == 1 else f"{base}-{k}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            run_dir = cls(path)
            run_dir.checkpoints_dir.mkdir()
            return run_dir
        raise FileExistsError(f"run.dir {str(root)!r}: 999 run directories named {base!r} already exist")

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        """Reopen an existing run directory (for ``--resume`` and ``rlfleet export``).

        Raises:
            FileNotFoundError: ``path`` is not a directory or holds no ``config.yaml``.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"run directory {str(path)!r} holds no {CONFIG_FILE}: it is not a run directory "
                "written by `rlfleet run` (pass the directory that `rlfleet run` printed)"
            )
        run_dir = cls(path)
        run_dir.checkpoints_dir.mkdir(exist_ok=True)
        return run_dir

    # ------------------------------------------------------------------ paths

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def plot_path(self) -> Path:
        return self.path / "returns.png"

    @property
    def policy_state_path(self) -> Path:
        return self.path / "policy_state.pt"

    @property
    def policy_path(self) -> Path:
        return self.path / "policy.pt2"

    @property
    def policy_info_path(self) -> Path:
        return self.path / "policy.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def buffer_dir(self) -> Path:
        return self.path / "buffer"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def wandb_run_id_path(self) -> Path:
        return self.path / "wandb_run_id"

    # ------------------------------------------------------------------ contents

    def write_config(self, config: RunConfig) -> None:
        """Write the resolved config; :meth:`read_config` gives back an equal object."""
        self._write_atomic(self.config_path, dump_config(config))

    def read_config(self, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
        """The run's resolved config, with optional ``key=value`` overrides on top."""
        return load_config(self.config_path, overrides)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (thread-safe).

        A line torn by a killed session (no newline at the end of the file) is ended
        first, so the new record starts a line of its own and stays readable."""
        line = json.dumps(_json_safe(record), sort_keys=False)
        with self._lock, open(self.metrics_path, "a+b") as f:
            f.seek(0, 2)
            if f.tell() > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write((line + "\n").encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metrics records, oldest first; a torn last line (a killed run) is skipped."""
        if not self.metrics_path.exists():
            return []
        records = []
        with open(self.metrics_path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write_atomic(self.summary_path, json.dumps(_json_safe(summary), indent=2) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        """The summary of the last finished (or stopped) session, or None."""
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text())

    def read_wandb_run_id(self) -> str | None:
        """The id of the run's W&B run, or None before its first session with W&B."""
        if not self.wandb_run_id_path.exists():
            return None
        return self.wandb_run_id_path.read_text().strip() or None

    def write_wandb_run_id(self, run_id: str) -> None:
        self._write_atomic(self.wandb_run_id_path, run_id + "\n")

    def write_policy_info(self, info: dict[str, Any]) -> None:
        self._write_atomic(self.policy_info_path, json.dumps(_json_safe(info), indent=2) + "\n")

    def _write_atomic(self, path: Path, text: str) -> None:
        # Write then rename, so a run killed mid-write never leaves a half file.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"
