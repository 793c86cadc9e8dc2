"""The broadcast weight transport, both ends: ``BroadcastPublisher`` and ``BroadcastReceiver``.

Past 400 lines because the two ends and the protocol they follow are one idea, best read
together; the byte layout and group forming they share are in ``weights_wire.py``.

A weight group is separate from the learners' DDP group: rank 0 is the publisher (on
learner rank 0), rank ``i + 1`` is collector ``i``'s receiver; world size
``1 + num_collectors``. It is a standalone gloo process group over a ``TCPStore`` the
publisher hosts, so forming it touches no process's default group.

Protocol (all keys in the publisher's store; ``g`` is a generation number):

- ``layout``: JSON list of ``[key, dtype, shape]`` of the state dict, written once by the
  publisher. A message is ``int64 version`` (8 bytes) then every tensor's bytes in that
  order: one ``uint8`` broadcast per publish, then an ``int64`` allreduce of ones (the
  ack: rank 0 sees ``num_collectors`` only if every receiver got it).
- ``joins``: a counter every new receiver increments once. The publisher re-forms the
  group when it changes (a collector restarted) or when a broadcast fails (one died).
- ``gen``: a counter the publisher increments to start generation ``g``. Every receiver
  joins the first generation above the one it last saw (a rendezvous on the prefix
  ``g<g>/`` bounded by ``form_timeout_s``) and then serves it.
- ``g<g>/pub/<n>``: set by the publisher just before its ``n``-th broadcast in
  generation ``g``. A receiver polls for it every ``CHECK_INTERVAL_S`` (and for ``gen``
  every ``WAIT_SLICE_S``) and enters the collective only once it is there, so every wait
  inside gloo is short (``op_timeout_s``), and a receiver never blocks a re-formed group
  while stuck in an old one.

The publisher never makes the learner wait: ``publish`` stores the newest weights and a
sender thread forms the group and broadcasts. Whenever no group stands (before the
first forms, while one re-forms, after a failed broadcast) the newest version goes
through the fleet's object store instead, from the publisher itself
(``ObjectStorePublisher``); every receiver reads the object store too and returns the
newer of the two. So the driver never relays weights, and a restarted collector finds
the newest version in the object store before it rejoins the group.

Thread-safety: the publisher's ``publish``, ``stats`` and ``close`` may be called from
any thread. A receiver is polled by one thread (the collector's); its own daemon thread
does the receiving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rlfleet.buffer import DEFAULT_NAMESPACE
from rlfleet.collector.weights_object_store import ObjectStorePublisher, ObjectStoreReceiver
from rlfleet.collector.weights_wire import (
    GEN_KEY,
    JOINS_KEY,
    LAYOUT_KEY,
    broadcast_options,
    gloo_group,
    local_address,
    message_bytes,
    pack_state_dict,
    state_dict_layout,
    unpack_state_dict,
)

# The wire format's functions are re-exported: they are part of this transport.
__all__ = [
    "BroadcastPublisher",
    "BroadcastReceiver",
    "broadcast_options",
    "gloo_group",
    "pack_state_dict",
    "state_dict_layout",
    "unpack_state_dict",
]

logger = logging.getLogger(__name__)

# How often a waiting receiver re-checks the generation counter.
WAIT_SLICE_S = 0.2
# How often a receiver looks for the next message: the bound on its added latency.
CHECK_INTERVAL_S = 0.01
CHECKS_PER_GEN_CHECK = int(WAIT_SLICE_S / CHECK_INTERVAL_S)
# How often a receiver's poll() asks the object store (a Ray call) for newer weights.
FALLBACK_POLL_S = 0.5


# -- the publisher (learner rank 0) ----------------------------------------------------


class BroadcastPublisher:
    """Rank 0 of the weight group, hosting its store; see the module docstring.

    Args:
        fleet: The fleet's name, for the object-store fallback; None: no fallback (a
            group on its own, as in tests and benchmarks without Ray).
        namespace: The fleet's Ray namespace.
        num_collectors: Receivers expected in every generation.
        host: This node's address; the store listens on it and gloo binds to it.
            None: the node's address in the Ray cluster (loopback without Ray).
        port: Store port; ``0`` picks a free one (see ``port``).
        op_timeout_s: Bound of one broadcast.
        form_timeout_s: Bound of one group rendezvous.
        retry_s: After a failed forming, try again this often even if no collector rejoined.

    Raises:
        ValueError: ``num_collectors`` < 1, or no fleet ``fleet`` is running.
    """

    def __init__(self, *, fleet: str | None, namespace: str = DEFAULT_NAMESPACE, num_collectors: int,
                 host: str | None = None, port: int = 0, op_timeout_s: float = 10.0,
                 form_timeout_s: float = 30.0, retry_s: float = 10.0) -> None:
        if num_collectors < 1:
            raise ValueError(f"BroadcastPublisher: num_collectors = {num_collectors!r}: must be >= 1")
        self.fleet, self.namespace, self.num_collectors = fleet, namespace, int(num_collectors)
        self.host = host if host is not None else local_address()
        self.op_timeout_s = float(op_timeout_s)
        self.form_timeout_s = float(form_timeout_s)
        self.retry_s = float(retry_s)
        self._fallback = None if fleet is None else ObjectStorePublisher(
            fleet=fleet, namespace=namespace, num_collectors=num_collectors)
        self._store = dist.TCPStore(
            self.host, int(port), None, True, timeout=timedelta(seconds=form_timeout_s), wait_for_workers=False
        )
        self.port = int(self._store.port)
        self._cond = threading.Condition()
        self._pending: tuple[dict[str, torch.Tensor], int] | None = None
        self._stop = False
        self._forming = False  # the sender thread waits in a rendezvous (up to form_timeout_s)
        self._group: dist.ProcessGroup | None = None
        self._gen = 0
        self._n = 0
        self._joins_at_form = 0
        self._last_attempt = -float("inf")
        self._attempt_failed = False
        self._layout: list | None = None
        self.version = -1
        self.delivered_version = -1
        self.generations = 0
        self.broadcasts = 0
        self.failures = 0
        self.last_broadcast_s = 0.0
        self._thread = threading.Thread(target=self._run, name="weights-publisher", daemon=True)
        self._thread.start()

    def receiver_kwargs(self) -> dict[str, Any]:
        """What ``attach_weight_receiver("distributed", ...)`` needs to reach this group."""
        return {"host": self.host, "port": self.port, "op_timeout_s": self.op_timeout_s,
                "form_timeout_s": self.form_timeout_s}

    @property
    def group_ready(self) -> bool:
        """Whether a generation currently stands (broadcasts reach every collector)."""
        return self._group is not None

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> bool:
        """Hand over the newest weights; False (nothing moved) if ``version`` is not newer.

        Returns once they are queued for the broadcast (older undelivered weights are
        dropped), or, with no group standing, once they are in the object store.
        """
        version = int(version)
        with self._cond:
            if version <= self.version:
                return False
            self._pending = ({k: v.detach().cpu().clone() for k, v in state_dict.items()}, version)
            self.version = version
            self._cond.notify_all()
        if self._group is None:
            self._publish_fallback()
        return True

    def wait_delivered(self, version: int, timeout_s: float) -> bool:
        """Block until ``version`` (or newer) was broadcast; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.delivered_version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stats(self) -> dict[str, float]:
        """Counters for metrics (``weights/...``)."""
        return {
            "weights/version": float(self.version),
            "weights/delivered_version": float(self.delivered_version),
            "weights/object_store_version": float(-1 if self._fallback is None else self._fallback.version),
            "weights/generations": float(self.generations),
            "weights/broadcasts": float(self.broadcasts),
            "weights/failures": float(self.failures),
            "weights/group_ready": float(self.group_ready),
            "weights/last_broadcast_s": self.last_broadcast_s,
        }

    def close(self) -> None:
        """Stop the sender thread; the store closes with this object.

        Waits for a broadcast in flight (at most ``op_timeout_s``), never for a group
        that is still forming: nobody needs that group any more, and its rendezvous
        would hold a short run's shutdown for ``form_timeout_s``. The thread is a daemon
        and ends with the process.
        """
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if not self._forming:
            self._thread.join(timeout=self.op_timeout_s + 1.0)
        self._group = None
        if self._fallback is not None:
            self._fallback.close()

    def _publish_fallback(self) -> None:
        """Put the newest weights in the object store unless they are there already."""
        if self._fallback is None:
            return
        with self._cond:
            item = self._pending
        if item is None or item[1] <= self._fallback.version:
            return
        try:
            self._fallback.publish(*item)
        except Exception as e:  # noqa: BLE001 - the next publish or re-forming tries again
            logger.warning("weights version %d: object-store fallback failed: %s", item[1], e)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                self._cond.wait(timeout=0.2)
                if self._stop:
                    return
                item = self._pending
            try:
                if self._layout is None and item is not None:
                    self._set_layout(item[0])
                if self._need_forming():
                    self._form()
                if self._group is not None and item is not None and item[1] > self.delivered_version:
                    self._broadcast(*item)
            except Exception:  # the thread must survive anything; the object store covers
                logger.exception("weight publisher step failed")

    def _need_forming(self) -> bool:
        if self._layout is None:
            return False  # nothing published yet: the layout is unknown
        joins = self._store.add(JOINS_KEY, 0)
        if self._group is not None:
            return joins != self._joins_at_form
        if self._gen == 0:
            return joins >= self.num_collectors
        if not self._attempt_failed:
            return True  # a broadcast failed: try again at once
        return joins != self._joins_at_form or time.monotonic() - self._last_attempt >= self.retry_s

    def _form(self) -> None:
        self._group = None
        # A collector (re)joining has only what the object store holds until the group stands.
        self._publish_fallback()
        self._joins_at_form = self._store.add(JOINS_KEY, 0)
        self._gen = self._store.add(GEN_KEY, 1)
        self._n = 0
        self._last_attempt = time.monotonic()
        self._forming = True
        try:
            group = gloo_group(
                self._store, self._gen, 0, self.num_collectors + 1, host=self.host, timeout_s=self.form_timeout_s
            )
        except Exception as e:
            self._attempt_failed = True
            self.failures += 1
            if self._stop:  # closed meanwhile: nothing is waiting for this group
                return
            logger.warning("weight group generation %d did not form within %.0fs (%s); weights go through "
                           "the object store until it does", self._gen, self.form_timeout_s, e)
            return
        finally:
            self._forming = False
        group.set_timeout(timedelta(seconds=self.op_timeout_s))
        self._group = group
        self._attempt_failed = False
        self.generations += 1
        logger.info("weight group generation %d formed with %d collectors", self._gen, self.num_collectors)

    def _broadcast(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        payload = pack_state_dict(state_dict, version)
        start = time.perf_counter()
        try:
            self._store.set(f"g{self._gen}/pub/{self._n}", b"1")
            self._n += 1
            group = self._group
            group.broadcast([payload], broadcast_options()).wait()
            ack = torch.zeros(1, dtype=torch.int64)
            group.allreduce([ack]).wait()
            if int(ack[0]) != self.num_collectors:
                raise RuntimeError(f"ack from {int(ack[0])} of {self.num_collectors} collectors")
        except Exception as e:
            self._group = None
            self._attempt_failed = False
            self.failures += 1
            logger.warning("weight broadcast of version %d failed (%s); re-forming the group", version, e)
            self._publish_fallback()
            return
        self.last_broadcast_s = time.perf_counter() - start
        self.broadcasts += 1
        with self._cond:
            self.delivered_version = max(self.delivered_version, version)
            self._cond.notify_all()

    def _set_layout(self, state_dict: dict[str, torch.Tensor]) -> None:
        # Once, before the first group: receivers size their buffer from it.
        layout = state_dict_layout(state_dict)
        self._store.set(LAYOUT_KEY, json.dumps(layout).encode())
        self._layout = layout


# -- the receiver (one per collector actor) --------------------------------------------


class BroadcastReceiver:
    """Collector ``collector_index``'s end of the weight group (runs in a collector actor).

    Args:
        collector_index: This collector's index ``i`` (rank ``i + 1`` in the group).
        num_collectors: Collectors in the group (world size minus one).
        host: Address of the publisher's store.
        port: Port of the publisher's store.
        op_timeout_s: Bound of one broadcast once it started.
        form_timeout_s: Bound of one group rendezvous.
        connect_timeout_s: How long to wait for the store at start.
        fleet: The fleet's name; ``poll`` then also reads the fleet's object-store
            weights, which carry the versions the publisher could not broadcast, and
            returns the newer. None: the group only (tests without Ray).
        namespace: The fleet's Ray namespace.

    Raises:
        ValueError: ``collector_index`` outside ``[0, num_collectors)``.
        ConnectionError: The publisher's store is not reachable in time.
    """

    def __init__(self, *, collector_index: int, num_collectors: int, host: str, port: int,
                 op_timeout_s: float = 10.0, form_timeout_s: float = 30.0, connect_timeout_s: float = 30.0,
                 fleet: str | None = None, namespace: str = DEFAULT_NAMESPACE) -> None:
        if not 0 <= collector_index < num_collectors:
            raise ValueError(f"BroadcastReceiver: collector_index={collector_index} is outside "
                             f"[0, num_collectors={num_collectors})")
        self.collector_index = int(collector_index)
        self.num_collectors = int(num_collectors)
        self.op_timeout_s = float(op_timeout_s)
        self.form_timeout_s = float(form_timeout_s)
        self._address = local_address()
        try:
            self._store = dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=connect_timeout_s))
        except Exception as e:
            raise ConnectionError(
                f"BroadcastReceiver: cannot reach the weight publisher's store at {host}:{port} "
                f"within {connect_timeout_s}s ({e}); is the learner group running?"
            ) from e
        self._fallback = None if fleet is None else ObjectStoreReceiver(fleet=fleet, namespace=namespace)
        self._fallback_polled = -float("inf")
        self._lock = threading.Lock()
        self._latest: tuple[dict[str, torch.Tensor], int] | None = None
        self._returned_version = -1
        self._stop = threading.Event()
        self.generations_joined = 0
        self.messages = 0
        # Read the generation before announcing, so the one our join triggers is above it.
        self._seen_gen = self._store.add(GEN_KEY, 0)
        self._store.add(JOINS_KEY, 1)
        self._thread = threading.Thread(target=self._run, name=f"weights-receiver-{collector_index}", daemon=True)
        self._thread.start()

    def poll(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The newest ``(state_dict, version)`` if newer than the last returned, else None.

        Never blocks long (the object store is asked at most every ``FALLBACK_POLL_S``,
        with its own short timeout).
        """
        candidates = []
        with self._lock:
            if self._latest is not None:
                candidates.append(self._latest)
        now = time.monotonic()
        if self._fallback is not None and now - self._fallback_polled >= FALLBACK_POLL_S:
            self._fallback_polled = now
            got = self._fallback.poll()
            if got is not None:
                candidates.append(got)
        newest = max(candidates, key=lambda c: c[1], default=None)
        if newest is None or newest[1] <= self._returned_version:
            return None
        self._returned_version = newest[1]
        return newest

    def close(self) -> None:
        """Stop receiving (the thread leaves at its next wait slice)."""
        self._stop.set()
        self._thread.join(timeout=2 * WAIT_SLICE_S + 1.0)
        if self._fallback is not None:
            self._fallback.close()

    def _run(self) -> None:
        store_failures = 0
        while not self._stop.is_set():
            try:
                gen = self._store.add(GEN_KEY, 0)
                store_failures = 0
            except Exception as e:
                store_failures += 1
                if store_failures >= 3:  # the publisher stopped: nothing more will come
                    logger.info("weight store unreachable (%s); receiver %d stops", e, self.collector_index)
                    return
                time.sleep(WAIT_SLICE_S)
                continue
            if gen <= self._seen_gen:
                time.sleep(WAIT_SLICE_S)
                continue
            self._seen_gen = gen
            try:
                self._serve(gen)
            except Exception as e:  # a peer died or timed out: wait for the next generation
                logger.info("weight group generation %d ended on collector %d: %s", gen, self.collector_index, e)

    def _serve(self, gen: int) -> None:
        group = gloo_group(self._store, gen, self.collector_index + 1, self.num_collectors + 1,
                           host=self._address, timeout_s=self.form_timeout_s)
        group.set_timeout(timedelta(seconds=self.op_timeout_s))
        self.generations_joined += 1
        layout = json.loads(self._store.get(LAYOUT_KEY).decode())
        buf = torch.empty(message_bytes(layout), dtype=torch.uint8)
        opts = broadcast_options()
        n = 0
        checks = 0
        while not self._stop.is_set():
            # store.check never blocks (a timed-out store.wait logs a warning each time).
            if not self._store.check([f"g{gen}/pub/{n}"]):
                checks += 1
                if checks % CHECKS_PER_GEN_CHECK == 0 and self._store.add(GEN_KEY, 0) != gen:
                    return  # the publisher started a newer generation
                time.sleep(CHECK_INTERVAL_S)
                continue
            group.broadcast([buf], opts).wait()
            # The ack: a broadcast's sends can complete into a dead peer's socket buffer,
            # an allreduce cannot, so the publisher learns of every missing receiver.
            group.allreduce([torch.ones(1, dtype=torch.int64)]).wait()
            state_dict, version = unpack_state_dict(buf, layout)
            with self._lock:
                self._latest = (state_dict, version)
            self.messages += 1
            n += 1
