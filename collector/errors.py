"""Exceptions raised by ``rlfleet.collector``.

Built from a message only, so one raised inside a collector actor comes back to the
caller as the same type with the same text. Bad configuration is a plain ``ValueError``.
"""

from __future__ import annotations

__all__ = ["CollectorError"]


class CollectorError(RuntimeError):
    """A collector actor's loop failed, or the fleet could not start or reach its actors."""
