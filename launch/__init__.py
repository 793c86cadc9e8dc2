"""``rlfleet.launch``: config, the command line, learners, and the main job."""

from rlfleet.launch.config import load_config
from rlfleet.launch.run import run

__all__ = ["load_config", "run"]
