"""``rlfleet.launch``: config, the command line, learners, and the main job.

Training from Python is what ``rlfleet run`` does::

    from rlfleet.launch import load_config, run
    result = run(load_config("configs/smoke.yaml", {"run.total_frames": 2000}))
    result.run_dir, result.frames, result.mean_return   # a RunResult

Importing the package is cheap (milliseconds): its names load on first use (PEP 562),
so the command line starts without torch. The config names (``load_config``,
``RunConfig``...) load torch, through the sections ``rlfleet.buffer`` and
``rlfleet.collector`` define; ``run`` loads Ray too, and the actors start when a run does.
Runs on the driver; importing is thread-safe (Python's import lock).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from rlfleet.launch.config import (
        BufferConfig,
        ConfigError,
        LearnerConfig,
        RateLimiterConfig,
        RayConfig,
        RunConfig,
        RunSection,
        SamplerConfig,
        load_config,
    )
    from rlfleet.launch.job import RunResult, run

# public name -> the module defining it
_HOMES = {
    "BufferConfig": "rlfleet.launch.config",
    "ConfigError": "rlfleet.launch.config",
    "LearnerConfig": "rlfleet.launch.config",
    "RateLimiterConfig": "rlfleet.launch.config",
    "RayConfig": "rlfleet.launch.config",
    "RunConfig": "rlfleet.launch.config",
    "RunResult": "rlfleet.launch.job",
    "RunSection": "rlfleet.launch.config",
    "SamplerConfig": "rlfleet.launch.config",
    "load_config": "rlfleet.launch.config",
    "run": "rlfleet.launch.job",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rlfleet.launch' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
