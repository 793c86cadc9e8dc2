"""``BufferClient``: write to and sample from a running replay service by name.

Runs in any process attached to the Ray cluster: the driver, a collector or learner
actor, or a separate Python process. It talks to the shard actors directly; there is
no coordinator in the path.

- ``extend`` ships the batch as flat numpy arrays to one shard: a shard on the
  caller's own node if there is one (round-robin among them), else round-robin over all.
- ``sample`` splits ``n`` over the shards by a multinomial draw weighted by each
  shard's size (uniform) or priority mass (prioritized), asks all shards at once,
  concatenates, and for prioritized sampling normalises the importance weights by the
  batch max. Each answer carries the shard's current size and mass, which weight the
  next draw, so the split costs no extra round trip.
- Indices are global: ``(shard << 56) | local_index``, so ``update_priority`` routes
  each index back to its shard.

A client pickles as its buffer name and reconnects on first use where it lands, so it
can be passed to actors. Thread-safe: calls from several threads may overlap. Connecting
tunes this process's allocator once (``tune_allocator``), as opening a buffer does, so
multi-MB sample batches reuse freed memory.

The module runs past 600 lines on purpose: routing, the sampling fan-out and the
failure handling all read and update the same per-shard state (size, mass, liveness),
and splitting them would spread one small state machine over several files.

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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from rlfleet.buffer.errors import BufferNotFound, InsertTimeout, ShardUnavailable, StaleIndexError
from rlfleet.buffer.arrays import arrays_to_tensordict, tensordict_to_arrays, tune_allocator
from rlfleet.buffer.service import NAMESPACE, _not_found_message, running_buffers, validate_name
from rlfleet.buffer.storage import check_arrays

__all__ = ["SHARD_SHIFT", "BufferClient"]

log = logging.getLogger(__name__)

SHARD_SHIFT = 56  # index = (shard << 56) | local index
_LOCAL_MASK = (1 << SHARD_SHIFT) - 1
# seconds a client waits beyond the shard's own timeout before declaring it unreachable:
# covers the transfer of a large batch and a shard restart
_GRACE_S = 30.0
# longest wait on one shard's rate limiter before an insert tries the next shard
_WRITE_SLICE_S = 1.0
# how long a shard that failed stays out of allow_partial draws before it is pinged again
_DOWN_RETRY_S = 1.0


@dataclass
class _Shard:
    handle: Any
    info: dict[str, Any]
    size: int = 0
    mass: float = 0.0
    down_since: float | None = None
    ping: Any = None  # an in-flight liveness probe while down
    extend: Any = None  # the handle's extend method without task retries, made once


# Which rows of one shard call go to which batch of a request: [(batch, rows), ...] in
# the order the shard returns them.
_Segments = list[tuple[int, int]]


@dataclass
class _Request:
    """``batches`` sample batches of ``n`` rows in flight, as one call per shard (a shard
    may appear more than once after a redraw); each call's segments say which batch its
    rows belong to."""

    n: int
    batches: int
    timeout_s: float | None
    allow_partial: bool
    deadline: float
    budget_s: float
    pending: dict[Any, tuple[int, _Segments]] = field(default_factory=dict)  # ref -> (shard, segments)


def _unpickle(name: str, timeout_s: float) -> "BufferClient":
    return BufferClient(name, timeout_s=timeout_s)


class BufferClient:
    """A handle on the replay service ``name``; see the module docstring.

    Build it with ``BufferClient.connect(name)`` (or ``ReplayService.client()``).
    """

    def __init__(self, name: str, *, timeout_s: float = 30.0, seed: int | None = None) -> None:
        self.name = validate_name(name)
        self._timeout_s = float(timeout_s)
        self._rng = np.random.default_rng(seed)
        # re-entrant: a connect that meets a dead shard forgets the shards under it
        self._lock = threading.RLock()
        self._shards: list[_Shard] | None = None
        self._writers: list[int] = []
        self._inserts_wait = True  # whether the shards' rate limiters may hold an insert
        self._rr = itertools.count()
        self._schema: dict | None = None
        self._sampler_type = "uniform"
        self._default_timeout_s = 60.0

    # -- connecting ----------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        name: str,
        *,
        address: str | None = None,
        timeout_s: float = 30.0,
        seed: int | None = None,
    ) -> "BufferClient":
        """Connect to the running buffer ``name``.

        If Ray is not initialised in this process, attaches to the cluster at
        ``address`` (default: ``RAY_ADDRESS``, else the local cluster); that is the one
        place below ``launch/`` that calls ``ray.init``, because a plain Python process
        must be able to connect by name alone.

        Args:
            name: the buffer's name.
            address: a Ray cluster address, used only when Ray is not initialised.
            timeout_s: how long to wait for the shards to answer (a shard may be
                restarting).
            seed: seeds how batches are split over shards (None: from the OS).

        Raises:
            BufferNotFound: no buffer of that name runs; the message lists those that do.
            ShardUnavailable: a shard did not answer within ``timeout_s``.
            ConnectionError: no Ray cluster to attach to, or the cluster refused this
                process (no or a wrong auth token).
        """
        _ensure_ray(address)
        client = cls(name, timeout_s=timeout_s, seed=seed)
        client._connect()
        return client

    def __reduce__(self) -> tuple[Any, tuple[str, float]]:
        # pickles as its name: handles, caches and the RNG belong to this process
        return _unpickle, (self.name, self._timeout_s)

    def __repr__(self) -> str:
        n = "?" if self._shards is None else len(self._shards)
        return f"BufferClient({self.name!r}, shards={n})"

    @property
    def num_shards(self) -> int:
        """How many shards the service has."""
        return len(self._ensure())

    @property
    def schema(self) -> dict | None:
        """The buffer's schema (key path -> (per-row shape, dtype)), None before any data."""
        self._ensure()
        return self._schema

    def _ensure(self) -> list[_Shard]:
        shards = self._shards
        if shards is None:
            with self._lock:
                if self._shards is None:
                    _ensure_ray(None)
                    self._connect()
                shards = self._shards
        return shards  # type: ignore[return-value]  # _connect set it or raised

    def _connect(self) -> None:
        import ray

        running = running_buffers()
        if self.name not in running:
            raise BufferNotFound(_not_found_message(self.name, running))
        from rlfleet.buffer.remote import shard_actor_name

        handles = []
        for k in running[self.name]:
            try:
                handles.append(ray.get_actor(shard_actor_name(self.name, k), namespace=NAMESPACE))
            except ValueError as e:  # stopped between the listing and now
                raise BufferNotFound(_not_found_message(self.name, running_buffers())) from e
        infos = self._gather([h.info.remote() for h in handles], list(range(len(handles))),
                             "connect", time.monotonic() + self._timeout_s)
        num_shards = infos[0]["num_shards"]
        if [i["shard"] for i in infos] != list(range(num_shards)):
            raise ShardUnavailable(
                f"buffer {self.name!r} should have {num_shards} shard(s) but shard(s) "
                f"{sorted(set(range(num_shards)) - {i['shard'] for i in infos})} are not running; "
                f"relaunch it with ReplayService.launch"
            )
        here = ray.get_runtime_context().get_node_id()
        shards = [_Shard(h, i) for h, i in zip(handles, infos)]
        self._writers = [k for k, s in enumerate(shards) if s.info["node_id"] == here] \
            or list(range(len(shards)))
        self._sampler_type = infos[0]["sampler_type"]
        self._default_timeout_s = float(infos[0]["rate_limiter"]["timeout_s"])
        self._inserts_wait = infos[0]["rate_limiter"].get("samples_per_insert") is not None
        self._schema = next((i["schema"] for i in infos if i["schema"]), None)
        states = self._gather([h.state.remote() for h in handles], list(range(len(handles))),
                              "connect", time.monotonic() + self._timeout_s)
        for s, st in zip(shards, states):
            s.size, s.mass = st["size"], st["mass"]
        self._shards = shards
        # Each batch is copied out of the object store into fresh arrays (14 MB for 256
        # Atari rows): keep freed ones for reuse instead of page-faulting new ones in.
        tune_allocator()
        log.debug("connected to buffer %r: %d shards, writers %s", self.name, len(shards), self._writers)

    # -- writing -------------------------------------------------------------------------

    def extend(self, td: TensorDictBase, *, timeout_s: float | None = None) -> torch.Tensor:
        """Insert a TensorDict ``[N]`` into one shard; returns global indices int64 ``[N]``.

        Waits for the shard's rate limiter up to ``timeout_s`` (default: the limiter's).

        Raises:
            SchemaMismatch: the batch differs from the buffer's schema (nothing stored).
            InsertTimeout: the rate limiter held the insert past ``timeout_s``.
            ShardUnavailable: the shard died during the call (the rows may or may not
                be stored) or did not answer in time.
        """
        arrays = tensordict_to_arrays(td, "extend")
        n = len(td)
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        shards = self._ensure()
        if self._schema is None:
            self._refresh_schema()
        if self._schema is not None:
            check_arrays(self._schema, arrays, "extend")
        wait = self._default_timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + wait
        while True:
            k = self._writers[next(self._rr) % len(self._writers)]
            shard = shards[k]
            if shard.extend is None:  # never retried by Ray: a retry after a commit stores twice
                shard.extend = shard.handle.extend.options(max_task_retries=0)
            if len(self._writers) == 1 or not self._inserts_wait:
                # One writer shard, or limiters that never hold an insert (no
                # samples_per_insert): a plain call, the timeout only when given (every
                # argument costs a serialisation on both sides, ~60 us per call here).
                ref = (shard.extend.remote(arrays) if timeout_s is None
                       else shard.extend.remote(arrays, timeout_s))
                out = self._gather([ref], [k], "extend", deadline + _GRACE_S)[0]
                break
            # Several shards take writes: wait on one at most a slice, then try the next.
            # A shard's limiter admits inserts while its samplers are ahead, and a writer
            # parked on another shard would never bring them (samplers blocked on shard A,
            # writers on shard B: a deadlock). A timed-out insert stored nothing.
            slice_s = max(0.0, min(deadline - time.monotonic(), _WRITE_SLICE_S))
            try:
                ref = shard.extend.remote(arrays, slice_s)
                out = self._gather([ref], [k], "extend", time.monotonic() + slice_s + _GRACE_S)[0]
                break
            except InsertTimeout as e:
                if time.monotonic() >= deadline:
                    raise InsertTimeout(
                        f"extend: no shard of buffer {self.name!r} admitted {n} rows within "
                        f"{wait:g}s (timeout_s); the last one said: {e}"
                    ) from e
        self._note_state(k, out["state"])
        if self._schema is None:
            self._schema = {key: (tuple(a.shape[1:]), a.dtype) for key, a in arrays.items()}
        return torch.arange(out["first"] | (k << SHARD_SHIFT), out["last"] | (k << SHARD_SHIFT), dtype=torch.int64)

    def _refresh_schema(self) -> None:
        import ray

        shards = self._ensure()
        refs = [s.handle.info.remote() for s in shards]
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
        return self._collect(self._submit(n, 1, timeout_s, allow_partial))[0]

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

        Batches are requested in groups of ``prefetch``, each group one call per shard,
        and two groups are in flight: while the caller works through one group, the
        next is on its way and the shards draw the one after, so transfers overlap the
        caller's work and each other. One call for several batches rather than one per
        batch, because a Ray call costs about half a millisecond of CPU on each side, as
        much as moving a CartPole batch. At most ``2 * prefetch`` batches wait in memory;
        ``prefetch=0`` requests each batch when it is wanted. Not to be shared between
        threads.
        """
        _check_n(n)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"sampler: prefetch={prefetch!r} must be an int >= 0")
        if prefetch == 0:
            while True:
                yield self._collect(self._submit(n, 1, timeout_s, allow_partial))[0]
        # two groups in flight: one is fetched while the shards already work on the next
        queue = deque(self._submit(n, prefetch, timeout_s, allow_partial) for _ in range(2))
        while True:
            batches = self._collect(queue.popleft())
            queue.append(self._submit(n, prefetch, timeout_s, allow_partial))
            yield from batches

    def _submit(self, n: int, batches: int, timeout_s: float | None, allow_partial: bool) -> _Request:
        wait = self._default_timeout_s if timeout_s is None else float(timeout_s)
        request = _Request(n, batches, timeout_s, allow_partial, time.monotonic() + wait + _GRACE_S,
                           wait + _GRACE_S)
        self._dispatch(request, [(b, n) for b in range(batches)], self._live_shards(allow_partial))
        return request

    def _live_shards(self, allow_partial: bool) -> list[int]:
        shards = self._ensure()
        if not allow_partial:
            return list(range(len(shards)))
        live = [k for k, s in enumerate(shards) if s.down_since is None or self._probe(k)]
        if not live:
            raise ShardUnavailable(
                f"buffer {self.name!r}: all {len(shards)} shard(s) are down; they restart "
                f"on their own, retry in a moment"
            )
        return live

    def _dispatch(self, request: _Request, segments: _Segments, candidates: list[int]) -> None:
        """Send one sample call per candidate shard for the rows of ``segments``: each
        batch's rows are split over the shards by a multinomial draw on their size
        (uniform) or priority mass (prioritized), as if the shards were one buffer."""
        shards = self._ensure()
        prioritized = self._sampler_type == "prioritized"
        weights = np.array([shards[k].mass if prioritized else shards[k].size for k in candidates],
                           dtype=np.float64)
        if not weights.sum() > 0:  # nothing known yet: even split, the limiters wait
            weights = np.ones(len(candidates))
        weights /= weights.sum()
        per_shard: list[_Segments] = [[] for _ in candidates]
        with self._lock:
            for b, rows in segments:
                for position, count in enumerate(self._rng.multinomial(rows, weights).tolist()):
                    if count:
                        per_shard[position].append((b, count))
        if prioritized:
            args: tuple = (float(sum(s.mass for s in shards)), int(sum(s.size for s in shards)),
                           request.timeout_s)
        else:
            # Only the arguments that differ from the defaults: each one is serialised on
            # both sides, which measured about 50 us per call and argument.
            args = () if request.timeout_s is None else (None, None, request.timeout_s)
        for k, mine in zip(candidates, per_shard):
            method = shards[k].handle.sample
            if request.allow_partial:
                method = method.options(max_task_retries=0)  # fail fast, draw elsewhere
            # the count may be 0: the answer still refreshes the shard's size and mass
            request.pending[method.remote(sum(rows for _, rows in mine), *args)] = (k, mine)

    def _collect(self, request: _Request) -> list[TensorDict]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        parts: list[tuple[int, dict, _Segments]] = []
        while request.pending:
            refs = list(request.pending)
            left = max(0.0, request.deadline - time.monotonic())
            try:
                # one get for all shards: a failed call is ready too, so this never
                # waits on a dead shard longer than Ray takes to notice
                outs = ray.get(refs, timeout=left)
            except GetTimeoutError:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                missing = sorted({request.pending[r][0] for r in refs if r not in ready})
                raise ShardUnavailable(
                    f"buffer {self.name!r}: shard(s) {missing} did not answer a sample within "
                    f"{request.budget_s:g}s; they may be restarting or overloaded (pass "
                    f"allow_partial=True to sample from the others)"
                ) from None
            except (RayTaskError, RayActorError):
                outs = None  # sort it out shard by shard below, once all have answered
                left = max(0.0, request.deadline - time.monotonic())
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=left)
                refs = ready  # a late one stays pending for the next round
            for position, ref in enumerate(refs):
                k, segments = request.pending.pop(ref)
                try:
                    out = outs[position] if outs is not None else ray.get(ref)
                except RayTaskError as e:
                    raise _cause(e) from e
                except RayActorError as e:
                    self._forget_if_gone(e)
                    if not request.allow_partial:
                        raise ShardUnavailable(
                            f"buffer {self.name!r}: shard {k} died during a sample and could "
                            f"not be reached again: {type(e).__name__}"
                        ) from e
                    self._mark_down(k)
                    if segments:  # its share is drawn from the live shards
                        self._dispatch(request, segments, self._live_shards(True))
                    continue
                self._note_state(k, out["state"])
                if out["arrays"] is not None:
                    parts.append((k, out["arrays"], segments))
        # each call's rows, in order, belong to the batches its segments name
        pieces: list[list[tuple[int, dict, int, int]]] = [[] for _ in range(request.batches)]
        for k, arrays, segments in parts:
            row = 0
            for b, rows in segments:
                pieces[b].append((k, arrays, row, rows))
                row += rows
        return [self._assemble(request.n, p) for p in pieces]

    def _assemble(self, n: int, pieces: list[tuple[int, dict, int, int]]) -> TensorDict:
        """One batch from ``(shard, arrays, first row, rows)`` pieces of shard answers."""
        # concatenate also copies out of the read-only object-store buffers (one piece too)
        out = {key: np.concatenate([a[key][r0:r0 + rows] for _, a, r0, rows in pieces])
               for key in pieces[0][1]}
        index, row = out[("index",)], 0
        for k, _, _, rows in pieces:
            if k:
                index[row:row + rows] |= np.int64(k << SHARD_SHIFT)
            row += rows
        if ("weight",) in out:
            w = out[("weight",)]
            out[("weight",)] = (w / w.max()).astype(np.float32)
        batch_size = list(out[("index",)].shape)
        if batch_size[0] != n:
            raise RuntimeError(f"sample: assembled {batch_size[0]} rows, expected {n}")
        return arrays_to_tensordict(out, batch_size)

    # -- priorities and stats ------------------------------------------------------------

    def update_priority(self, index: torch.Tensor | np.ndarray | list[int],
                        priority: torch.Tensor | np.ndarray | list[float]) -> None:
        """Set priorities of rows by global index; each goes to its own shard.

        Every index and priority is checked before anything is sent, so a bad call
        changes nothing.

        Raises:
            StaleIndexError: an index that no shard of this buffer issued, or of a row
                overwritten since.
            ValueError: priorities negative, NaN or inf, or not one per index.
        """
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index).astype(np.int64)
        prio = np.asarray(priority.detach().cpu() if isinstance(priority, torch.Tensor) else priority,
                          dtype=np.float64)
        if idx.shape != prio.shape:
            raise ValueError(
                f"update_priority: {prio.size} priorities (shape {list(prio.shape)}) for "
                f"{idx.size} indices (shape {list(idx.shape)}); pass one priority per index"
            )
        idx, prio = idx.reshape(-1), prio.reshape(-1)
        bad = ~np.isfinite(prio) | (prio < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"update_priority: priority[{i}]={float(prio[i])!r} is not a finite number >= 0"
            )
        shards = self._ensure()
        shard_of = idx >> SHARD_SHIFT
        wrong = (idx < 0) | (shard_of >= len(shards))
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise StaleIndexError(
                f"update_priority: index[{i}]={int(idx[i])} names shard {int(shard_of[i])}, but "
                f"buffer {self.name!r} has shards 0..{len(shards) - 1}; pass the 'index' of a "
                f"batch sampled from this buffer"
            )
        refs, order = [], []
        for k in np.unique(shard_of):
            sel = shard_of == k
            refs.append(shards[k].handle.update_priority.remote(idx[sel] & _LOCAL_MASK, prio[sel]))
            order.append(int(k))
        states = self._gather(refs, order, "update_priority", time.monotonic() + self._timeout_s)
        for k, state in zip(order, states):
            self._note_state(k, state)  # the next split sees the new masses

    def stats(self) -> dict[str, Any]:
        """Per-shard and total numbers: ``{"total": {...}, "shards": [{...}, ...]}``.

        A shard that does not answer within the client's ``timeout_s`` appears as
        ``{"shard": k, "error": "..."}`` and is left out of the totals.
        """
        import ray

        shards = self._ensure()
        refs = [s.handle.stats.remote() for s in shards]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self._timeout_s)
        rows: list[dict[str, Any]] = []
        for k, ref in enumerate(refs):
            if ref not in ready:
                rows.append({"shard": k, "error": f"no answer within {self._timeout_s:g}s"})
                continue
            try:
                rows.append(ray.get(ref))
                self._note_state(k, {"size": rows[-1]["size"], "mass": rows[-1]["priority_mass"]})
            except Exception as e:
                rows.append({"shard": k, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
        return {"total": _totals(self.name, rows), "shards": rows}

    def __len__(self) -> int:
        shards = self._ensure()
        states = self._gather([s.handle.state.remote() for s in shards], list(range(len(shards))),
                              "len", time.monotonic() + self._timeout_s)
        for k, st in enumerate(states):
            self._note_state(k, st)
        return int(sum(st["size"] for st in states))

    # -- internals -----------------------------------------------------------------------

    def _note_state(self, k: int, state: dict[str, Any]) -> None:
        shards = self._shards
        if shards is None or k >= len(shards):
            return  # forgotten after a death: the next call reconnects
        shard = shards[k]
        shard.size, shard.mass = int(state["size"]), float(state["mass"])
        shard.down_since, shard.ping = None, None

    def _forget_if_gone(self, error: Exception) -> None:
        """After a shard died for good (stopped, not restarting), look the buffer up by
        name again on the next call: it may have been relaunched with new actors."""
        from ray.exceptions import ActorDiedError

        if isinstance(error, ActorDiedError):
            with self._lock:
                self._shards = None

    def _mark_down(self, k: int) -> None:
        shard = self._ensure()[k]
        if shard.down_since is None:
            log.warning("buffer %r: shard %d is down; sampling from the others", self.name, k)
            shard.down_since = time.monotonic()
        shard.ping = None

    def _probe(self, k: int) -> bool:
        """For a shard marked down: True once a liveness ping has come back."""
        import ray

        shard = self._ensure()[k]
        if shard.ping is None:
            if time.monotonic() - (shard.down_since or 0.0) < _DOWN_RETRY_S:
                return False
            shard.ping = shard.handle.ping.options(max_task_retries=0).remote()
        ready, _ = ray.wait([shard.ping], timeout=0)
        if not ready:
            return False
        try:
            ray.get(shard.ping)
        except Exception:
            shard.down_since, shard.ping = time.monotonic(), None
            return False
        shard.down_since, shard.ping = None, None
        return True

    def _gather(self, refs: list[Any], shards: list[int], what: str, deadline: float) -> list[Any]:
        """``ray.get`` of per-shard refs with a deadline, errors in rlfleet's words."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            missing = [k for k, r in zip(shards, refs) if r not in ready]
            raise ShardUnavailable(
                f"buffer {self.name!r}: {what}: shard(s) {missing} did not answer in time; "
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
                    f"buffer {self.name!r}: {what}: shard {k} did not answer in time; it may "
                    f"be restarting or overloaded, retry later"
                ) from None
            except RayTaskError as e:
                raise _cause(e) from e
            except RayActorError as e:
                self._forget_if_gone(e)
                extra = (" The rows may or may not have been stored; a retry could store "
                         "them twice.") if what == "extend" else ""
                raise ShardUnavailable(
                    f"buffer {self.name!r}: {what}: shard {k} died during the call "
                    f"({type(e).__name__}).{extra}"
                ) from e
        return out


def _cause(e: Exception) -> BaseException:
    """The exception a shard raised, without Ray's wrapper (same type, same message)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _check_n(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"sample: n={n!r} must be a positive int")


_SUMMED = ("size", "capacity", "total_inserted", "inserts", "samples", "bytes_on_disk",
           "priority_mass", "inserts_per_s", "samples_per_s")
_LIMITER_SUMMED = ("insert_waits", "sample_waits", "insert_wait_s", "sample_wait_s",
                   "insert_timeouts", "sample_timeouts", "inserts_waiting", "samples_waiting")


def _totals(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    up = [r for r in rows if "error" not in r]
    total: dict[str, Any] = {"buffer": name, "num_shards": len(rows), "shards_up": len(up)}
    for key in _SUMMED:
        values = [r[key] for r in up if r.get(key) is not None]
        total[key] = sum(values) if values else 0
    limiter: dict[str, Any] = {}
    for key in _LIMITER_SUMMED:
        limiter[key] = sum(r["rate_limiter"][key] for r in up)
    total["rate_limiter"] = limiter
    return total


def _ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    except ConnectionError as e:
        raise ConnectionError(
            f"BufferClient: no Ray cluster at address={address or 'auto'!r}: {e}. Start one "
            f"with `ray start --head`, set RAY_ADDRESS (and RAY_AUTH_MODE=token), or pass "
            f"address=; if the cluster runs, check that RAY_AUTH_TOKEN (or ~/.ray/auth_token) "
            f"holds the cluster's token"
        ) from e
    except Exception as e:
        if type(e).__name__ != "AuthenticationError":  # ray.exceptions, 2.5x and later
            raise
        raise ConnectionError(
            f"BufferClient: the Ray cluster at address={address or 'auto'!r} refused this "
            f"process: it requires the cluster's auth token ({e}). Set RAY_AUTH_TOKEN to the "
            f"token, or copy the cluster's ~/.ray/auth_token to this machine, with "
            f"RAY_AUTH_MODE=token"
        ) from e
