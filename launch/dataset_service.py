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

Tasks reserve no CPU (``num_cpus=0``): a running job's placement groups often hold
every CPU, and an export must not wait for the job to end. Runs on the driver; the
task functions run in Ray workers. Not thread-safe: one export at a time per ``out``.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlfleet.buffer.dataset_layout import DONE, EPISODE_ID, STEP
from rlfleet.buffer.episodes import INDEX_KEYS, EpisodeAssembler, EpisodeIndex, EpisodePlan
from rlfleet.buffer.scan import BufferFiles, scan_shards
from rlfleet.launch.dataset_writers import HfWriter, MinariWriter, new_minari_storage

if TYPE_CHECKING:
    from rlfleet.launch.dataset_export import BufferSource, ExportResult

__all__ = ["ServiceShards", "find_service", "run_service"]

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0


@dataclass
class ServiceShards:
    """A running service's shards: ``[{"shard", "path", "node_id"}, ...]`` and its schema."""

    name: str
    namespace: str
    shards: list[dict[str, Any]]
    schema: dict


def find_service(src: "BufferSource", address: str | None, *, required: bool) -> ServiceShards | None:
    """The running service of ``src``'s buffer, or None (``required``: raise instead).

    Raises:
        ValueError: ``required`` and no service of that buffer runs (or no cluster).
    """
    import ray

    from rlfleet.buffer import DEFAULT_NAMESPACE, init_ray, running_buffers
    from rlfleet.buffer.naming import find_shards

    def none(why: str) -> None:
        if required:
            raise ValueError(f"export-dataset: use_service (--service): {why}")
        logger.debug("export-dataset: %s; exporting from disk", why)

    if not ray.is_initialized():
        if not (address or os.environ.get("RAY_ADDRESS")):
            return none("no Ray cluster to look on (pass --address, or set RAY_ADDRESS)")
        try:
            init_ray(address, timeout_s=JOIN_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure to join means: no service here
            return none(f"cannot join the Ray cluster: {e}")
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
        return ServiceShards(name, namespace, shards, schema)
    return none(f"no running replay service holds {src.buffer_dir} (namespace {namespace!r})")


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
        index = EpisodeIndex()
        for chunk in scan_shards(files, keys=INDEX_KEYS, windows=windows, chunk_rows=1 << 16):
            index.add(chunk.arrays[EPISODE_ID], chunk.arrays[STEP], chunk.arrays[DONE])
        return {"table": index.table(), "windows": windows}
    finally:
        for f in files:
            f.close()


def new_part_writer(spec: dict[str, Any], part: int) -> MinariWriter | HfWriter:
    """The writer of part ``part`` of an export whose settings are ``spec``."""
    parts = Path(spec["parts_dir"])
    if spec["format"] == "hf":
        return HfWriter(parts / f"part-{part}.arrow", spec["schema"])
    obs, act, env_spec = spec["spaces"]
    return MinariWriter(new_minari_storage(parts / f"part-{part}" / "data", f"part-{part}-v0", obs, act, env_spec))


def _export_group(paths: list[str], windows: list[tuple[int, int]] | None, ids: np.ndarray,
                  lengths: np.ndarray, part: int, spec: dict[str, Any]) -> dict[str, int]:
    _check_visible(spec["marker"])
    files = [BufferFiles.open(p) for p in paths]
    try:
        writer = new_part_writer(spec, part)
        assembler = None if spec["all_rows"] else EpisodeAssembler(ids, lengths)
        rows_read = 0
        for chunk in scan_shards(files, windows=windows, chunk_rows=spec["chunk_rows"]):
            rows_read += len(chunk)
            if assembler is None:
                writer.add_rows(chunk.arrays)
            else:
                for episode in assembler.feed(chunk.arrays):
                    writer.add_episode(episode)
        writer.close()
        return _counts(writer, assembler, rows_read)
    finally:
        for f in files:
            f.close()


def _spanning_rows(paths: list[str], windows: list[tuple[int, int]], ids: np.ndarray, chunk_rows: int | None):
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


def _counts(writer: MinariWriter | HfWriter, assembler: EpisodeAssembler | None, rows_read: int) -> dict[str, int]:
    missing = assembler.finish() if assembler is not None else 0
    return {"rows_read": rows_read, "rows": getattr(writer, "steps", None) or getattr(writer, "rows", 0),
            "episodes": writer.episodes, "missing": missing,
            "inconsistent": writer.inconsistent + (assembler.inconsistent if assembler else 0)}


# --------------------------------------------------------------------------- the driver


@functools.cache
def _remote(fn: Any) -> Any:
    import ray

    return ray.remote(fn)


def run_service(job: Any, service: ServiceShards, task_per: str) -> "ExportResult":
    """Export ``job`` (``dataset_export``'s) through ``service``'s nodes (module docstring)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t0 = time.perf_counter()
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(service.shards, key=lambda s: s["shard"]):
        groups.setdefault(s["node_id"] if task_per == "node" else str(s["shard"]), []).append(s)
    keys = list(groups)
    paths = [[s["path"] for s in groups[k]] for k in keys]
    nodes = [groups[k][0]["node_id"] for k in keys]

    def on(node: str, fn: Any, **options: Any) -> Any:
        strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        return _remote(fn).options(num_cpus=0, scheduling_strategy=strategy, **options)

    plan, windows = None, [None] * len(keys)
    if not job.all_rows:
        indexes = ray.get([on(n, _index_group).remote(p) for n, p in zip(nodes, paths)])
        plan = EpisodePlan.build([i["table"] for i in indexes])
        windows = [i["windows"] for i in indexes]
    job.parts_dir.mkdir(parents=True, exist_ok=True)
    marker = job.parts_dir / f".marker-{secrets.token_hex(4)}"
    marker.touch()
    spec = {"format": job.format, "schema": job.schema, "spaces": job.spaces, "parts_dir": str(job.parts_dir),
            "chunk_rows": job.chunk_rows, "all_rows": job.all_rows, "marker": str(marker)}
    empty = np.zeros(0, np.int64)
    refs = []
    for g, (node, group_paths) in enumerate(zip(nodes, paths)):
        ids, lengths = plan.select(g) if plan is not None else (empty, empty)
        refs.append(on(node, _export_group).remote(group_paths, windows[g], ids, lengths, g, spec))
    results = ray.get(refs)
    spanning_ids, spanning_lengths = plan.select(-1) if plan is not None else (empty, empty)
    if len(spanning_ids):  # after the groups' tasks: their idle workers serve the generators
        results.append(_spanning_on_driver(job, spec, nodes, paths, windows, spanning_ids, spanning_lengths, on))
    parts = list(range(len(keys) + (1 if len(spanning_ids) else 0)))
    job.finish(parts)
    total = {k: sum(r[k] for r in results) for k in results[0]}
    where = f"replay service {service.name!r}: {len(keys)} Ray task(s), one per {task_per}"
    if len(spanning_ids):
        where += f"; {len(spanning_ids)} episode(s) spanning {task_per}s assembled on the driver"
    return job.result(total["rows_read"], total["rows"], total["episodes"], plan, total["inconsistent"],
                      total["missing"], time.perf_counter() - t0, where)


def _spanning_on_driver(job: Any, spec: dict[str, Any], nodes: list[str], paths: list[list[str]],
                        windows: list[Any], ids: np.ndarray, lengths: np.ndarray, on: Any) -> dict[str, int]:
    """Assemble here the episodes whose rows lie in several groups, from a generator task
    per group, taking next from the group least far through its rows."""
    import ray

    streams = [on(n, _spanning_rows, _generator_backpressure_num_objects=2).remote(p, w, ids, job.chunk_rows)
               for n, p, w in zip(nodes, paths, windows)]
    writer = new_part_writer(spec, len(nodes))
    assembler = EpisodeAssembler(ids, lengths)
    progress = [0.0] * len(streams)
    live = set(range(len(streams)))
    while live:
        k = min(live, key=lambda i: (progress[i], i))
        try:
            ref = next(streams[k])
        except StopIteration:
            live.discard(k)
            continue
        progress[k], arrays = ray.get(ref)
        for episode in assembler.feed(arrays):
            writer.add_episode(episode)
    writer.close()
    return _counts(writer, assembler, 0)  # its rows are counted by the groups' export tasks
