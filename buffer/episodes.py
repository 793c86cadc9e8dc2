"""Which episodes a buffer holds whole, and putting their rows back together in order.

An episode is the rows that share an ``episode_id``: steps ``0 .. T-1`` (``step``), the
last one done (``("next", "done")``). A ring holds some episodes whole and some not:

- **cut**: rows before the last one stored are missing. The ring overwrote the
  episode's first rows (its step 0 is gone) or, when shards wrap at different times or
  a live writer overwrote rows during the export, rows further in.
- **unfinished**: steps ``0 .. k`` all there, none done: still running when read.
  Also counted here, not as cut: an episode whose later rows (its done row among them)
  one shard's ring overwrote while another shard still holds steps ``0 .. k``, since
  shards wrap at different times. The index keeps no row counters, so it cannot tell
  the two apart; either way the episode is not exported.
- **inconsistent**: rows that do not form one episode (a step twice, a done row before
  the last step, two done rows). Collectors never write these.

Exporting takes two passes over the rows, because the rows of one episode may lie in
several shards (a collector's batches go to whichever local shard has stored the
fewest rows: ``write_plan``), so no single stream says when an episode is over:

1. ``EpisodeIndex`` reads ``episode_id``, ``step`` and ``done`` only (17 bytes a row)
   and keeps, per episode, its row count, first and last step and done rows;
   ``EpisodePlan.build`` merges the indexes of every shard (or group of shards) and
   classifies each episode, noting which group holds each whole one.
2. ``EpisodeAssembler`` takes the rows of the planned episodes as they stream in, in
   any order across shards, holds only the episodes still open, and hands each one
   out, in step order, the moment its last row arrives.

Memory: the index holds a few numbers per episode in the buffer (not per row); the
assembler holds the open episodes' rows.

Runs wherever an export runs (driver, Ray tasks on shard nodes). Not thread-safe: one
index or assembler per thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rlfleet.buffer.dataset_layout import DONE, EPISODE_ID, STEP

__all__ = ["EpisodeAssembler", "EpisodeIndex", "EpisodePlan", "INDEX_KEYS"]

INDEX_KEYS = (EPISODE_ID, STEP, DONE)  # what pass 1 reads
_FIELDS = ("ids", "rows", "first", "last", "dones", "done_step")

Arrays = dict[tuple[str, ...], np.ndarray]


def _reduce(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Group the entries of ``t`` by episode id (sorted ids out)."""
    order = np.argsort(t["ids"], kind="stable")
    ids = t["ids"][order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
    if not len(ids):
        return {k: t[k][:0] for k in _FIELDS}
    return {
        "ids": ids[starts],
        "rows": np.add.reduceat(t["rows"][order], starts),
        "first": np.minimum.reduceat(t["first"][order], starts),
        "last": np.maximum.reduceat(t["last"][order], starts),
        "dones": np.add.reduceat(t["dones"][order], starts),
        "done_step": np.maximum.reduceat(t["done_step"][order], starts),
    }


def _concat(tables: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([t[k] for t in tables]) for k in _FIELDS}


class EpisodeIndex:
    """Per-episode counts of the rows seen (pass 1); feed it chunks with :meth:`add`."""

    def __init__(self) -> None:
        self._reduced: dict[str, np.ndarray] | None = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_len = 0

    def add(self, episode_id: np.ndarray, step: np.ndarray, done: np.ndarray) -> None:
        """Count rows: ``episode_id``, ``step`` int ``[n]``, ``done`` bool ``[n]`` or ``[n, 1]``."""
        episode_id = np.asarray(episode_id, dtype=np.int64).reshape(-1)
        step = np.asarray(step, dtype=np.int64).reshape(-1)
        if not len(step):
            return
        done = np.asarray(done, dtype=bool).reshape(len(step), -1)[:, 0]
        self._pending.append(_reduce({
            "ids": episode_id, "rows": np.ones(len(step), np.int64), "first": step, "last": step,
            "dones": done.astype(np.int64), "done_step": np.where(done, step, -1),
        }))
        self._pending_len += len(self._pending[-1]["ids"])
        if self._pending_len > max(1 << 16, 2 * len(self._reduced["ids"]) if self._reduced else 0):
            self.table()

    def table(self) -> dict[str, np.ndarray]:
        """``{"ids", "rows", "first", "last", "dones", "done_step"}``: one entry per
        episode seen, sorted by id (``done_step`` -1 when no done row)."""
        if self._pending:
            parts = ([self._reduced] if self._reduced is not None else []) + self._pending
            self._reduced = _reduce(_concat(parts))
            self._pending, self._pending_len = [], 0
        if self._reduced is None:
            self._reduced = {k: np.zeros(0, np.int64) for k in _FIELDS}
        return self._reduced


@dataclass
class EpisodePlan:
    """The whole episodes of a buffer and the counts of the others.

    Attributes:
        ids: sorted episode ids of the whole episodes, int64 ``[E]``.
        lengths: their step counts, int64 ``[E]``.
        groups: which group holds all of each one's rows, int64 ``[E]``; -1 when its
            rows lie in several groups.
        counts: ``{"complete", "cut", "unfinished", "inconsistent"}`` episodes.
        rows: rows indexed (all groups).
    """

    ids: np.ndarray
    lengths: np.ndarray
    groups: np.ndarray
    counts: dict[str, int]
    rows: int = 0

    @classmethod
    def build(cls, tables: Sequence[dict[str, np.ndarray]]) -> "EpisodePlan":
        """Classify the episodes of the ``EpisodeIndex.table()`` of each group (see the
        module docstring for the rules)."""
        tagged = [dict(t, group=np.full(len(t["ids"]), g, np.int64)) for g, t in enumerate(tables)]
        if not tagged:
            tagged = [dict({k: np.zeros(0, np.int64) for k in _FIELDS}, group=np.zeros(0, np.int64))]
        every = {k: np.concatenate([t[k] for t in tagged]) for k in (*_FIELDS, "group")}
        merged = _reduce(every)
        # the group of each episode, or -1 when it has rows in more than one
        order = np.lexsort((every["group"], every["ids"]))
        ids, group = every["ids"][order], every["group"][order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
        lo = np.minimum.reduceat(group, starts) if len(ids) else group
        hi = np.maximum.reduceat(group, starts) if len(ids) else group
        groups = np.where(lo == hi, lo, -1)

        first, last, rows = merged["first"], merged["last"], merged["rows"]
        dones, done_step = merged["dones"], merged["done_step"]
        lost = (first > 0) | (rows < last - first + 1)
        odd = ~lost & ((rows > last - first + 1) | (dones > 1) | ((dones == 1) & (done_step != last)))
        unfinished = ~lost & ~odd & (dones == 0)
        complete = ~lost & ~odd & ~unfinished
        return cls(
            ids=merged["ids"][complete], lengths=(last + 1)[complete], groups=groups[complete],
            counts={"complete": int(complete.sum()), "cut": int(lost.sum()),
                    "unfinished": int(unfinished.sum()), "inconsistent": int(odd.sum())},
            rows=int(rows.sum()),
        )

    def select(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)`` of the whole episodes held by ``group`` alone (-1: those
        whose rows lie in several groups)."""
        mask = self.groups == group
        return self.ids[mask], self.lengths[mask]


@dataclass
class EpisodeAssembler:
    """Gathers the rows of the episodes ``ids`` (sorted int64, ``lengths`` steps each)
    from chunks in any order, and hands each episode out whole, in step order.

    Counters: ``inconsistent`` (planned episodes whose rows, once all there, were not
    steps ``0 .. T-1``), and after :meth:`finish`, ``missing`` (planned episodes whose
    rows never all arrived: overwritten by a live writer between the passes or during
    the read).
    """

    ids: np.ndarray
    lengths: np.ndarray
    inconsistent: int = 0
    missing: int = 0
    _open: dict[int, list[Arrays]] = field(default_factory=dict)
    _got: dict[int, int] = field(default_factory=dict)
    _ended: int = 0  # planned episodes whose rows all arrived (handed out or inconsistent)

    @property
    def open_episodes(self) -> int:
        return len(self._open)

    def feed(self, arrays: Arrays) -> list[Arrays]:
        """Take a chunk of rows (``{key path: [n, ...]}``; rows of other episodes are
        ignored); return the episodes it completes, ``{key path: [T, ...]}`` each."""
        if not len(self.ids) or not arrays:
            return []
        ep = np.asarray(arrays[EPISODE_ID]).reshape(-1)
        pos = np.minimum(np.searchsorted(self.ids, ep), len(self.ids) - 1)
        idx = np.flatnonzero(self.ids[pos] == ep)
        if not len(idx):
            return []
        order = np.lexsort((np.asarray(arrays[STEP]).reshape(-1)[idx], ep[idx]))
        idx = idx[order]
        episodes, pos = ep[idx], pos[idx]
        rows = {k: v[idx] for k, v in arrays.items()}  # one gather per key, grouped by episode
        bounds = np.flatnonzero(np.r_[True, episodes[1:] != episodes[:-1], True])
        out = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            eid, want = int(episodes[a]), int(self.lengths[pos[a]])
            piece = {k: v[a:b] for k, v in rows.items()}
            if eid not in self._open and b - a >= want:
                if b - a < len(episodes):  # a view would keep the whole gather alive in a writer's batch
                    piece = {k: v.copy() for k, v in piece.items()}
                done = self._whole(eid, [piece], want)
            else:
                # a copy: a view would keep the whole chunk alive while the episode is open
                self._open.setdefault(eid, []).append({k: v.copy() for k, v in piece.items()})
                self._got[eid] = self._got.get(eid, 0) + b - a
                if self._got[eid] < want:
                    continue
                del self._got[eid]
                done = self._whole(eid, self._open.pop(eid), want)
            if done is not None:
                out.append(done)
        return out

    def _whole(self, eid: int, pieces: list[Arrays], want: int) -> Arrays | None:
        self._ended += 1
        episode = pieces[0]
        if len(pieces) > 1:
            # a piece may hold several runs of steps (a shard gets every other batch)
            episode = {k: np.concatenate([p[k] for p in pieces]) for k in episode}
            order = np.argsort(episode[STEP].reshape(-1), kind="stable")
            episode = {k: v[order] for k, v in episode.items()}
        if not np.array_equal(episode[STEP].reshape(-1), np.arange(want)):
            self.inconsistent += 1
            return None
        return episode

    def finish(self) -> int:
        """Drop the episodes still open; returns how many planned episodes never had all
        their rows arrive (those open, and those of which no row came)."""
        self.missing = len(self.ids) - self._ended
        self._open.clear()
        self._got.clear()
        return self.missing
