"""``rlfleet.launch``: config, the command line, learners, and the main job.

Importing it is cheap: torch, Ray and the actors load when a run starts.
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
