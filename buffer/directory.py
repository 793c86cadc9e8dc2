"""Making and reopening a buffer directory: the checks ``create`` runs against the disk
and RAM, the ``meta.json`` a new directory starts with, ``open``'s sampler switch, and
mapping the data files (created, and the schema recorded, by the first ``extend``).

``ReplayBuffer.create`` and ``ReplayBuffer.open`` are the public names; they call these
and then build the buffer on what is on disk.

Runs in the process that creates or opens the buffer; the functions hold no state and
are thread-safe, but two processes must not create or switch the same directory at once.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlfleet.buffer.capacity import free_disk_bytes, human_bytes, parse_capacity
from rlfleet.buffer.frames import check_frame_stack
from rlfleet.buffer.indices import MAX_TAG
from rlfleet.buffer.samplers import Sampler, make_sampler
from rlfleet.buffer.sampling import check_sampler
from rlfleet.buffer.storage import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Header,
    MemmapColumns,
    Schema,
    read_meta,
    row_bytes,
    rows_for_bytes,
    schema_from_json,
    schema_to_json,
    write_meta,
)
from rlfleet.buffer.upgrade import format1_error

__all__ = ["DURABILITIES", "check_free_disk", "check_tree_fits", "create_directory", "map_files", "open_directory"]

DURABILITIES = ("process", "fsync")


def create_directory(path: Path, capacity: int | str, sampler: str | Mapping[str, Any],
                     durability: str, overcommit: bool,
                     frame_stack: Any = None) -> tuple[dict[str, Any], Header]:
    """Validate ``create``'s arguments, then write an empty buffer directory at ``path``:
    the header first, ``meta.json`` last (its presence is what makes it a buffer). The
    meta records a random 12-bit ``index_tag`` that every index of the buffer carries
    (``indices``), so an index of an earlier buffer at this path is told apart.

    Raises:
        FileExistsError: ``path`` exists and is not an empty directory.
        ValueError: bad capacity, sampler or durability; capacity above free disk.
    """
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"create: {path} exists and is not an empty directory; use ReplayBuffer.open "
            f"to reopen a buffer, or choose a new path"
        )
    rows, nbytes = parse_capacity(capacity)
    spec = check_sampler(sampler)
    frames = check_frame_stack(frame_stack)
    if durability not in DURABILITIES:
        raise ValueError(f"durability={durability!r}: choose one of {', '.join(DURABILITIES)}")
    if nbytes is not None and not overcommit:
        check_free_disk(path, nbytes, capacity)
    path.mkdir(parents=True, exist_ok=True)
    header = Header(path / "header.bin", create=True)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "capacity": rows,
        "capacity_bytes": nbytes,
        "sampler": spec,
        "durability": durability,
        "overcommit": bool(overcommit),
        "index_tag": secrets.randbelow(MAX_TAG),
        "schema": None,
    }
    if frames is not None:  # absent otherwise: directories without it read as before
        meta["frame_stack"] = frames
    write_meta(path, meta)
    return meta, header


def open_directory(path: Path, sampler: str | Mapping[str, Any] | None) -> tuple[dict[str, Any], Header]:
    """The meta and header of the buffer at ``path``, with the sampler switched (and the
    switch stored) when ``sampler`` names another one. A format 1 buffer opens
    read-only: its header is mapped copy-on-write and its sampler cannot be switched.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        BufferFormatError: not an rlfleet buffer, damaged, of a newer format, or of
            format 1 and asked to switch its sampler.
        ValueError: a bad ``sampler``, or one the stored schema cannot serve.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"open: no buffer directory at {path}; create one with ReplayBuffer.create")
    meta = read_meta(path)
    read_only = meta["format_version"] < FORMAT_VERSION
    header = Header(path / "header.bin", read_only=read_only)
    if sampler is not None:
        spec = check_sampler(sampler)
        if spec != meta["sampler"]:
            if read_only:
                header.close()
                raise format1_error(f"open: sampler={sampler!r}", path)
            if meta.get("schema") is not None:
                make_sampler(spec).check_schema(schema_from_json(meta["schema"]))
            if spec["type"] == "prioritized" and meta["sampler"]["type"] != "prioritized":
                (path / "priorities.bin").unlink(missing_ok=True)  # stale if any
            meta = dict(meta, sampler=spec)
            write_meta(path, meta)
    return meta, header


def map_files(path: Path, meta: dict[str, Any], schema: Schema, sampler: Sampler, start: int, end: int,
              max_priority: float, *, create: bool, read_only: bool) -> tuple[dict[str, Any], MemmapColumns]:
    """Map the data files of ``schema`` (``create``: make them, for the first batch, and
    then record the schema in ``meta.json``) and bind ``sampler`` to the window
    ``[start, end)`` (new rows of a prioritized sampler enter at ``max_priority``). Returns the meta (with the schema and a byte capacity turned into
    rows) and the mapped columns.

    Raises:
        ValueError: a byte capacity too small for one row, a sum-tree above half the
            RAM, or (``create``) rows above the free disk space without overcommit.
    """
    capacity = meta["capacity"] or 0
    if capacity == 0:
        extra = 8 if sampler.type == "prioritized" else 0  # a priority per row
        capacity = rows_for_bytes(meta["capacity_bytes"], schema, extra)
        if capacity < 1:
            raise ValueError(
                f"extend: capacity={meta['capacity_bytes']} bytes holds no row of "
                f"{row_bytes(schema)} bytes; create the buffer with a larger capacity"
            )
    if sampler.type == "prioritized":
        check_tree_fits(capacity)
    if create:
        if not meta["overcommit"]:
            check_free_disk(path, capacity * row_bytes(schema), capacity)
        columns = MemmapColumns.create(path / "data", schema, capacity)
    else:
        columns = MemmapColumns(path / "data", schema, capacity, read_only=read_only)
    sampler.bind(path, capacity, start, end, create=create, max_priority=max_priority, read_only=read_only)
    if create:
        meta = dict(meta, schema=schema_to_json(schema), capacity=capacity)
        write_meta(path, meta)  # the schema is recorded only once the files exist
    sampler.bind_columns(columns.read_views)
    return meta, columns


def check_free_disk(path: Path, nbytes: int, capacity: int | str) -> None:
    """Refuse ``nbytes`` of row data above the free space where ``path`` will live."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = free_disk_bytes(probe)
    if nbytes > free:
        raise ValueError(
            f"capacity={capacity!r} needs {human_bytes(nbytes)} but only {human_bytes(free)} "
            f"is free at {probe}; lower the capacity, or pass overcommit=True to create sparse "
            f"files that fill as rows arrive"
        )


def check_tree_fits(capacity: int) -> None:
    """Refuse a prioritized sum-tree over ``capacity`` slots above half this machine's RAM."""
    tree_bytes = 16 * (1 << max(0, (capacity - 1).bit_length()))
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if tree_bytes > ram // 2:
        raise ValueError(
            f"capacity={capacity} rows: the prioritized sampler's sum-tree would take "
            f"{human_bytes(tree_bytes)} of RAM (half of this machine's is "
            f"{human_bytes(ram // 2)}); lower the capacity or use another sampler"
        )
