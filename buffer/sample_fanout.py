"""The client's sample fan-out: choose shards for each request, ask them, reassemble.

Runs in the process of a ``BufferClient`` (``sample`` and ``sampler`` call it). A request
is ``batches`` batches of ``n`` rows: one ``sample`` call, or one group of a ``sampler``.
Where its rows come from is the client's ``split`` (``SPLITS``):

- ``"whole"`` (the default): the whole request is drawn from one shard, chosen with
  probability proportional to its size (uniform) or priority mass (prioritized). One
  shard call per request however many shards there are, so a batch costs the same at
  64 shards as at 1. Every row's marginal probability is still exactly one buffer's:
  P(shard k) * P(row | shard k) = size_k / N * 1 / size_k = 1 / N uniform, and
  mass_k / M * p^a / mass_k = p^a / M prioritized. What changes is within a request:
  its rows come from one shard, so the rows of one batch (and of one sampler group) are
  not spread over the shards in proportion to their sizes, only in expectation over
  many batches.
- ``"rows"``: each batch's rows are split over all shards by a multinomial draw weighted
  the same way, one call per shard per request: every batch mixes the shards as one
  buffer would. Its cost grows with the number of shards.

``collect`` waits for the answers and assembles the batches: global indices
(``indices.with_shard``), and importance weights of each batch from its rows' sampling
masses (``row_reader.importance_weights``, as a local buffer's: normalised by the batch
max, the same whichever shard a row came from).

Shard sizes and masses come from each answer; with ``"whole"``, shards that were not
drawn are polled for their state at most every ``ShardTable`` poll period, in the
background, so the draw never waits on a shard it does not use.

The decisions are pure functions that tests drive without Ray: ``split_weights`` (how
much each shard weighs), ``split_rows`` (the multinomial draw), ``pick_shard`` (the
whole-request draw), ``by_batch`` (which rows of which answer belong to which batch) and
``assemble`` (one batch from its pieces). ``SampleFanout`` sends the calls and gathers
the answers around them.

Rows a shard cannot serve are drawn again from the others, within the same request:

- with ``allow_partial``, the share of a shard that died or does not answer;
- with the buffer-wide rate limiter, the share of a shard that holds no row yet (it
  answers ``"short"``; the client's sizes were stale).

Not thread-safe per request: a request is collected by the thread that submitted it.
Several requests may be in flight from several threads (the RNG draw is locked).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from tensordict import TensorDict

from rlfleet.buffer import shard_table
from rlfleet.buffer.arrays import arrays_to_tensordict
from rlfleet.buffer.errors import ShardUnavailable
from rlfleet.buffer.indices import with_shard
from rlfleet.buffer.row_reader import importance_weights
from rlfleet.buffer.shard_table import ShardTable, cause

__all__ = ["MAX_STALLED", "SPLITS", "STALL_S", "Piece", "SampleFanout", "SampleRequest", "assemble",
           "by_batch", "check_split", "pick_shard", "split_rows", "split_weights"]

# how a request's rows are spread over the shards; see the module docstring
SPLITS = ("whole", "rows")
# seconds (at least; 4x a group's usual time in flight) after which a sampler group that
# has not arrived no longer counts as in flight (``SampleFanout.stream``)
STALL_S = 0.25
# sampler groups that may be stalled at once; with that many, the stream waits for
# whichever group arrives first
MAX_STALLED = 4

# Which rows of one shard call go to which batch of a request: [(batch, rows), ...] in
# the order the shard returns them.
Segments = list[tuple[int, int]]
# One shard answer's rows for one batch: (shard, arrays, masses or None, first row, rows).
Piece = tuple[int, dict, Any, int, int]


def split_weights(sizes: Sequence[int], masses: Sequence[float], prioritized: bool) -> np.ndarray:
    """Each candidate shard's share of a draw: its size (uniform) or priority mass
    (prioritized) over the total, as if the shards were one buffer; an even split while
    nothing is known (the limiters then wait for rows)."""
    weights = np.array(masses if prioritized else sizes, dtype=np.float64)
    if not weights.sum() > 0:
        weights = np.ones(len(weights))
    return weights / weights.sum()


def split_rows(rng: np.random.Generator, segments: Segments, weights: np.ndarray) -> list[Segments]:
    """Split each batch's rows (``segments``: ``[(batch, rows), ...]``) over the shards by
    one multinomial draw per batch; returns each shard's segments (zero counts left out)."""
    per_shard: list[Segments] = [[] for _ in weights]
    for b, rows in segments:
        for position, count in enumerate(rng.multinomial(rows, weights).tolist()):
            if count:
                per_shard[position].append((b, count))
    return per_shard


def pick_shard(rng: np.random.Generator, segments: Segments, weights: np.ndarray) -> list[Segments]:
    """The ``"whole"`` split: every segment of the request to one shard, drawn with
    probability ``weights``; returns each shard's segments (empty for the others)."""
    chosen = int(rng.choice(len(weights), p=weights))
    return [list(segments) if position == chosen else [] for position in range(len(weights))]


def check_split(split: object) -> str:
    """``split`` if it names a way to spread requests over shards (``SPLITS``).

    Raises:
        ValueError: it does not; the message lists the choices.
    """
    if split not in SPLITS:
        raise ValueError(
            f"split={split!r} is not one of {list(SPLITS)}: 'whole' draws each request from "
            f"one shard (cost independent of the shard count), 'rows' splits every batch "
            f"over all shards"
        )
    return str(split)


def by_batch(parts: list[tuple[int, dict, Any, Segments]], batches: int) -> list[list[Piece]]:
    """Which rows of each answer ``(shard, arrays, masses, segments)`` belong to which
    batch: the answer's rows, in order, go to the batches its segments name."""
    pieces: list[list[Piece]] = [[] for _ in range(batches)]
    for k, arrays, mass, segments in parts:
        row = 0
        for b, rows in segments:
            pieces[b].append((k, arrays, mass, row, rows))
            row += rows
    return pieces


def assemble(n: int, pieces: list[Piece], beta: float | None) -> TensorDict:
    """One batch of ``n`` rows from its pieces: rows concatenated (which also copies
    them out of the read-only object-store buffers), global indices, and, for the
    prioritized sampler (``beta`` not None), the weights of the batch as a whole."""
    out = {key: np.concatenate([a[key][r0:r0 + rows] for _, a, _, r0, rows in pieces])
           for key in pieces[0][1]}
    index, row = out[("index",)], 0
    for k, _, _, _, rows in pieces:
        if k:
            index[row:row + rows] = with_shard(index[row:row + rows], k)
        row += rows
    if beta is not None:
        mass = np.concatenate([m[r0:r0 + rows] for _, _, m, r0, rows in pieces])
        out[("weight",)] = importance_weights(mass, beta)
    batch_size = list(out[("index",)].shape)
    if batch_size[0] != n:
        raise RuntimeError(f"sample: assembled {batch_size[0]} rows, expected {n}")
    return arrays_to_tensordict(out, batch_size)


@dataclass
class SampleRequest:
    """``batches`` sample batches of ``n`` rows in flight, as one call per shard (a shard
    may appear more than once after a redraw); each call's segments say which batch its
    rows belong to."""

    n: int
    batches: int
    timeout_s: float | None
    allow_partial: bool
    deadline: float
    budget_s: float
    pending: dict[Any, tuple[int, Segments]] = field(default_factory=dict)  # ref -> (shard, segments)
    short: set[int] = field(default_factory=set)  # shards that had no row for this request
    started: float = field(default_factory=time.monotonic)


class SampleFanout:
    """Submits and collects sample requests for one client.

    Args:
        name: the buffer's name (for messages).
        table: returns the client's current ``ShardTable`` (connecting if needed).
        on_gone: called with the error when a shard is gone for good.
        rng: the generator of the split draws.
        split: ``"whole"`` or ``"rows"`` (``SPLITS``).
    """

    def __init__(self, name: str, table: Callable[[], ShardTable],
                 on_gone: Callable[[Exception], None], rng: np.random.Generator,
                 split: str = "whole") -> None:
        self.name = name
        self._table = table
        self._on_gone = on_gone
        self._rng = rng
        self._rng_lock = threading.Lock()
        self.split = check_split(split)

    def submit(self, n: int, batches: int, timeout_s: float | None, allow_partial: bool,
               avoid: set[int] | frozenset[int] = frozenset()) -> SampleRequest:
        """Send the calls of ``batches`` batches of ``n`` rows; returns the request.
        Shards in ``avoid`` (stalled ones) are left out of the draw unless no other is live."""
        table = self._table()
        wait = table.default_timeout_s if timeout_s is None else float(timeout_s)
        grace = shard_table.GRACE_S  # read per call: tests shorten it
        request = SampleRequest(n, batches, timeout_s, allow_partial,
                                time.monotonic() + wait + grace, wait + grace)
        if self.split == "whole" and len(table) > 1:
            table.poll_states()  # the shards this request does not call still weigh in
        live = table.live(allow_partial)
        candidates = [k for k in live if k not in avoid] or live
        self._dispatch(request, [(b, n) for b in range(batches)], candidates)
        return request

    def _dispatch(self, request: SampleRequest, segments: Segments, candidates: list[int]) -> None:
        """Send the sample calls for the rows of ``segments`` to ``candidates``, chosen by
        their size (uniform) or priority mass (prioritized): one shard for the whole
        request (``"whole"``) or one call per shard for its multinomial share of each
        batch (``"rows"``)."""
        table = self._table()
        weights = split_weights([table[k].size for k in candidates], [table[k].mass for k in candidates],
                                table.sampler_type == "prioritized")
        with self._rng_lock:
            if self.split == "whole":
                per_shard = pick_shard(self._rng, segments, weights)
            else:
                per_shard = split_rows(self._rng, segments, weights)
        # Only the arguments that differ from the defaults: each one is serialised on
        # both sides, which measured about 50 us per call and argument.
        args = () if request.timeout_s is None else (request.timeout_s,)
        for k, mine in zip(candidates, per_shard):
            if not mine and self.split == "whole":
                continue
            method = table[k].handle.sample
            if request.allow_partial:
                method = method.options(max_task_retries=0)  # fail fast, draw elsewhere
            # "rows": the count may be 0: the answer still refreshes the shard's size and mass
            request.pending[method.remote(sum(rows for _, rows in mine), *args)] = (k, mine)

    def stream(self, n: int, prefetch: int, timeout_s: float | None, allow_partial: bool,
               close_timeout_s: float) -> Iterator[TensorDict]:
        """The batches of ``BufferClient.sampler`` (its docstring says what the caller
        sees): groups of ``prefetch`` batches, two in flight that are not stalled, handed
        out as they arrive. On close, waits up to ``close_timeout_s`` for the calls still
        in flight, so a service shut down next does not kill them mid-call."""
        if prefetch == 0:
            while True:
                yield self.collect(self.submit(n, 1, timeout_s, allow_partial))[0]
        in_flight: list[SampleRequest] = []
        typical = 0.0  # moving average of a group's time in flight
        try:
            while True:
                now = time.monotonic()
                stall_s = max(STALL_S, 4 * typical)  # large groups take longer, and are not stalled
                stalled = [r for r in in_flight if now - r.started > stall_s]
                # two groups in flight that are not stalled, none from a shard that is
                avoid = {k for r in stalled for k, _ in r.pending.values()}
                while len(in_flight) - len(stalled) < 2 and len(in_flight) < 2 + MAX_STALLED:
                    in_flight.append(self.submit(n, prefetch, timeout_s, allow_partial, avoid))
                if len(in_flight) < 2 + MAX_STALLED:
                    done = self.first_done(in_flight, stall_s)
                    if done is None:
                        continue
                else:  # too many stalled: wait for any, up to the oldest's deadline
                    wait = min(r.deadline for r in in_flight) - now
                    done = self.first_done(in_flight, max(0.0, wait)) or in_flight[0]
                in_flight.remove(done)
                batches = self.collect(done)  # raises as sample would
                took = time.monotonic() - done.started
                typical = 0.8 * typical + 0.2 * took if typical else took
                yield from batches
        finally:
            refs = [ref for request in in_flight for ref in request.pending]
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=close_timeout_s)

    def first_done(self, requests: Sequence[SampleRequest], timeout_s: float) -> SampleRequest | None:
        """The first of ``requests`` (in order) whose calls have all answered, waiting up
        to ``timeout_s`` for one; None if none has. Answers include failed calls."""
        deadline = time.monotonic() + timeout_s
        while True:
            refs = [ref for request in requests for ref in request.pending]
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
            for request in requests:
                if all(ref in ready for ref in request.pending):
                    return request
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ray.wait([ref for ref in refs if ref not in ready], num_returns=1, timeout=left)

    def _redraw(self, request: SampleRequest, segments: Segments) -> None:
        """Draw ``segments`` again over the live shards that did not come up short."""
        table = self._table()
        candidates = [k for k in table.live(request.allow_partial) if k not in request.short]
        if not candidates:
            raise ShardUnavailable(
                f"buffer {self.name!r}: sample: every shard answered that it holds no row "
                f"although the rate limiter counted enough; a shard directory was replaced "
                f"under the running service? Relaunch it"
            )
        self._dispatch(request, segments, candidates)

    def collect(self, request: SampleRequest) -> list[TensorDict]:
        """Wait for every call of ``request``; returns its batches in order.

        Raises:
            SampleTimeout: a shard's rate limiter held the call past its timeout.
            ShardUnavailable: a shard is unreachable (with ``allow_partial``: all are).
        """
        table = self._table()
        parts: list[tuple[int, dict, Any, Segments]] = []
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
                    raise cause(e) from e
                except RayActorError as e:
                    self._on_gone(e)
                    if not request.allow_partial:
                        raise ShardUnavailable(
                            f"buffer {self.name!r}: shard {k} died during a sample and could "
                            f"not be reached again: {type(e).__name__}"
                        ) from e
                    table.mark_down(k)
                    if segments:  # its share is drawn from the live shards
                        self._redraw(request, segments)
                    continue
                table.note_state(k, out["state"])
                if out.get("short"):
                    request.short.add(k)
                    self._redraw(request, segments)
                elif out["arrays"] is not None:
                    parts.append((k, out["arrays"], out.get("mass"), segments))
        return [assemble(request.n, pieces, table.beta) for pieces in by_batch(parts, request.batches)]
