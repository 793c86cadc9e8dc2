"""Capacities: a row count or a size string (``"500GB"``) as rows or bytes, and disk space.

``parse_capacity`` is the one place a capacity is validated (``ReplayBuffer.create``,
the service and the YAML layer call it). A row count is below ``MAX_ROWS`` = 2**44, the
range of an index's row counter (``indices``).

Runs anywhere; pure functions, thread-safe.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from rlfleet.buffer.indices import MAX_COUNTER

__all__ = ["MAX_ROWS", "free_disk_bytes", "human_bytes", "parse_capacity", "split_capacity"]

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
MAX_ROWS = MAX_COUNTER  # 2**44: a capacity is below it, as is every row counter
_SIZE_RE = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_capacity(capacity: int | str) -> tuple[int | None, int | None]:
    """Split a capacity into ``(rows, bytes)``; exactly one of them is not None.

    ``1_000_000``, ``"1000000"`` or ``"1e6"`` are rows; ``"500GB"`` (10**9) or
    ``"2TiB"`` (2**40) are bytes of row data.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, (int, str)):
        raise ValueError(
            f"capacity={capacity!r}: expected a row count (int) or a size string such as "
            f"'500GB' or '2TiB'"
        )
    if isinstance(capacity, int):
        rows = capacity
    else:
        m = _SIZE_RE.match(capacity)
        if m is None or m.group(2).lower() not in _UNITS | {"": 1}:
            raise ValueError(
                f"capacity={capacity!r}: not a row count or a size; write e.g. 1000000, "
                f"'500GB' or '2TiB' (units: {', '.join(sorted(_UNITS))})"
            )
        number, unit = m.group(1).replace("_", ""), m.group(2).lower()
        if unit:
            nbytes = int(float(number) * _UNITS[unit])
            if nbytes < 1:
                raise ValueError(f"capacity={capacity!r}: must be at least 1 byte")
            return None, nbytes
        whole = float(number).is_integer() if "e" in number.lower() else "." not in number
        if not whole:
            raise ValueError(f"capacity={capacity!r}: a row count must be a whole number")
        rows = int(float(number)) if "e" in number.lower() else int(number)
    if not 1 <= rows < MAX_ROWS:
        raise ValueError(
            f"capacity={capacity!r}: row count must be in [1, 2**44) (the row counter of an "
            f"index has 44 bits); use a smaller capacity"
        )
    return rows, None


def split_capacity(capacity: int | str, num_shards: int) -> list[int | str]:
    """A service's capacity split evenly over ``num_shards`` shards: rows, or byte sizes
    (``"<n>B"``) for a byte capacity; the first shards take one more when it does not
    divide.

    Raises:
        ValueError: a bad capacity, or one below ``num_shards`` (a shard needs a row).
    """
    rows, nbytes = parse_capacity(capacity)
    total = rows if rows is not None else nbytes
    if total < num_shards:
        raise ValueError(
            f"capacity={capacity!r} is smaller than num_shards={num_shards}: each shard needs "
            f"at least one row; raise capacity or lower num_shards"
        )
    base, extra = divmod(total, num_shards)
    parts = [base + (1 if k < extra else 0) for k in range(num_shards)]
    return parts if rows is not None else [f"{p}B" for p in parts]


def free_disk_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # unreachable

