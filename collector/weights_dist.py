"""Receiving policy weights by torch.distributed broadcast (the collector side).

A weight group is separate from the learners' DDP group: rank 0 is the publisher (a
learner rank's ``BroadcastPublisher`` in ``rlfleet.launch.weights``), rank ``i + 1`` is
collector ``i``; world size ``1 + num_collectors``. It is a standalone gloo process
group over a ``TCPStore`` that the publisher hosts, so forming it touches no process's
default group.

Protocol (all keys in the publisher's store; ``g`` is a generation number):

- ``layout``: JSON list of ``[key, dtype, shape]`` of the state dict, written once by the
  publisher. A message is ``int64 version`` (8 bytes) then every tensor's bytes in that
  order: one ``uint8`` broadcast per publish, followed by an ``int64`` allreduce of
  ones (the ack: rank 0 sees ``num_collectors`` only if every receiver got it).
- ``joins``: a counter every new receiver increments once. The publisher re-forms the
  group when it changes (a collector restarted) or when a broadcast fails (one died).
- ``gen``: a counter the publisher increments to start generation ``g``. Every receiver
  joins the first generation above the one it last saw: it builds the gloo group on the
  prefix ``g<g>/`` (a rendezvous bounded by ``form_timeout_s``) and then serves it.
- ``g<g>/pub/<n>``: set by the publisher just before its ``n``-th broadcast in
  generation ``g``. A receiver polls for that key every ``CHECK_INTERVAL_S``, checking
  ``gen`` every ``WAIT_SLICE_S``; it enters the collective only once the key is there, so every wait
  inside gloo is a short one bounded by ``op_timeout_s``, and a receiver never blocks a
  re-formed group while stuck in an old one.

Any failure (a peer died, a timeout) drops the receiver's group; it then waits for the
next generation. If the store itself is gone (the publisher stopped), the thread ends.
Weights published while no group stands are not replayed by broadcast: the driver puts
them in the fleet's object store instead, and a receiver built with ``fleet=`` reads
that too, returning whichever version is newer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedReceiver",
    "gloo_group",
    "pack_state_dict",
    "state_dict_layout",
    "unpack_state_dict",
]

logger = logging.getLogger(__name__)

GEN_KEY = "gen"
JOINS_KEY = "joins"
LAYOUT_KEY = "layout"
HEADER_BYTES = 8
# How often a waiting receiver re-checks the generation counter.
WAIT_SLICE_S = 0.2
# How often a receiver looks for the next message: the bound on its added latency.
CHECK_INTERVAL_S = 0.01
CHECKS_PER_GEN_CHECK = int(WAIT_SLICE_S / CHECK_INTERVAL_S)
# How often poll() asks the object-store fallback (a Ray call) for newer weights.
FALLBACK_POLL_S = 0.5


def state_dict_layout(state_dict: dict[str, torch.Tensor]) -> list[list[Any]]:
    """``[[key, dtype name, shape], ...]`` in the state dict's order (JSON-ready)."""
    return [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in state_dict.items()]


def _nbytes(layout: list[list[Any]]) -> int:
    total = 0
    for _, dtype, shape in layout:
        numel = 1
        for d in shape:
            numel *= int(d)
        total += numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return total


def pack_state_dict(state_dict: dict[str, torch.Tensor], version: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One flat ``uint8`` tensor: the version (int64) then every tensor's bytes."""
    parts = [torch.tensor([int(version)], dtype=torch.int64).view(torch.uint8)]
    parts += [v.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for v in state_dict.values()]
    if out is None:
        return torch.cat(parts)
    return torch.cat(parts, out=out)


def unpack_state_dict(buf: torch.Tensor, layout: list[list[Any]]) -> tuple[dict[str, torch.Tensor], int]:
    """Inverse of :func:`pack_state_dict`: ``(state_dict, version)``, tensors copied out of ``buf``."""
    version = int(buf[:HEADER_BYTES].view(torch.int64)[0])
    out: dict[str, torch.Tensor] = {}
    offset = HEADER_BYTES
    for key, dtype_name, shape in layout:
        dtype = getattr(torch, dtype_name)
        numel = 1
        for d in shape:
            numel *= int(d)
        size = numel * torch.empty((), dtype=dtype).element_size()
        out[key] = buf[offset : offset + size].view(dtype).reshape(shape).clone()
        offset += size
    return out, version


def gloo_group(store: dist.Store, gen: int, rank: int, size: int, *, host: str, timeout_s: float) -> dist.ProcessGroup:
    """Build the gloo group of generation ``gen`` (blocks until all ``size`` ranks arrive or ``timeout_s``).

    ``host`` is this process's own address for gloo to bind to.
    """
    prefix = dist.PrefixStore(f"g{gen}/", store)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefix, rank, size, options)


def broadcast_options() -> dist.BroadcastOptions:
    """Options of a broadcast from rank 0 of a weight group."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return opts


def _local_address() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests, plain scripts): loopback is this node
        pass
    return "127.0.0.1"


class DistributedReceiver:
    """Collector ``collector_index``'s end of the weight broadcast group.

    Runs inside a collector actor. One thread calls ``poll`` and ``close`` (the
    collector's); a daemon thread does the receiving.

    Args:
        collector_index: this collector's index ``i`` (rank ``i + 1`` in the group).
        num_collectors: collectors in the group (world size minus one).
        host: address of the publisher's store.
        port: port of the publisher's store.
        op_timeout_s: bound of one broadcast once it started.
        form_timeout_s: bound of one group rendezvous.
        connect_timeout_s: how long to wait for the store at start.
        fleet: name of the collector fleet; when given, ``poll`` also reads the fleet's
            object-store weights (``ObjectStoreReceiver``), which carry the versions the
            publisher could not broadcast (no group standing), and returns the newer.
    """

    def __init__(
        self,
        *,
        collector_index: int,
        num_collectors: int,
        host: str,
        port: int,
        op_timeout_s: float = 10.0,
        form_timeout_s: float = 30.0,
        connect_timeout_s: float = 30.0,
        fleet: str | None = None,
    ) -> None:
        if not 0 <= collector_index < num_collectors:
            raise ValueError(
                f"DistributedReceiver: collector_index={collector_index} is outside "
                f"[0, num_collectors={num_collectors})"
            )
        self.collector_index = int(collector_index)
        self.num_collectors = int(num_collectors)
        self.op_timeout_s = float(op_timeout_s)
        self.form_timeout_s = float(form_timeout_s)
        self._address = _local_address()
        try:
            self._store = dist.TCPStore(
                host, int(port), None, False, timeout=timedelta(seconds=connect_timeout_s)
            )
        except Exception as e:
            raise ConnectionError(
                f"DistributedReceiver: cannot reach the weight publisher's store at {host}:{port} "
                f"within {connect_timeout_s}s ({e}); is the learner group running?"
            ) from e
        self._fallback = None
        if fleet is not None:
            from rlfleet.collector.weights import ObjectStoreReceiver

            self._fallback = ObjectStoreReceiver(fleet=fleet)
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
        self._thread = threading.Thread(
            target=self._run, name=f"weights-receiver-{collector_index}", daemon=True
        )
        self._thread.start()

    def poll(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The newest ``(state_dict, version)`` if newer than the last returned, else None.

        Never blocks long (the object-store fallback is asked at most every
        ``FALLBACK_POLL_S``, with its own short timeout).
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

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        store_failures = 0
        while not self._stop.is_set():
            try:
                gen = self._store.add(GEN_KEY, 0)
                store_failures = 0
            except Exception as e:
                store_failures += 1
                if store_failures >= 3:
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
        group = gloo_group(
            self._store,
            gen,
            self.collector_index + 1,
            self.num_collectors + 1,
            host=self._address,
            timeout_s=self.form_timeout_s,
        )
        group.set_timeout(timedelta(seconds=self.op_timeout_s))
        self.generations_joined += 1
        layout = json.loads(self._store.get(LAYOUT_KEY).decode())
        buf = torch.empty(HEADER_BYTES + _nbytes(layout), dtype=torch.uint8)
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
