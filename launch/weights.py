"""Publishing policy weights to the collectors: a gloo broadcast group, object store fallback.

``BroadcastPublisher`` runs on learner rank 0. It hosts the ``TCPStore`` of the weight
group and owns rank 0 of it; the collectors' ``DistributedReceiver`` (in
``rlfleet.collector.weights_dist``, where the wire protocol is written down) are the
other ranks. The learner calls ``publish(state_dict, version)``, which only stores the
newest weights and returns; a sender thread does the rest:

1. (Re-)form the group when needed: at start once all ``num_collectors`` receivers have
   announced themselves, when the ``joins`` counter moved (a collector restarted), or
   after a failed broadcast. Forming bumps ``gen`` and waits at most ``form_timeout_s``
   for every receiver. A failed forming is retried when ``joins`` moves again or after
   ``retry_s``.
2. Broadcast the newest weights: set ``g<g>/pub/<n>``, then one ``uint8`` broadcast
   and an ack allreduce, each bounded by ``op_timeout_s``. A failure drops the group
   (step 1 follows).

So the learner never waits on a collector. While no group stands, ``delivered_version``
lags ``version``: the driver (``LearnerGroup``) then sends those weights through the
object store (``CollectorFleet.set_weights``), which is also the whole of the
``object_store`` transport. Thread-safe: ``publish`` and ``stats`` from any thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rlfleet.collector.weights_dist import (
    GEN_KEY,
    JOINS_KEY,
    LAYOUT_KEY,
    broadcast_options,
    gloo_group,
    pack_state_dict,
    state_dict_layout,
)

__all__ = ["BroadcastPublisher", "state_dict_to_numpy"]

logger = logging.getLogger(__name__)


def state_dict_to_numpy(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy copies of a state dict, the form weights cross Ray in."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state_dict.items()}


class BroadcastPublisher:
    """Rank 0 of the weight group (runs on learner rank 0; thread-safe).

    Args:
        num_collectors: receivers expected in every generation.
        host: this node's address; the store listens on it and gloo binds to it.
        port: store port, ``0`` picks a free one (see ``port``).
        op_timeout_s: bound of one broadcast.
        form_timeout_s: bound of one group rendezvous.
        retry_s: after a failed forming, try again this often even if no collector rejoined.
    """

    def __init__(
        self,
        num_collectors: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        op_timeout_s: float = 10.0,
        form_timeout_s: float = 30.0,
        retry_s: float = 10.0,
    ) -> None:
        if num_collectors < 1:
            raise ValueError(f"BroadcastPublisher: num_collectors={num_collectors} must be >= 1")
        self.num_collectors = int(num_collectors)
        self.host = host
        self.op_timeout_s = float(op_timeout_s)
        self.form_timeout_s = float(form_timeout_s)
        self.retry_s = float(retry_s)
        self._store = dist.TCPStore(
            host, int(port), None, True, timeout=timedelta(seconds=form_timeout_s), wait_for_workers=False
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
        """Keyword arguments for ``make_receiver("distributed", ...)`` on the collectors."""
        return {
            "host": self.host,
            "port": self.port,
            "op_timeout_s": self.op_timeout_s,
            "form_timeout_s": self.form_timeout_s,
        }

    @property
    def group_ready(self) -> bool:
        """Whether a generation currently stands (broadcasts reach every collector)."""
        return self._group is not None

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Hand over the newest weights; returns at once. Older undelivered weights are dropped."""
        with self._cond:
            self._pending = ({k: v.detach().cpu().clone() for k, v in state_dict.items()}, int(version))
            self.version = int(version)
            self._cond.notify_all()

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

    # ------------------------------------------------------------------ thread

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
            logger.warning(
                "weight group generation %d did not form within %.0fs (%s); weights go through "
                "the object store until it does",
                self._gen,
                self.form_timeout_s,
                e,
            )
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
