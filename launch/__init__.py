"""``rlfleet.launch``: config, the command line, learners, and the main job.

Training from Python is what ``rlfleet run`` does::

    from rlfleet.launch import load_config, run
    result = run(load_config("configs/smoke.yaml", {"run.total_frames": 2000}))
    result.run_dir, result.frames, result.mean_return   # a RunResult

Importing it loads torch (the collector sections of the config) but not Ray: Ray and
the actors load when a run starts.
"""

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
from rlfleet.launch.run import RunResult, run

__all__ = [
    "BufferConfig",
    "ConfigError",
    "LearnerConfig",
    "RateLimiterConfig",
    "RayConfig",
    "RunConfig",
    "RunResult",
    "RunSection",
    "SamplerConfig",
    "load_config",
    "run",
]
