"""``rlfleet.collector``: gymnasium envs + torch policies on Ray actors, streaming to a buffer."""

from rlfleet.collector.collector import Collector
from rlfleet.collector.config import CollectorConfig, EnvConfig, ExplorationConfig, PolicyConfig
from rlfleet.collector.envs import make_env, make_vector_env
from rlfleet.collector.errors import CollectorError
from rlfleet.collector.fleet import CollectorFleet
from rlfleet.collector.policies import GaussianActor, QNetwork, build_policy
from rlfleet.collector.weights import WeightReceiver, make_receiver

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
    "WeightReceiver",
    "build_policy",
    "make_env",
    "make_receiver",
    "make_vector_env",
]
