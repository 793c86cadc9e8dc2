"""``rlfleet.launch.learners``: the learner group, its Ray actor, and the losses.

- ``learner.py``: ``Learner``, one rank's sample-update-priorities loop (no Ray), and
  ``build_algorithm``.
- ``dqn.py``, ``sac.py``: the losses, each readable top to bottom.
- ``actor.py``: ``LearnerActor``, the thin Ray shell of one rank (rank 0 publishes).
- ``group.py``: ``LearnerGroup``, the driver's handle on all ranks.

Importing this package loads Ray and torch; ``rlfleet.launch`` imports it only when a
run starts.
"""

from rlfleet.launch.learners.group import LearnerGroup, LearnerGroupError
from rlfleet.launch.learners.learner import Learner, build_algorithm

__all__ = ["Learner", "LearnerGroup", "LearnerGroupError", "build_algorithm"]
