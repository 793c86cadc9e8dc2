"""``rlfleet.collector``: gymnasium envs + torch policies on Ray actors, streaming to a buffer.

Imports only ``rlfleet.buffer``'s public names. The Ray actors are thin shells in
``remote.py`` over plain classes (``worker.CollectorWorker``, ``registry.FleetRegistry``).
"""

from rlfleet.collector.collector import Collector
from rlfleet.collector.config import CollectorConfig, EnvConfig, ExplorationConfig, PolicyConfig
from rlfleet.collector.envs import make_env, make_vector_env
from rlfleet.collector.errors import CollectorError
from rlfleet.collector.fleet import CollectorFleet
from rlfleet.collector.policies import GaussianActor, QNetwork, build_policy
from rlfleet.collector.weights import WeightPublisher, WeightReceiver, make_publisher, make_receiver

__all__ = [
    "Collector",
    "CollectorConfig",
    "CollectorError",
    "CollectorFleet",
    "EnvConfig",
    "ExplorationConfig",
    "GaussianActor",
    "PolicyConfig",
    "QNetwork",
    "WeightPublisher",
    "WeightReceiver",
    "build_policy",
    "make_env",
    "make_publisher",
    "make_receiver",
    "make_vector_env",
]
