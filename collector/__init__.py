"""``rlfleet.collector``: gymnasium envs + torch policies on Ray actors, streaming to a buffer."""

from rlfleet.collector.fleet import CollectorFleet

__all__ = ["CollectorFleet"]
