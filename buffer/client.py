"""``BufferClient``: write to and sample from a running replay service by name.

Runs in any process attached to the Ray cluster: the driver, a collector or learner
actor, or a separate Python process. It talks to the shard actors directly; there is
no coordinator in the path.

- ``extend`` ships the batch as flat numpy arrays to the shards on the caller's own
  node (all shards when it has none): whole to the local shard that has stored the
  fewest rows, or, for a batch of 32 MB and more when the rate limiter never holds
  inserts, cut into contiguous chunks written by the local shards in parallel
  (``write_plan`` says why).
- ``sample`` draws the whole batch from one shard chosen in proportion to its size
  (uniform) or priority mass (prioritized): one call, however many shards, and every
  row's marginal probability is exactly one buffer's. ``split="rows"`` instead splits
  every batch over all shards by a multinomial draw (one call per shard). For
  prioritized sampling the batch is weighed as one buffer's, normalised by the batch max
  (``sample_fanout`` has the details and the proof). Answers carry the shard's state,
  and a background poll keeps the others' current, so the draw never waits for it.
- ``sampler`` keeps requests in flight and hands out whichever arrives first: a slow or
  restarting shard delays its own request, not the learner.
- Indices are global (``indices``): each carries the tag of the shard directory that
  issued it and the shard's number, so ``update_priority`` routes each index back to
  its shard, and refuses, before sending anything, whatever a shard would refuse
  (``priority_routing`` states the exact semantics across shards).
- With ``samples_per_insert`` set and several shards, the rate limiter is buffer-wide:
  the ratio and ``min_size_to_sample`` hold for the buffer as a whole, whichever shards
  the writers and samplers use (``rate_limiter``, ``shared_limiter``).

What the client knows of each shard lives in its ``ShardTable`` (``shard_table``), which
also translates Ray's errors and sums the stats; finding the shards by name and
namespace is ``naming``'s. The module passes 400 lines because it is the one public
class whose calls share that table and its lock; each idea the calls use (routing,
fan-out, priority checks) has its own module.

A client pickles as its buffer name and namespace and reconnects on first use where it
lands, so it can be passed to actors. Thread-safe: calls from several threads may overlap. Connecting
tunes this process's allocator once (``tune_allocator``), as opening a buffer does, so
multi-MB sample batches reuse freed memory.

Failure model: a shard that dies is restarted by Ray. Samples, stats and priority
updates are retried by Ray on the restarted shard; ``extend`` is not (a retry after a
commit would store the rows twice) and raises ``ShardUnavailable`` instead. No call
waits longer than its timeout plus a short grace for the transfer.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError
from tensordict import TensorDict, TensorDictBase

from rlfleet.buffer import shard_table
from rlfleet.buffer.arrays import tensordict_to_arrays, tune_allocator
from rlfleet.buffer.cluster import init_ray
from rlfleet.buffer.errors import ShardUnavailable
from rlfleet.buffer.indices import with_shard
from rlfleet.buffer.naming import DEFAULT_NAMESPACE, check_name, check_namespace, find_shards
from rlfleet.buffer.priorities import parse_update
from rlfleet.buffer.priority_routing import check_update
from rlfleet.buffer.sample_fanout import SampleFanout, check_split
from rlfleet.buffer.shard_table import ShardEntry, ShardTable, answers, gather, totals, with_stored
from rlfleet.buffer.storage import check_arrays
from rlfleet.buffer.write_plan import home_shard, plan_write

__all__ = ["BufferClient"]

log = logging.getLogger(__name__)



def _unpickle(name: str, timeout_s: float, namespace: str = DEFAULT_NAMESPACE,
              split: str = "whole") -> "BufferClient":
    return BufferClient(name, timeout_s=timeout_s, namespace=namespace, split=split)


class BufferClient:
    """A handle on the replay service ``name``; see the module docstring.

    Build it with ``BufferClient.connect(name)`` (or ``ReplayService.client()``).
    ``name`` and ``namespace`` are the buffer's.
    """

    def __init__(self, name: str, *, timeout_s: float = 30.0, seed: int | None = None,
                 namespace: str = DEFAULT_NAMESPACE, split: str = "whole") -> None:
        self.name = check_name(name, argument="buffer name")
        self.namespace = check_namespace(namespace)
        self._timeout_s = float(timeout_s)
        # re-entrant: a connect that meets a dead shard forgets the shards under it
        self._lock = threading.RLock()
        self._shards: ShardTable | None = None
        self._generation = 0  # counts the times the shards were forgotten
        self._turn = itertools.count()
        self._home: int | None = None  # a frame-stack buffer's shard for this client (write_plan)
        self._schema: dict | None = None
        self._fanout = SampleFanout(self.name, self._ensure, self._forget_if_gone,
                                    np.random.default_rng(seed), check_split(split))

    # -- connecting ----------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        name: str,
        *,
        address: str | None = None,
        timeout_s: float = 30.0,
        seed: int | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        split: str = "whole",
    ) -> "BufferClient":
        """Connect to the running buffer ``name`` in Ray namespace ``namespace``.

        If Ray is not initialised in this process, joins the cluster at ``address``
        (default: ``RAY_ADDRESS``; ``"auto"``: the one ``ray start`` started on this
        machine) through ``rlfleet.buffer.init_ray``, the bounded join every rlfleet
        entry point uses. With no address and no ``RAY_ADDRESS`` it raises rather than
        attach to whatever Ray runs on the machine.

        Args:
            name: the buffer's name.
            address: a Ray cluster address, used only when Ray is not initialised.
            timeout_s: how long to wait for the cluster to answer when joining it, and
                for the shards to answer (a shard may be restarting).
            seed: seeds how batches are split over shards (None: from the OS).
            namespace: the Ray namespace the service was launched in.
            split: ``"whole"`` (default): each ``sample`` call, and each group of
                ``prefetch`` batches of a ``sampler``, is drawn from one shard chosen in
                proportion to its size or priority mass: one shard call whatever the
                shard count. ``"rows"``: every batch is split over all shards by a
                multinomial draw, one call per shard. Both give every row exactly its
                one-buffer probability; only ``"rows"`` mixes shards within a batch.

        Raises:
            BufferNotFound: no buffer of that name runs in ``namespace``; the message
                lists those that do.
            ShardUnavailable: a shard did not answer within ``timeout_s``.
            ClusterConnectError: (a ``ConnectionError``) no address to join, or the
                cluster at it does not answer within ``timeout_s``, refused this
                process's auth token, or runs other Ray/Python versions; the message
                names the address and the cause.
        """
        client = cls(name, timeout_s=timeout_s, seed=seed, namespace=namespace, split=split)
        init_ray(address, namespace=client.namespace, timeout_s=timeout_s)
        client._connect()
        return client

    def __reduce__(self) -> tuple[Any, tuple[str, float, str, str]]:
        # pickles as its address: handles, caches and the RNG belong to this process
        return _unpickle, (self.name, self._timeout_s, self.namespace, self.split)

    def __repr__(self) -> str:
        n = "?" if self._shards is None else len(self._shards)
        return f"BufferClient({self.name!r}, namespace={self.namespace!r}, shards={n}, split={self.split!r})"

    @property
    def split(self) -> str:
        """``"whole"`` or ``"rows"``: how a request's rows are spread over the shards."""
        return self._fanout.split

    @property
    def num_shards(self) -> int:
        """How many shards the service has."""
        return len(self._ensure())

    @property
    def schema(self) -> dict | None:
        """The buffer's schema (key path -> (per-row shape, dtype)), None before any data."""
        self._ensure()
        return self._schema

    def _ensure(self) -> ShardTable:
        table = self._shards
        if table is None:
            with self._lock:
                if self._shards is None:
                    init_ray(None, namespace=self.namespace)
                    self._connect()
                table = self._shards
        return table  # type: ignore[return-value]  # _connect set it or raised

    def _connect(self) -> None:
        _, handles = find_shards(self.name, self.namespace)
        order = list(range(len(handles)))
        infos = self._gather([h.info.remote() for h in handles], order, "connect")
        num_shards = infos[0]["num_shards"]
        if [i["shard"] for i in infos] != list(range(num_shards)):
            raise ShardUnavailable(
                f"buffer {self.name!r} should have {num_shards} shard(s) but shard(s) "
                f"{sorted(set(range(num_shards)) - {i['shard'] for i in infos})} are not running; "
                f"relaunch it with ReplayService.launch"
            )
        table = ShardTable(self.name, [ShardEntry(h, i) for h, i in zip(handles, infos)],
                           ray.get_runtime_context().get_node_id())
        for k, state in enumerate(self._gather([h.state.remote() for h in handles], order, "connect")):
            table.note_state(k, state)
        self._schema = self._schema or table.schema
        self._shards = table
        # Each batch is copied out of the object store into fresh arrays (14 MB for 256
        # Atari rows): keep freed ones for reuse instead of page-faulting new ones in.
        tune_allocator()
        log.debug("connected to buffer %r: %d shards, writers %s", self.name, len(table), table.writers)

    # -- writing -------------------------------------------------------------------------

    def extend(self, td: TensorDictBase, *, timeout_s: float | None = None) -> torch.Tensor:
        """Insert a TensorDict ``[N]``; returns its rows' global indices, int64 ``[N]``.

        The rows go to the shards on this process's node (see the module docstring).
        Waits for the rate limiter up to ``timeout_s`` (default: the limiter's).

        Raises:
            SchemaMismatch: the batch differs from the buffer's schema (nothing stored).
            InsertTimeout: the rate limiter held the insert past ``timeout_s`` (nothing
                stored: a batch the limiter may hold is never cut).
            ShardUnavailable: a shard died during the call (its rows may or may not be
                stored) or did not answer in time. Any other error of a cut batch names
                the chunks that were stored.
        """
        arrays = tensordict_to_arrays(td, "extend")
        n = len(td)
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        table = self._ensure()
        if self._schema is None:
            self._refresh_schema()
        if self._schema is not None:
            check_arrays(self._schema, arrays, "extend")
        wait = table.default_timeout_s if timeout_s is None else float(timeout_s)
        if table.frame_stack and self._home is None:
            self._home = home_shard(table.writers, arrays.get(("collector_id",)))
        plan = plan_write(n, sum(a.nbytes for a in arrays.values()), table.writers,
                          [e.total_inserted for e in table.entries], next(self._turn),
                          split=not table.inserts_wait and not table.frame_stack,
                          episode_id=arrays.get(("episode_id",)), home=self._home)
        refs = []
        for k, first, end in plan:
            entry = table[k]
            if entry.extend is None:  # never retried by Ray: a retry after a commit stores twice
                entry.extend = entry.handle.extend.options(max_task_retries=0)
            part = arrays if len(plan) == 1 else {key: a[first:end] for key, a in arrays.items()}
            # the timeout only when given: every argument costs a serialisation on both
            # sides (~60 us per call here)
            refs.append(entry.extend.remote(part) if timeout_s is None
                        else entry.extend.remote(part, timeout_s))
        shards = [k for k, _, _ in plan]
        deadline = time.monotonic() + wait + shard_table.GRACE_S
        try:
            outs = self._gather(refs, shards, "extend", deadline)
        except Exception as e:
            stored = []
            for (k, first, end), out in zip(plan, answers(refs)):
                if out is not None:
                    lo, hi = with_shard(np.array([out["first"], out["last"] - 1]), k)
                    stored.append(f"rows {first}..{end - 1} on shard {k} (indices {lo}..{hi})")
            if not stored:
                raise
            raise with_stored(e, stored) from e
        parts = []
        for (k, _, _), out in zip(plan, outs):
            table.note_state(k, out["state"])
            local = out["index"] if "index" in out else np.arange(out["first"], out["last"], dtype=np.int64)
            parts.append(with_shard(local, k))
        if self._schema is None:
            self._schema = {key: (tuple(a.shape[1:]), a.dtype) for key, a in arrays.items()}
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def _refresh_schema(self) -> None:
        table = self._ensure()
        refs = [e.handle.info.remote() for e in table.entries]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self._timeout_s)
        for ref in ready:
            try:
                info = ray.get(ref)
            except Exception:  # a shard that cannot say is checked by its own extend
                continue
            if info["schema"]:
                self._schema = info["schema"]
                return

    # -- sampling ------------------------------------------------------------------------

    def sample(
        self, n: int, *, timeout_s: float | None = None, allow_partial: bool = False
    ) -> TensorDict:
        """Sample ``n`` rows over all shards as a TensorDict ``[n]`` (sequence: ``[n, L]``).

        Adds ``index`` (global int64) and, for prioritized sampling, ``weight``
        (float32, normalised by the batch max).

        Args:
            n: rows to sample.
            timeout_s: longest wait for the shards' rate limiters (default: the
                limiter's ``timeout_s``); a shard that does not answer within it plus a
                short grace raises ``ShardUnavailable``.
            allow_partial: when a shard is down, draw its share from the others (the
                batch still has ``n`` rows) instead of waiting for it to restart.

        Raises:
            ValueError: ``n`` is not a positive int.
            SampleTimeout: a shard's rate limiter held the call past ``timeout_s``.
            ShardUnavailable: a shard (or, with ``allow_partial``, every shard) is
                unreachable.
        """
        _check_n(n)
        return self._fanout.collect(self._fanout.submit(n, 1, timeout_s, allow_partial))[0]

    def sampler(
        self,
        n: int,
        *,
        prefetch: int = 2,
        timeout_s: float | None = None,
        allow_partial: bool = False,
    ) -> Iterator[TensorDict]:
        """An endless iterator of ``sample(n)`` batches, fetched ahead in groups of ``prefetch``.

        The learner's loop::

            for step, batch in zip(range(num_steps), client.sampler(256, prefetch=2)):
                loss = update(batch)

        Batches are requested in groups of ``prefetch``, and two groups are in flight:
        while the caller works through one group, the next is on its way and the shards
        draw the one after, so transfers overlap the caller's work and each other. A
        group is one call (``split="whole"``: one shard) or one call per shard
        (``"rows"``); one call for several batches rather than one per batch, because a
        Ray call costs about half a millisecond of CPU on each side, as much as moving
        a CartPole batch. At most ``2 * prefetch`` batches wait in memory (up to
        ``(2 + sample_fanout.MAX_STALLED) * prefetch`` while shards are stalled, below);
        ``prefetch=0`` requests each batch when it is wanted. Not to be shared between
        threads.

        Groups are handed out in the order they arrive, not the order they were asked
        for. A group that has not arrived after ``sample_fanout.STALL_S`` (or four
        times a group's usual time in flight, if longer: a slow or restarting shard, or
        its rate limiter) stops counting as in flight: another is asked for from the
        other shards, up to ``sample_fanout.MAX_STALLED`` stalled groups, so the learner
        keeps getting batches while any shard answers. The late group is still handed
        out when it arrives, or raises as ``sample`` would. While a shard is stalled its
        rows are not drawn for new groups, so over that time they are under-represented,
        as with ``allow_partial``.
        """
        _check_n(n)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"sampler: prefetch={prefetch!r} must be an int >= 0")
        return self._fanout.stream(n, prefetch, timeout_s, allow_partial, self._timeout_s)

    # -- priorities and stats ------------------------------------------------------------

    def update_priority(self, index: torch.Tensor | np.ndarray | list[int],
                        priority: torch.Tensor | np.ndarray | list[float]) -> int:
        """Set priorities of rows by global index; returns how many rows were skipped.

        Each index goes to its own shard. Everything a shard could refuse is checked
        before anything is sent, so a refused call changes no priority on any shard;
        rows overwritten since they were sampled are skipped (and counted), not refused.
        ``priority_routing`` states the exact semantics, and the one race in which a
        shard can still refuse its part.

        Args:
            index: int64 ``[n]`` (or a scalar), as ``sample`` or ``extend`` returned it.
            priority: ``[n]`` (or a scalar), finite and >= 0.

        Returns:
            Rows skipped over all shards because they were overwritten.

        Raises:
            ValueError: priorities NaN, inf, negative or above a shard's limit, or not
                one per index (nothing sent).
            StaleIndexError: a negative index, one naming no shard of this buffer, one
                of an earlier buffer under this name or of another buffer, or one of a
                row never written (nothing sent).
            ShardUnavailable: a shard is gone or did not answer in time.
        """
        idx, prio = parse_update(index, priority)
        if len(idx) == 0:
            return 0
        generation = self._generation
        try:
            return self._update_priority(idx, prio)
        except ShardUnavailable:
            if self._generation == generation:
                raise
            # a shard was stopped for good: the buffer may run again under this name, so
            # connect and check the indices against it (they may belong to the old one)
            return self._update_priority(idx, prio)

    def _update_priority(self, idx: np.ndarray, prio: np.ndarray) -> int:
        table = self._ensure()
        parts = check_update(table, idx, prio, lambda ks: self._refresh_states(table, ks))
        shards = sorted(parts)
        refs = [table[k].handle.update_priority.remote(*parts[k]) for k in shards]
        try:
            outs = self._gather(refs, shards, "update_priority")
        except (ValueError, IndexError) as e:  # a shard refused in a race (priority_routing)
            done = [k for k, out in zip(shards, answers(refs)) if out is not None]
            if not done:
                raise
            raise with_stored(e, [f"shard(s) {done} stored their part of this update"]) from e
        for k, out in zip(shards, outs):
            table.note_state(k, out["state"])  # the next split sees the new masses
        return int(sum(out["skipped"] for out in outs))

    def _refresh_states(self, table: ShardTable, shards: list[int]) -> None:
        states = self._gather([table[k].handle.state.remote() for k in shards], shards, "update_priority")
        for k, state in zip(shards, states):
            table.note_state(k, state)

    def stats(self) -> dict[str, Any]:
        """Per-shard and total numbers: ``{"total": {...}, "shards": [{...}, ...]}``.

        A shard that does not answer within the client's ``timeout_s`` appears as
        ``{"shard": k, "error": "..."}`` and is left out of the totals. With the
        buffer-wide limiter, ``total["buffer_rate_limiter"]`` is its state (shard 0's).
        """
        table = self._ensure()
        refs = [e.handle.stats.remote() for e in table.entries]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self._timeout_s)
        rows: list[dict[str, Any]] = []
        for k, ref in enumerate(refs):
            if ref not in ready:
                rows.append({"shard": k, "error": f"no answer within {self._timeout_s:g}s"})
                continue
            try:
                rows.append(ray.get(ref))
                row = rows[-1]
                table.note_state(k, {"size": row["size"], "mass": row["priority_mass"],
                                     "total_inserted": row["total_inserted"],
                                     "index_tag": row["index_tag"]})
            except Exception as e:
                rows.append({"shard": k, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
        return {"total": totals(self.name, rows), "shards": rows}

    def __len__(self) -> int:
        table = self._ensure()
        states = self._gather([e.handle.state.remote() for e in table.entries],
                              list(range(len(table))), "len")
        for k, st in enumerate(states):
            table.note_state(k, st)
        return int(sum(st["size"] for st in states))

    # -- internals -----------------------------------------------------------------------

    def _gather(self, refs: list[Any], shards: list[int], what: str,
                deadline: float | None = None) -> list[Any]:
        if deadline is None:
            deadline = time.monotonic() + self._timeout_s
        return gather(self.name, refs, shards, what, deadline, self._forget_if_gone)

    def _forget_if_gone(self, error: Exception) -> None:
        """After a shard died for good (stopped, not restarting), look the buffer up by
        name again on the next call: it may have been relaunched with new actors."""
        if isinstance(error, ActorDiedError):
            with self._lock:
                self._shards = None
                self._generation += 1


def _check_n(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"sample: n={n!r} must be a positive int")
