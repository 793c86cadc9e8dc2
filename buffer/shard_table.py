"""The client's table of a service's shards: handles, what each last reported, liveness.

Runs in the process of a ``BufferClient``. One ``ShardTable`` per connection: it is built
by ``BufferClient`` on connect and dropped when a shard turns out to be gone for good
(the next call connects again). Each shard's entry keeps what the shard said at connect
(``info``: node, tag, priority limit, settings) and what its latest answer said
(``state``: size, priority mass, rows ever inserted). Every extend, sample and priority
answer carries the shard's state, so the table stays current without extra calls; it is
what the sample split weighs, what the writer choice balances and what a priority
update is checked against.

``gather`` turns a set of per-shard Ray calls into answers or one rlfleet error; after
an error, ``answers`` and ``with_stored`` say which calls did go through. ``totals``
sums the shards' stats rows into the buffer's.

With the ``"whole"`` split a request calls one shard, so the others' answers stop
coming; ``poll_states`` then asks every shard for its state in the background, at most
once per ``POLL_S`` (longer past 100 shards: at most ``POLL_CALLS_PER_S`` calls), and
folds in the answers that have arrived (never waiting). Its cost is S small calls per
period per client, not per batch.

Thread-safe for the client's use: an entry's numbers are replaced whole by whichever
answer arrives last (each is a recent true value), and liveness probes tolerate races.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rlfleet.buffer.errors import ShardUnavailable

__all__ = ["GRACE_S", "POLL_S", "ShardEntry", "ShardTable", "answers", "cause", "gather", "totals", "with_stored"]

log = logging.getLogger(__name__)

# seconds a client waits beyond a shard's own timeout before declaring it unreachable:
# covers the transfer of a large batch and a shard restart
GRACE_S = 30.0

# seconds between two background polls of the shards' states (the "whole" split): how
# stale the sizes and masses that weigh the draw may be, at S calls per period...
POLL_S = 0.5
# ...and the most state calls per second one client makes: past 100 shards the period
# grows instead (1,000 shards: every 5 s), so polling stays near 0.1 core per client
POLL_CALLS_PER_S = 200.0

# how long a shard that failed stays out of allow_partial draws before it is pinged again
_DOWN_RETRY_S = 1.0


@dataclass
class ShardEntry:
    """One shard as the client knows it."""

    handle: Any
    info: dict[str, Any]
    size: int = 0
    mass: float = 0.0
    total_inserted: int = 0  # rows the shard had ever stored, as last reported
    down_since: float | None = None
    ping: Any = None  # an in-flight liveness probe while down
    extend: Any = None  # the handle's extend method without task retries, made once

    @property
    def index_tag(self) -> int:
        """The tag of every index this shard issues."""
        return int(self.info["index_tag"])

    @property
    def priority_limit(self) -> float:
        """The largest priority this shard accepts."""
        return float(self.info["priority_limit"])


class ShardTable:
    """The shards of one service, in shard order, plus the settings they share.

    Args:
        name: the buffer's name (for messages).
        entries: one per shard, ``entries[k]`` is shard ``k``.
        node_id: the caller's Ray node: its shards take this process's writes.
    """

    def __init__(self, name: str, entries: list[ShardEntry], node_id: str | None) -> None:
        self.name = name
        self.entries = entries
        first = entries[0].info
        # writes go to the caller's own node's shards; with none there, to any
        self.writers = [k for k, e in enumerate(entries) if e.info["node_id"] == node_id] \
            or list(range(len(entries)))
        self.sampler_type: str = first["sampler_type"]
        # the importance exponent of the batch weights (prioritized), else None
        self.beta: float | None = float(first["sampler"]["beta"]) if self.sampler_type == "prioritized" else None
        self.default_timeout_s = float(first["rate_limiter"]["timeout_s"])
        # whether a shard's limiter may hold an insert (samples_per_insert set)
        self.inserts_wait = first["rate_limiter"].get("samples_per_insert") is not None
        self.schema = next((e.info["schema"] for e in entries if e.info["schema"]), None)
        # a frame-stack buffer: each client writes to one shard (write_plan's home)
        self.frame_stack = first.get("frame_stack") is not None
        self._polls: dict[Any, int] = {}  # state calls in flight -> shard
        self._polled_at = time.monotonic()  # connect just read every state
        self._poll_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, k: int) -> ShardEntry:
        return self.entries[k]

    def note_state(self, k: int, state: dict[str, Any]) -> None:
        """Record shard ``k``'s latest state (any answer): it is up, and this big."""
        entry = self.entries[k]
        entry.size, entry.mass = int(state["size"]), float(state["mass"])
        tag = state.get("index_tag", entry.info["index_tag"])
        if tag != entry.info["index_tag"]:  # its directory was created anew under it
            log.warning("buffer %r: shard %d now issues index tag %d (was %d): its directory "
                        "was replaced", self.name, k, tag, entry.info["index_tag"])
            entry.info = {**entry.info, "index_tag": tag}
            entry.total_inserted = 0
        if "total_inserted" in state:  # answers may arrive out of order: it only grows
            entry.total_inserted = max(entry.total_inserted, int(state["total_inserted"]))
        entry.down_since, entry.ping = None, None

    def poll_states(self) -> None:
        """Fold in the state polls that have answered; every ``POLL_S``, ask each shard
        that is up and has no poll in flight (a restarting one does not hold up the
        others). Never waits."""
        with self._poll_lock:
            if self._polls:
                refs = list(self._polls)
                for ref in ray.wait(refs, num_returns=len(refs), timeout=0)[0]:
                    k = self._polls.pop(ref)
                    try:
                        self.note_state(k, ray.get(ref))
                    except Exception:  # a failed poll says nothing; sample calls find out
                        pass
            if time.monotonic() - self._polled_at < max(POLL_S, len(self.entries) / POLL_CALLS_PER_S):
                return
            self._polled_at = time.monotonic()
            asked = set(self._polls.values())
            for k, entry in enumerate(self.entries):
                if entry.down_since is None and k not in asked:
                    self._polls[entry.handle.state.remote()] = k

    # -- liveness (allow_partial sampling) -----------------------------------------------

    def mark_down(self, k: int) -> None:
        """Shard ``k`` failed a call: leave it out of draws until a ping comes back."""
        entry = self.entries[k]
        if entry.down_since is None:
            log.warning("buffer %r: shard %d is down; sampling from the others", self.name, k)
            entry.down_since = time.monotonic()
        entry.ping = None

    def live(self, allow_partial: bool) -> list[int]:
        """The shards to draw from: all, or with ``allow_partial`` those not down.

        Raises:
            ShardUnavailable: with ``allow_partial``, every shard is down.
        """
        if not allow_partial:
            return list(range(len(self.entries)))
        live = [k for k, e in enumerate(self.entries) if e.down_since is None or self._probe(k)]
        if not live:
            raise ShardUnavailable(
                f"buffer {self.name!r}: all {len(self.entries)} shard(s) are down; they "
                f"restart on their own, retry in a moment"
            )
        return live

    def _probe(self, k: int) -> bool:
        """For a shard marked down: True once a liveness ping has come back."""
        entry = self.entries[k]
        if entry.ping is None:
            if time.monotonic() - (entry.down_since or 0.0) < _DOWN_RETRY_S:
                return False
            entry.ping = entry.handle.ping.options(max_task_retries=0).remote()
        ready, _ = ray.wait([entry.ping], timeout=0)
        if not ready:
            return False
        try:
            ray.get(entry.ping)
        except Exception:
            entry.down_since, entry.ping = time.monotonic(), None
            return False
        entry.down_since, entry.ping = None, None
        return True


def cause(e: Exception) -> BaseException:
    """The exception a shard raised, without Ray's wrapper (same type, same message)."""
    inner = getattr(e, "cause", None)
    return inner if isinstance(inner, BaseException) else e


def gather(name: str, refs: list[Any], shards: list[int], what: str, deadline: float,
           on_gone: Callable[[Exception], None]) -> list[Any]:
    """``ray.get`` of per-shard refs with a deadline, errors in rlfleet's words.

    Waits for every call before raising, then raises the error of the first failed one
    in ``shards`` order: a shard's own exception as itself, a dead shard as
    ``ShardUnavailable`` (after ``on_gone(error)``), a late one as ``ShardUnavailable``.
    """
    try:
        return ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
    except GetTimeoutError:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        missing = [k for k, r in zip(shards, refs) if r not in ready]
        raise ShardUnavailable(
            f"buffer {name!r}: {what}: shard(s) {missing} did not answer in time; "
            f"they may be restarting or overloaded, retry later"
        ) from None
    except (RayTaskError, RayActorError):
        # find the shard that failed, in order, once all have answered
        ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
    out = []
    for k, ref in zip(shards, refs):
        try:
            out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
        except GetTimeoutError:
            raise ShardUnavailable(
                f"buffer {name!r}: {what}: shard {k} did not answer in time; it may "
                f"be restarting or overloaded, retry later"
            ) from None
        except RayTaskError as e:
            raise cause(e) from e
        except RayActorError as e:
            on_gone(e)
            extra = (" The rows may or may not have been stored; a retry could store "
                     "them twice.") if what == "extend" else ""
            raise ShardUnavailable(
                f"buffer {name!r}: {what}: shard {k} died during the call "
                f"({type(e).__name__}).{extra}"
            ) from e
    return out


def answers(refs: list[Any]) -> list[Any | None]:
    """Each call's answer if it has come back without error, else None (never waits)."""
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=0) if ray.wait([ref], timeout=0)[0] else None)
        except Exception:  # that call's own failure
            out.append(None)
    return out


def with_stored(error: BaseException, stored: list[str]) -> BaseException:
    """``error`` again, same type, its message naming what was stored before it: a call
    over several shards is not all or nothing once sent."""
    try:
        return type(error)(f"{error} [stored before the error: {'; '.join(stored)}]")
    except Exception:  # a type that is not built from a message alone
        return error


_SUMMED = ("size", "capacity", "total_inserted", "inserts", "samples", "bytes_on_disk",
           "priority_mass", "inserts_per_s", "samples_per_s", "priority_updates",
           "priority_updates_skipped")
_LIMITER_SUMMED = ("inserts", "samples", "insert_waits", "sample_waits", "insert_wait_s",
                   "sample_wait_s", "insert_timeouts", "sample_timeouts", "inserts_waiting",
                   "samples_waiting")


def totals(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The buffer's numbers from its shards' ``stats`` rows (those with an ``"error"``
    left out): counts summed, the buffer-wide limiter's state as shard 0 reports it."""
    up = [r for r in rows if "error" not in r]
    total: dict[str, Any] = {"buffer": name, "num_shards": len(rows), "shards_up": len(up)}
    for key in _SUMMED:
        values = [r[key] for r in up if r.get(key) is not None]
        total[key] = sum(values) if values else 0
    total["rate_limiter"] = {key: sum(r["rate_limiter"][key] for r in up) for key in _LIMITER_SUMMED}
    wide = next((r["buffer_rate_limiter"] for r in up if "buffer_rate_limiter" in r), None)
    if wide is not None:
        total["buffer_rate_limiter"] = wide
    return total
