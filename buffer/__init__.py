"""``rlfleet.buffer``: memmap replay storage, samplers, and the sharded Ray service.

Imports nothing else of rlfleet. The Ray actors are thin shells in ``remote.py``; names,
namespaces and finding a running buffer are ``naming``'s.
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
from rlfleet.buffer.naming import (
    DEFAULT_NAMESPACE,
    actor_name,
    check_name,
    check_namespace,
    parse_actor_name,
    running_buffers,
)
from rlfleet.buffer.replay_buffer import ReplayBuffer
from rlfleet.buffer.service import ReplayService

__all__ = [
    "BufferClient",
    "BufferFormatError",
    "BufferNotFound",
    "ClusterConnectError",
    "ClusterInfo",
    "DEFAULT_NAMESPACE",
    "InsertTimeout",
    "ReplayBuffer",
    "ReplayService",
    "SampleTimeout",
    "SchemaMismatch",
    "ShardUnavailable",
    "StaleIndexError",
    "actor_name",
    "check_name",
    "check_namespace",
    "init_ray",
    "parse_actor_name",
    "running_buffers",
]
