"""Global row indices: which buffer, which shard and which row an ``index`` names.

Every index that rlfleet hands out (``extend``'s return value, a sample's ``"index"``)
is one non-negative int64 with three fields::

    bit 63      62 ........ 51   50 ..... 44   43 ............................ 0
    [  0  ][ tag: 12 bits ][ shard: 7 bits ][ counter: 44 bits              ]

- ``counter``: the row's position in its shard's insert order (how many rows the shard
  had stored before it). A shard refuses an ``extend`` that would take its counter to
  ``2**44`` (17.6 trillion rows: 200 days at a million rows a second), so a counter
  never reaches the shard bits.
- ``shard``: the shard that holds the row; 0 for a local ``ReplayBuffer``. The
  ``BufferClient`` sets it on the way out and clears it on the way back.
- ``tag``: 12 random bits drawn when the buffer directory is created and stored in its
  ``meta.json``. An index from another buffer, or from an earlier buffer deleted and
  created again under the same name, carries another tag and is refused with
  ``StaleIndexError`` (a random collision has odds of 1 in 4,096, and then the counter
  must also fall inside the live window).

Runs anywhere; pure functions on numpy arrays, thread-safe.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "COUNTER_BITS",
    "MAX_COUNTER",
    "MAX_SHARDS",
    "MAX_TAG",
    "SHARD_BITS",
    "SHARD_SHIFT",
    "TAG_BITS",
    "TAG_SHIFT",
    "clear_shard",
    "counter_of",
    "shard_of",
    "tag_of",
    "with_shard",
    "with_tag",
]

COUNTER_BITS = 44
SHARD_SHIFT = COUNTER_BITS
SHARD_BITS = 7
TAG_SHIFT = SHARD_SHIFT + SHARD_BITS  # 51
TAG_BITS = 12
MAX_COUNTER = 1 << COUNTER_BITS  # exclusive: the largest counter is MAX_COUNTER - 1
MAX_SHARDS = 1 << SHARD_BITS  # 128 shards, numbered 0..127
MAX_TAG = 1 << TAG_BITS

_COUNTER_MASK = np.int64(MAX_COUNTER - 1)
_SHARD_MASK = np.int64(MAX_SHARDS - 1)
_TAG_MASK = np.int64(MAX_TAG - 1)


def counter_of(index: np.ndarray) -> np.ndarray:
    """The counter field of int64 indices (same shape)."""
    return index & _COUNTER_MASK


def shard_of(index: np.ndarray) -> np.ndarray:
    """The shard field of int64 indices (same shape)."""
    return (index >> SHARD_SHIFT) & _SHARD_MASK


def tag_of(index: np.ndarray) -> np.ndarray:
    """The tag field of int64 indices (same shape)."""
    return (index >> TAG_SHIFT) & _TAG_MASK


def with_tag(counter: np.ndarray, tag: int) -> np.ndarray:
    """Indices of a local buffer: ``counter`` (int64, each below ``MAX_COUNTER``) tagged."""
    return counter | np.int64(tag << TAG_SHIFT)


def with_shard(index: np.ndarray, shard: int) -> np.ndarray:
    """A local buffer's indices as the service's: shard ``shard`` set (its bits were 0)."""
    return index | np.int64(shard << SHARD_SHIFT)


def clear_shard(index: np.ndarray) -> np.ndarray:
    """The service's indices as their shard's local ones: the shard bits cleared."""
    return index & ~np.int64(int(_SHARD_MASK) << SHARD_SHIFT)
