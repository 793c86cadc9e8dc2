"""``FleetRegistry``: the memory of one collector fleet, which outlives any collector.

It holds the run state (created / running / paused / stopped), the newest weights (an
object-store reference published by ``ObjectStorePublisher``), the weight receiver every
collector must build, each collector's latest counters, how often each collector index
registered (its incarnations), and the fleet's frame budget (``max_frames``).

Runs as the Ray actor ``registry_name(fleet)`` (see ``remote.py``, calls one
at a time), and as a plain object in tests that drive a ``CollectorWorker`` without Ray.
Thread-safe: every method holds one lock, so workers on threads may share an instance.

Frame budget: a collector asks for ``grant(index, batches, batch_frames)`` when it has
used its last grant; the registry hands out whole batches until ``max_frames`` is
covered, sharing the last ones out evenly between the collectors, then answers 0. So
the fleet ends with ``max_frames`` rounded up to a whole batch. When a collector index
registers again (Ray restarted it), the part of its grants past its last report goes
back to the budget, and its frames carry over to the new incarnation.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from rlfleet.buffer import actor_name

__all__ = ["FleetRegistry", "STATES", "collector_name", "registry_name"]

log = logging.getLogger(__name__)

STATES = ("created", "running", "paused", "stopped")


def registry_name(fleet: str) -> str:
    """The actor name of fleet ``fleet``'s registry (in the fleet's namespace)."""
    return actor_name(fleet, "collectors")


def collector_name(fleet: str, index: int) -> str:
    """The actor name of collector ``index`` of fleet ``fleet`` (in the fleet's namespace)."""
    return actor_name(fleet, f"collector-{index}")


class FleetRegistry:
    """State shared by a fleet's collectors; see the module docstring.

    Args:
        fleet: The fleet's name (for log messages).
        num_collectors: Collector indices ``0 .. num_collectors - 1``.
        first_incarnation: Where incarnations start, so a resumed run (a new fleet writing
            into the same buffer) never reuses the episode ids of an earlier session.
        max_frames: The fleet's frame budget, or None for none.
        receiver: The weight receiver ``(kind, kwargs)`` collectors build as they start;
            None: none (weights reach them only once one is set).
    """

    def __init__(self, fleet: str, num_collectors: int, first_incarnation: int = 0,
                 max_frames: int | None = None,
                 receiver: tuple[str, dict[str, Any]] | None = ("object_store", {})) -> None:
        if num_collectors < 1:
            raise ValueError(f"num_collectors = {num_collectors!r}: must be >= 1")
        self.fleet = fleet
        self.max_frames = max_frames
        self.first_incarnation = first_incarnation
        self.state = "created"
        self.weights: tuple[int, list[Any]] | None = None
        self.receiver = None if receiver is None else (receiver[0], dict(receiver[1]))
        self.registrations = [0] * num_collectors
        self.reports: list[dict[str, Any] | None] = [None] * num_collectors
        # frames granted to each collector index (all its incarnations), and in all
        self.granted = [0] * num_collectors
        self.allocated = 0
        # episodes finished by earlier incarnations of each index
        self.carried_episodes = [0] * num_collectors
        self._lock = threading.Lock()

    def ping(self) -> str:
        return self.state

    def register(self, index: int) -> dict[str, Any]:
        """Called by a collector as it starts; returns its incarnation and what it resumes.

        Returns:
            ``incarnation``, ``start_frames`` (frames its index already collected),
            ``receiver`` (``(kind, kwargs)`` or None), ``state`` (the fleet's),
            ``budget`` (whether there is a frame budget) and ``budget_spent``.
        """
        self._check_index(index)
        with self._lock:
            incarnation = self.first_incarnation + self.registrations[index]
            self.registrations[index] += 1
            last = self.reports[index]
            start_frames = 0
            if last is not None:
                start_frames = int(last["frames"])
                self.carried_episodes[index] += int(last["episodes"])
                # What the old incarnation was granted past its last report goes back.
                unused = max(0, self.granted[index] - start_frames)
                self.granted[index] -= unused
                self.allocated -= unused
                # Frames stay visible until the new incarnation reports (it starts from them).
                self.reports[index] = {**last, "episodes": 0, "recent_returns": [], "recent_lengths": [],
                                       "frames_per_s": 0.0, "state": "restarting"}
            return {"incarnation": incarnation, "start_frames": start_frames,
                    "receiver": self.receiver, "state": self.state,
                    "budget": self.max_frames is not None, "budget_spent": self._budget_spent()}

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"fleet state {state!r}: must be one of {list(STATES)}")
        with self._lock:
            self.state = state

    def set_weights(self, version: int, refs: list[Any]) -> int:
        """Keep ``refs`` (a one-element list holding the weights' reference) if newer;
        returns the newest version held."""
        with self._lock:
            if self.weights is None or version > self.weights[0]:
                self.weights = (version, refs)
            else:
                log.warning("fleet %r: ignoring weights version %d (have %d)", self.fleet, version, self.weights[0])
            return self.weights[0]

    def weights_version(self) -> int:
        """The newest weights' version, -1 if none."""
        with self._lock:
            return -1 if self.weights is None else self.weights[0]

    def newer_weights(self, known_version: int) -> tuple[int, list[Any]] | None:
        with self._lock:
            if self.weights is None or self.weights[0] <= known_version:
                return None
            return self.weights

    def set_receiver(self, kind: str, kwargs: dict[str, Any]) -> None:
        with self._lock:
            self.receiver = (kind, dict(kwargs))

    def report(self, index: int, stats: dict[str, Any]) -> None:
        """Keep a collector's latest counters."""
        self._check_index(index)
        with self._lock:
            self.reports[index] = stats

    def grant(self, index: int, batches: int, batch_frames: int) -> int:
        """How many of the ``batches`` batches (``batch_frames`` frames each) collector
        ``index`` asks for it may collect: all of them while the budget lasts, an even
        share of the batches left near its end, 0 once it is covered (or without one,
        all)."""
        self._check_index(index)
        if batches < 1 or batch_frames < 1:
            raise ValueError(f"grant: batches = {batches!r}, batch_frames = {batch_frames!r}: must be >= 1")
        with self._lock:
            if self.max_frames is None:
                return batches
            left = self.max_frames - self.allocated
            if left <= 0:
                return 0
            left_batches = -(-left // batch_frames)
            n = min(batches, max(1, left_batches // len(self.granted)))
            self.granted[index] += n * batch_frames
            self.allocated += n * batch_frames
            return n

    def budget_spent(self) -> bool:
        """Whether the grants cover ``max_frames`` (no more will be handed out)."""
        with self._lock:
            return self._budget_spent()

    def _budget_spent(self) -> bool:
        return self.max_frames is not None and self.allocated >= self.max_frames

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self.state, "registrations": list(self.registrations),
                    "reports": list(self.reports), "carried_episodes": list(self.carried_episodes)}

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.registrations):
            raise ValueError(
                f"collector index {index!r}: fleet {self.fleet!r} has collectors 0..{len(self.registrations) - 1}"
            )
