"""Exceptions raised by ``rlfleet.buffer``.

Each class subclasses the builtin a caller would catch anyway (``ValueError``,
``TimeoutError``...) and is constructed from a message only, so when one is raised
inside a Ray actor, Ray re-raises it in the caller as the same type with the same text.
Messages name the argument, the value, the limit and the fix.
"""

from __future__ import annotations

__all__ = [
    "BufferFormatError",
    "BufferNotFound",
    "InsertTimeout",
    "SampleTimeout",
    "SchemaMismatch",
    "ShardUnavailable",
    "StaleIndexError",
]


class SchemaMismatch(ValueError):
    """A batch whose keys, dtypes or shapes differ from the buffer's schema."""


class BufferFormatError(ValueError):
    """A directory that is not an rlfleet buffer, is damaged, or has a newer format."""


class StaleIndexError(IndexError):
    """An index of a row that was overwritten, never written, or belongs elsewhere."""


class SampleTimeout(TimeoutError):
    """The rate limiter held a sample call longer than its ``timeout_s``."""


class InsertTimeout(TimeoutError):
    """The rate limiter held an insert call longer than its ``timeout_s``."""


class BufferNotFound(LookupError):
    """No replay service of that name runs on the cluster."""


class ShardUnavailable(ConnectionError):
    """A shard actor is dead or restarting and the call could not be served."""
