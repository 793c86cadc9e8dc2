"""``rlfleet.buffer``: memmap replay storage, samplers, and the sharded Ray service.

Imports nothing else of rlfleet. The Ray actors are thin shells in ``remote.py``.
"""

from rlfleet.buffer.client import BufferClient
from rlfleet.buffer.cluster import ClusterConnectError, ClusterInfo, init_ray
from rlfleet.buffer.errors import (
    BufferFormatError,
    BufferNotFound,
    InsertTimeout,
    SampleTimeout,
    SchemaMismatch,
    ShardUnavailable,
    StaleIndexError,
)
from rlfleet.buffer.replay_buffer import ReplayBuffer
from rlfleet.buffer.service import ReplayService

__all__ = [
    "BufferClient",
    "BufferFormatError",
    "BufferNotFound",
    "ClusterConnectError",
    "ClusterInfo",
    "InsertTimeout",
    "ReplayBuffer",
    "ReplayService",
    "SampleTimeout",
    "SchemaMismatch",
    "ShardUnavailable",
    "StaleIndexError",
    "init_ray",
]
