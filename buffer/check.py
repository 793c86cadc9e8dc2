"""``check_buffer(path)``: an integrity report of a buffer directory, read-only.

Checks what a crash, a careless copy or a hand edit can break: ``meta.json`` (format,
version, schema, and every field's type and range: ``meta_check.check_meta``, which
``read_meta`` applies on every open), the header (magic, version, the committed window), the data
files (present, full size, a tensordict memmap directory whose keys, shapes and dtypes
match the schema), every live row readable, and live priorities finite and
non-negative. It never writes, so it may run beside a live writer (then the counters it
reports are a snapshot).

A frame-stack buffer (``frames``) also has its links checked: every ``frame_stack.prev``
in the window is an older row's counter, ``START`` or ``UNKNOWN``, exactly the rows
linked ``START`` (the reset rows) have step -1, and every ``frame_stack.next`` is -1 or
a younger row's counter whose ``prev`` names the row back (links past the window's end
are a live writer's, not judged). A row the window start passed while the
check read it (a live writer overwriting it) is not judged. The report counts the
reset rows. Whether each row's stacks can be rebuilt is not a question of damage (an
old row's frames are overwritten as the ring turns) and is not checked.

Header states. A writer killed at any instant leaves the window words as one of the
states the commit protocol passes through (``window``'s docstring); with
``durability="fsync"`` the same states reach the disk, each header msync writing the
state of its instant. With ``end0`` the end before an ``extend`` of ``n`` rows and ``C``
the capacity:

=====================================  ============================  ==============
after the store of                     header ``(start, end)``       report
=====================================  ============================  ==============
nothing (killed before step 1)         the previous commit           OK
step 1, eviction (``n <= C``)          ``(end0 + n - C, end0)``      OK
step 1, eviction (``n > C``)           ``(end0, end0)``: empty       OK
step 3, ``start`` past ``end``         ``(end0 + n - C, end0)``      OK, repairable
step 4, the commit                     ``(end0 + n - C, end0 + n)``  OK
=====================================  ============================  ==============

So every state with ``0 <= start <= end`` and ``end - start <= C`` is a commit, and one
with ``end < start`` (only an ``extend`` of more rows than the capacity stores that) is
reported as repairable: ``ReplayBuffer.open`` stores the empty window ``(end, end)``,
losing no committed row (step 1 had evicted them all). Anything else is damage.

A path that holds no buffer at all (missing, a file, a directory without ``meta.json``)
is reported as "not a buffer" (``CheckReport.is_buffer`` False) rather than as damage.

Runs anywhere the directory is visible (driver, a shell via ``rlfleet check``);
thread-safe (holds no state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tensordict import TensorDict

from rlfleet.buffer.errors import BufferFormatError
from rlfleet.buffer.frames import FRAME_KEY, NEXT_KEY, PREV_KEY, START, UNKNOWN
from rlfleet.buffer.indices import MAX_COUNTER
from rlfleet.buffer.samplers import slot_ranges
from rlfleet.buffer.storage import (
    FORMAT_VERSION,
    H_END,
    H_MAGIC,
    H_MAX_PRIORITY,
    H_START,
    H_VERSION,
    HEADER_MAGIC,
    HEADER_WORDS,
    format_key,
    read_meta,
    schema_from_json,
)

__all__ = ["CheckReport", "check_buffer"]

READ_CHUNK_BYTES = 64 * 2**20


@dataclass
class CheckReport:
    """What ``check_buffer`` found.

    ``ok`` is True when ``problems`` is empty; ``repairs`` lists states a killed writer
    left that ``ReplayBuffer.open`` repairs (the buffer is still ok). ``is_buffer`` is
    False when the path holds no buffer at all (then ``problems`` says why).
    """

    path: str
    problems: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    is_buffer: bool = True
    format_version: int = 0
    size: int = 0
    capacity: int = 0
    total_inserted: int = 0
    sampler: str = ""
    schema: dict[str, str] = field(default_factory=dict)
    rows_checked: int = 0
    bytes_on_disk: int = 0
    frame_stack: dict[str, Any] | None = None
    reset_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "ok": self.ok, "is_buffer": self.is_buffer,
            "problems": list(self.problems), "repairs": list(self.repairs),
            "format_version": self.format_version, "size": self.size,
            "capacity": self.capacity, "total_inserted": self.total_inserted,
            "sampler": self.sampler, "schema": dict(self.schema),
            "rows_checked": self.rows_checked, "bytes_on_disk": self.bytes_on_disk,
            "frame_stack": None if self.frame_stack is None else dict(self.frame_stack),
            "reset_rows": self.reset_rows,
        }

    def __str__(self) -> str:
        if not self.is_buffer:
            return f"{self.path}: not a buffer ({'; '.join(self.problems)})"
        status = "OK" if self.ok else "DAMAGED"
        if self.ok and self.repairs:
            status += f" (repairable: {'; '.join(self.repairs)}; ReplayBuffer.open repairs it)"
        lines = [
            f"buffer {self.path}: {status}",
            f"  rows {self.size:,} of capacity {self.capacity:,}, total inserted "
            f"{self.total_inserted:,}, sampler {self.sampler or '?'}",
            f"  {self.rows_checked:,} rows read back, {self.bytes_on_disk:,} bytes on disk",
        ]
        if self.format_version and self.format_version < FORMAT_VERSION:
            lines.append(
                f"  format {self.format_version} (reward and flags at the root): opens read-only; "
                f"run `rlfleet check --upgrade {self.path}` to migrate it in place to format "
                f"{FORMAT_VERSION}"
            )
        if self.frame_stack is not None:
            f = self.frame_stack
            lines.append(
                f"  frame stack: '{'.'.join(f['key'])}' and its next twin are stacks of {f.get('size', '?')} frames "
                f"(padding {f['padding']}) rebuilt on read from 'frame_stack.frame'; {self.reset_rows:,} of the "
                f"rows are reset rows (one per episode start)"
            )
        lines += [f"  {key}: {desc}" for key, desc in self.schema.items()]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def check_buffer(path: str | os.PathLike) -> CheckReport:
    """Check a buffer directory without changing it; see the module docstring.

    Runs anywhere; thread-safe (holds no state).
    """
    path = Path(path)
    report = CheckReport(path=str(path))
    meta_file = path / "meta.json"
    if not path.is_dir() or not (meta_file.exists() or meta_file.is_symlink()):
        report.is_buffer = False
        report.problems.append(_not_a_buffer(path))
        return report
    try:
        meta = read_meta(path)
    except BufferFormatError as e:
        report.problems.append(str(e))
        return report
    report.format_version = int(meta["format_version"])
    report.sampler = str(meta.get("sampler", {}).get("type", ""))
    capacity = int(meta.get("capacity") or 0)
    report.capacity = capacity
    schema_json = meta.get("schema")
    try:
        schema = None if schema_json is None else schema_from_json(schema_json)
    except (KeyError, TypeError, ValueError) as e:
        report.problems.append(f"meta.json schema is unreadable: {e!r}")
        return report
    if schema is not None:
        report.schema = {format_key(k): f"{dtype.name}{list(shape)}" for k, (shape, dtype) in schema.items()}

    window = _check_header(path / "header.bin", capacity, report)
    if window is None:
        return report
    start, end, max_priority = window
    report.size, report.total_inserted = end - start, end
    if schema is None:
        if end != 0:
            report.problems.append(f"header says {end} rows were inserted but meta.json has no schema")
        return report

    arrays = _check_data(path / "data", schema, capacity, report)
    if arrays is None:
        return report
    for lo, hi in slot_ranges(start, end, capacity):
        for arr in arrays.values():
            step = max(1, READ_CHUNK_BYTES // max(1, arr.strides[0]))
            for a in range(lo, hi, step):
                np.asarray(arr[a : min(hi, a + step)]).sum()  # touch every page of the rows
        report.rows_checked += hi - lo
    report.bytes_on_disk = sum(f.stat().st_blocks * 512 for f in (path / "data").rglob("*.memmap"))
    if meta.get("frame_stack") is not None:
        report.frame_stack = dict(meta["frame_stack"])
        _check_frame_links(path / "header.bin", arrays, start, end, capacity, report)

    if report.sampler == "prioritized":
        _check_priorities(path / "priorities.bin", capacity, start, end, max_priority, report)
    return report


def _not_a_buffer(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a buffer directory"
    if (path / "buffer").is_dir():
        return (f"{path} has no meta.json; a run directory keeps its buffer in "
                f"{path / 'buffer'}: run `rlfleet check {path / 'buffer'}`")
    return f"{path} has no meta.json: it is not an rlfleet buffer directory"


def _check_header(header: Path, capacity: int, report: CheckReport) -> tuple[int, int, float] | None:
    """The window to check (repaired when the protocol left a repairable state), and the
    max priority; None after reporting a problem."""
    if not header.is_file() or header.stat().st_size != HEADER_WORDS * 8:
        report.problems.append(f"header {header} is missing or not {HEADER_WORDS * 8} bytes")
        return None
    words = np.fromfile(header, dtype=np.int64)
    if int(words[H_MAGIC]) != HEADER_MAGIC:
        report.problems.append(f"header {header} has a wrong magic number")
        return None
    version = int(words[H_VERSION])
    if not 1 <= version <= FORMAT_VERSION:
        report.problems.append(f"header {header} says format version {version}, not 1..{FORMAT_VERSION}")
        return None
    start, end = int(words[H_START]), int(words[H_END])
    max_priority = float(words[H_MAX_PRIORITY : H_MAX_PRIORITY + 1].view(np.float64)[0])
    if not (0 <= start <= MAX_COUNTER and 0 <= end <= MAX_COUNTER):
        report.problems.append(f"header window start={start} end={end} is not within [0, 2**44]")
        return None
    if end < start:  # the protocol's step 3 (module docstring)
        report.repairs.append(
            f"header window start={start} > end={end}: an extend of more rows than the "
            f"capacity was killed before its commit; the window opens empty at {end}, no "
            f"committed row lost"
        )
        start = end
    if capacity and end - start > capacity:
        report.problems.append(f"header window holds {end - start} rows, more than capacity {capacity}")
        return None
    return start, end, max_priority


def _check_data(data: Path, schema, capacity: int, report: CheckReport) -> dict | None:
    arrays = {}
    for key, (shape, dtype) in schema.items():
        f = data.joinpath(*key[:-1], f"{key[-1]}.memmap")
        expected = capacity * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not f.is_file():
            report.problems.append(f"data file {f} is missing (key '{format_key(key)}')")
            continue
        if f.stat().st_size != expected:
            report.problems.append(f"data file {f} is {f.stat().st_size} bytes, expected {expected}")
            continue
        arrays[key] = np.memmap(f, dtype=dtype, mode="r", shape=(capacity, *shape))
    if report.problems:
        return None
    try:
        td = TensorDict.load_memmap(data)
    except Exception as e:  # any failure here means plain tensordict cannot open it
        report.problems.append(f"TensorDict.load_memmap({data}) fails: {e!r}")
        return None
    for key, (shape, dtype) in schema.items():
        if key not in td.keys(include_nested=True):
            report.problems.append(f"tensordict metadata lacks key '{format_key(key)}'")
            continue
        t = td.get(key)
        if not hasattr(t, "numpy") or isinstance(t, TensorDict) or tuple(t.shape) != (capacity, *shape) or t.numpy().dtype != dtype:
            report.problems.append(
                f"tensordict metadata of '{format_key(key)}' says {t.dtype}{list(t.shape)}, "
                f"meta.json says {dtype.name}{[capacity, *shape]}"
            )
    return None if report.problems else arrays


def _check_frame_links(header: Path, arrays: dict, start: int, end: int, capacity: int,
                       report: CheckReport) -> None:
    """The links of a frame-stack buffer's rows (module docstring)."""
    if FRAME_KEY not in arrays or PREV_KEY not in arrays or ("step",) not in arrays or "size" not in report.frame_stack:
        report.problems.append(
            "meta.json says frame_stack but the schema lacks 'frame_stack.frame', 'frame_stack.prev' or "
            "'step', or frame_stack lacks 'size': the buffer's metadata is damaged"
        )
        return
    prev, step, forward = arrays[PREV_KEY], arrays[("step",)], arrays.get(NEXT_KEY)
    found: list[tuple[int, str]] = []
    for lo, hi in slot_ranges(start, end, capacity):
        for a in range(lo, hi, 1 << 20):
            b = min(hi, a + (1 << 20))
            link, steps = np.asarray(prev[a:b]), np.asarray(step[a:b])
            counter = np.arange(a, b, dtype=np.int64) + _slot_base(a, start, capacity)
            reset = link == START
            report.reset_rows += int(reset.sum())
            bad = ~(reset | (link == UNKNOWN) | ((link >= 0) & (link < counter)))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                found.append((int(counter[i]), f"row {int(counter[i])} has frame_stack.prev {int(link[i])}: not "
                              f"the counter of an older row, {START} (a reset row) or {UNKNOWN} (unknown)"))
            odd = reset != (steps == -1)
            if odd.any():
                i = int(np.flatnonzero(odd)[0])
                found.append((int(counter[i]), f"row {int(counter[i])} has frame_stack.prev {int(link[i])} and step "
                              f"{int(steps[i])}: reset rows (prev {START}), and only they, have step -1"))
            if forward is not None:
                _check_forward(np.asarray(forward[a:b]), counter, prev, end, capacity, found)
    # a live writer may have overwritten the oldest rows while they were read: not damage
    start_now = int(np.fromfile(header, dtype=np.int64)[H_START])
    report.problems += [why for row, why in found if row >= start_now][:3]


def _check_forward(forward: np.ndarray, counter: np.ndarray, prev: np.ndarray, end: int, capacity: int,
                   found: list[tuple[int, str]]) -> None:
    """The forward links ``forward`` of rows ``counter`` (module docstring)."""
    bad = ~((forward == -1) | (forward > counter))
    linked = np.flatnonzero((forward > counter) & (forward < end))
    back = np.asarray(prev[forward[linked] % capacity]) if len(linked) else np.empty(0, dtype=np.int64)
    bad[linked[back != counter[linked]]] = True
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        found.append((int(counter[i]), f"row {int(counter[i])} has frame_stack.next {int(forward[i])}: not -1 "
                      f"or a younger row whose frame_stack.prev is {int(counter[i])}"))


def _slot_base(slot: int, start: int, capacity: int) -> int:
    """What to add to a slot of the window ``[start, ...)`` to get its row counter."""
    base = start - start % capacity
    return base if slot >= start % capacity else base + capacity


def _check_priorities(f: Path, capacity: int, start: int, end: int, max_priority: float,
                      report: CheckReport) -> None:
    if not f.is_file() or f.stat().st_size != capacity * 8:
        report.problems.append(f"priorities file {f} is missing or not {capacity * 8} bytes")
        return
    prio = np.memmap(f, dtype=np.float64, mode="r", shape=(capacity,))
    for lo, hi in slot_ranges(start, end, capacity):
        live = np.asarray(prio[lo:hi])
        bad = ~np.isfinite(live) | (live < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            report.problems.append(
                f"priority of slot {lo + i} is {float(live[i])!r}: not finite and non-negative"
            )
            return
    if not (np.isfinite(max_priority) and max_priority >= 0):
        report.problems.append(f"header max priority is {max_priority!r}")
