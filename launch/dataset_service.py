"""Exporting through a running replay service: Ray tasks read each shard on its own node.

``find_service`` looks for the service of a buffer (by the run's name, else by the
shards' paths) on the Ray cluster this process is attached to, or on ``address`` /
``RAY_ADDRESS``; it never starts a cluster. ``run_service`` then exports in two rounds
of Ray tasks, each pinned (hard node affinity) to the node of the shards it reads, each
reading its shards' directories from that node's disk (``rlfleet.buffer.scan``, beside
the live shard actor, never through it):

1. per group, an index task: ``EpisodeIndex`` of its shards (a few numbers per
   episode) and the windows it read. The driver merges them into one ``EpisodePlan``:
   which episodes are whole, and which group holds each one's rows.
2. per group, an export task writes the whole episodes that group holds alone into a
   part of the output; the episodes whose rows lie in several groups (a collector on a
   node without a shard writes to every shard) stream to the driver from a generator
   task per group (started once the export tasks are done, so their idle workers serve
   them), and the driver assembles and writes them as one more part. The driver then
   builds ``out`` from the parts (``dataset_writers.finish_*``).

A group is a node (default: the shards of one node are interleaved in one task, so an
episode split over a node's shards, the usual case with several shards per node, never
leaves the node), or a shard (``task_per="shard"``: more tasks, more episodes through
the driver). Parts are written under ``out``'s parent, which every node must see (one
machine, or a shared filesystem): each task checks a marker file the driver wrote and
fails with a clear error otherwise.

If a task fails, the driver cancels the others and waits for them (at most
``CANCEL_WAIT_S``) before ``export_dataset`` removes the parts, so that no late task
writes into a directory already removed; a failing task aborts its writer (closes it
and removes its part file). A progress bar counts the tasks done.

Tasks reserve no CPU (``num_cpus=0``): a running job's placement groups often hold
every CPU, and an export must not wait for the job to end. Runs on the driver; the
task functions run in Ray workers. Not thread-safe: one export at a time per ``out``.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlfleet.buffer.dataset_layout import EPISODE_ID
from rlfleet.buffer.episodes import EpisodeAssembler, EpisodePlan
from rlfleet.buffer.scan import BufferFiles, Chunk, least_advanced_first, scan_shards
from rlfleet.launch.dataset_writers import PartCounts, PartSpec, index_shards, progress_bar, write_chunks

if TYPE_CHECKING:
    from rlfleet.launch.dataset_export import BufferSource

__all__ = ["ServiceRun", "ServiceShards", "find_service", "run_service"]

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0
CANCEL_WAIT_S = 30.0  # after a task failed: how long to wait for the others to stop


@dataclass
class ServiceShards:
    """A running service's shards: ``[{"shard", "path", "node_id"}, ...]`` and its schema."""

    name: str
    namespace: str
    shards: list[dict[str, Any]]
    schema: dict


@dataclass
class ServiceRun:
    """What the passes of an export wrote (``run_service``, or from disk).

    Attributes:
        plan: the episodes planned (None with ``all_rows``).
        counts: every part's counts, added up.
        parts: the parts written (``PartSpec.part_writer``), to build ``out`` from.
        where: how it ran, in words.
    """

    plan: EpisodePlan | None
    counts: PartCounts
    parts: list[int] = field(default_factory=list)
    where: str = ""


def find_service(src: "BufferSource", address: str | None, *,
                 required: bool) -> tuple[ServiceShards | None, str]:
    """The running service of ``src``'s buffer and ``""``, or ``(None, why not)``
    (``required``: raise instead). A cluster that refuses this process (a wrong
    token, a Ray version mismatch) is logged as a WARNING.

    Raises:
        ValueError: ``required`` and no service of that buffer runs (or no cluster).
    """
    import ray

    from rlfleet.buffer import DEFAULT_NAMESPACE, init_ray, running_buffers
    from rlfleet.buffer.naming import find_shards

    def none(why: str) -> tuple[None, str]:
        if required:
            raise ValueError(f"export-dataset: use_service (--service): {why}")
        logger.debug("export-dataset: %s; exporting from disk", why)
        return None, why

    if not ray.is_initialized():
        if not (address or os.environ.get("RAY_ADDRESS")):
            return none("no Ray cluster to look on (pass --address, or set RAY_ADDRESS)")
        try:
            init_ray(address, timeout_s=JOIN_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure to join means: no service here
            why = (f"cannot join the Ray cluster at {address or os.environ.get('RAY_ADDRESS')!r}: {e}; check the "
                   f"address, the cluster's token and that this Ray's version is the cluster's")
            if not required:
                logger.warning("export-dataset: %s; exporting from disk", why)
            return none(why)
    namespace = src.namespace or DEFAULT_NAMESPACE
    running = running_buffers(namespace)
    local = {p.resolve() for p in src.shards}
    for name in running if src.service is None else [n for n in running if n == src.service]:
        _, handles = find_shards(name, namespace)
        infos = ray.get([h.info.remote() for h in handles], timeout=JOIN_TIMEOUT_S * 3)
        paths = {Path(i["path"]).resolve() for i in infos}
        if src.service is None and paths != local:
            continue
        shards = [{"shard": i["shard"], "path": i["path"], "node_id": i["node_id"]} for i in infos]
        schema = next((i["schema"] for i in infos if i["schema"]), None)
        return ServiceShards(name, namespace, shards, schema), ""
    return none(f"no running replay service holds {src.buffer_dir} (namespace {namespace!r}); start the run "
                f"(or pass its run directory), or export the buffer's directory from disk (--from-disk)")


# --------------------------------------------------------------------------- Ray tasks


def _check_visible(marker: str) -> None:
    if not Path(marker).exists():
        import ray

        node = ray.get_runtime_context().get_node_id()
        raise ValueError(
            f"export-dataset: the output's directory {str(Path(marker).parent.parent)!r} is not visible "
            f"on node {node}; put OUT on a filesystem every shard node shares, or export from disk on each node"
        )


def _index_group(paths: list[str]) -> dict[str, Any]:
    files = [BufferFiles.open(p) for p in paths]
    try:
        windows = [f.window() for f in files]
        return {"table": index_shards(files, windows), "windows": windows}
    finally:
        for f in files:
            f.close()


def _export_group(paths: list[str], windows: list[tuple[int, int]] | None, ids: np.ndarray,
                  lengths: np.ndarray, part: int, spec: PartSpec, marker: str) -> PartCounts:
    _check_visible(marker)
    files = [BufferFiles.open(p) for p in paths]
    try:
        assembler = None if spec.all_rows else EpisodeAssembler(ids, lengths)
        chunks = scan_shards(files, windows=windows, chunk_rows=spec.chunk_rows)
        return write_chunks(chunks, spec.part_writer(part), assembler)
    finally:
        for f in files:
            f.close()


def _spanning_rows(paths: list[str], windows: list[tuple[int, int]], ids: np.ndarray,
                   chunk_rows: int | None) -> Iterator[tuple[float, dict[tuple[str, ...], np.ndarray]]]:
    """Generator task: the rows of episodes ``ids`` in the group's shards, as
    ``(fraction read, {key path: [n, ...]})``."""
    files = [BufferFiles.open(p) for p in paths]
    try:
        for chunk in scan_shards(files, windows=windows, chunk_rows=chunk_rows):
            ep = chunk.arrays[EPISODE_ID] if chunk.arrays else np.zeros(0, np.int64)
            keep = np.isin(ep, ids)
            fraction = chunk.done / max(1, chunk.total)
            if keep.any():
                yield fraction, {k: v[keep] for k, v in chunk.arrays.items()}
    finally:
        for f in files:
            f.close()


# --------------------------------------------------------------------------- the driver


@functools.cache
def _remote(fn: Callable[..., Any]) -> Any:
    import ray

    return ray.remote(fn)


def _gather(refs: list[Any], desc: str, progress: bool) -> list[Any]:
    """``ray.get`` of every ref, a bar counting them; when one fails, cancel the others
    and wait for them (at most ``CANCEL_WAIT_S``) before raising its error."""
    import ray

    results: dict[Any, Any] = {}
    pending = list(refs)
    with progress_bar(len(refs), desc, "tasks", progress) as bar:
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                results[ready[0]] = ray.get(ready[0])
                bar.update(1)
        except BaseException:
            _cancel(pending)
            raise
    return [results[r] for r in refs]


def _cancel(refs: list[Any]) -> None:
    import ray

    for ref in refs:
        ray.cancel(ref)
    if refs:
        _, left = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
        if left:
            logger.warning("export-dataset: %d Ray task(s) still running %.0f s after cancel", len(left), CANCEL_WAIT_S)


def run_service(service: ServiceShards, spec: PartSpec, task_per: str, progress: bool) -> ServiceRun:
    """Both passes through ``service``'s nodes, parts written per ``spec`` (module
    docstring); the caller builds ``out`` from the parts. Runs on the driver."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    groups: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(service.shards, key=lambda s: s["shard"]):
        groups.setdefault(s["node_id"] if task_per == "node" else str(s["shard"]), []).append(s)
    keys = list(groups)
    paths = [[s["path"] for s in groups[k]] for k in keys]
    nodes = [groups[k][0]["node_id"] for k in keys]

    def on(node: str, fn: Callable[..., Any], **options: Any) -> Any:
        strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        return _remote(fn).options(num_cpus=0, scheduling_strategy=strategy, **options)

    plan, windows = None, [None] * len(keys)
    if not spec.all_rows:
        refs = [on(n, _index_group).remote(p) for n, p in zip(nodes, paths)]
        indexes = _gather(refs, "indexing episodes", progress)
        plan = EpisodePlan.build([i["table"] for i in indexes])
        windows = [i["windows"] for i in indexes]
    parts_dir = Path(spec.parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    marker = parts_dir / f".marker-{secrets.token_hex(4)}"
    marker.touch()
    empty = np.zeros(0, np.int64)
    refs = []
    for g, (node, group_paths) in enumerate(zip(nodes, paths)):
        ids, lengths = plan.select(g) if plan is not None else (empty, empty)
        refs.append(on(node, _export_group).remote(group_paths, windows[g], ids, lengths, g, spec, str(marker)))
    counts = sum(_gather(refs, f"exporting to {spec.format}", progress), PartCounts())
    spanning_ids, spanning_lengths = plan.select(-1) if plan is not None else (empty, empty)
    where = f"replay service {service.name!r}: {len(keys)} Ray task(s), one per {task_per}"
    parts = list(range(len(keys)))
    if len(spanning_ids):  # after the groups' tasks: their idle workers serve the generators
        spanning = _spanning_on_driver(spec, nodes, paths, windows, spanning_ids, spanning_lengths, on)
        counts += replace(spanning, rows_read=0, evicted=0)  # the groups' export tasks read these rows
        parts.append(len(keys))
        where += f"; {len(spanning_ids)} episode(s) spanning {task_per}s assembled on the driver"
    return ServiceRun(plan, counts, parts, where)


def _spanning_on_driver(spec: PartSpec, nodes: list[str], paths: list[list[str]], windows: list[Any],
                        ids: np.ndarray, lengths: np.ndarray, on: Callable[..., Any]) -> PartCounts:
    """Assemble here the episodes whose rows lie in several groups, from a generator task
    per group, taking next from the group least far through its rows."""
    import ray

    streams = [on(n, _spanning_rows, _generator_backpressure_num_objects=2).remote(p, w, ids, spec.chunk_rows)
               for n, p, w in zip(nodes, paths, windows)]

    def fetched(stream: Any) -> Iterator[tuple[float, dict[tuple[str, ...], np.ndarray]]]:
        for ref in stream:
            yield ray.get(ref)

    pieces = least_advanced_first([fetched(s) for s in streams], lambda item: item[0])
    chunks = (Chunk(arrays, 0, 0, 0, 0) for _, (_, arrays) in pieces)
    try:
        return write_chunks(chunks, spec.part_writer(len(nodes)), EpisodeAssembler(ids, lengths))
    except BaseException:
        _cancel(streams)
        raise
