"""What a ``meta.json`` may hold: every field's type and range, and safe key names.

``check_meta`` is applied by ``storage.read_meta`` on every open (``ReplayBuffer.open``,
a shard actor, ``check_buffer``), so nothing trusts a field of a hand-edited or damaged
file. ``safe_key_part`` is the rule for a part of a key path, which names a file under
``data/``; ``storage`` applies it to every batch's keys too.

Runs anywhere; pure functions, thread-safe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rlfleet.buffer.capacity import MAX_ROWS
from rlfleet.buffer.errors import BufferFormatError
from rlfleet.buffer.indices import MAX_TAG
from rlfleet.buffer.sampling import check_sampler

__all__ = ["UNSAFE_KEY_CHARS", "check_meta", "safe_key_part"]

# what a key part may not hold, as a message shows it (besides control characters)
UNSAFE_KEY_CHARS = '/ \\ < > : " | ? * %'


def safe_key_part(part: str) -> bool:
    """Whether ``part`` may name a file under ``data/``: not empty, ``.`` or ``..``, at
    most 200 bytes, and none of ``/ \\ < > : " | ? * %``, space or control characters
    (what would escape the directory, or make tensordict write another file name)."""
    return (
        part not in ("", ".", "..")
        and len(part.encode("utf-8", "replace")) <= 200  # a file name holds 255 bytes
        and not any(c in '/\\<>:"|?*% \x7f' or ord(c) < 32 for c in part)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_meta(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Refuse a ``meta.json`` whose fields have wrong types or values; return it with
    the sampler spec normalised.

    ``read_meta`` calls it after the format and version checks, so everything that opens
    a buffer (``ReplayBuffer.open``, a shard actor, ``check_buffer``) trusts no field of
    a hand-edited or damaged file: capacity, sampler, durability and each schema entry
    (key parts that can name a file, dims >= 0, bool/int/float dtypes). Runs anywhere;
    thread-safe.

    Raises:
        BufferFormatError: naming ``path``, the field, its value and the rule.
    """
    def bad(field: str, why: str) -> BufferFormatError:
        shown = "" if field == "schema" else f"={meta.get(field)!r}"  # a schema can be long
        return BufferFormatError(
            f"open: {path} field {field!r}{shown} {why}; the buffer directory is damaged or "
            f"was edited by hand"
        )

    if meta["format_version"] < 1:
        raise bad("format_version", "must be an integer >= 1")
    tag = meta.get("index_tag", None if meta["format_version"] >= 2 else 0)
    if not (_is_int(tag) and 0 <= tag < MAX_TAG):
        raise bad("index_tag", f"must be an integer in [0, {MAX_TAG}) (format 2 and later)")
    capacity, nbytes = meta["capacity"], meta["capacity_bytes"]
    if capacity is not None and not (_is_int(capacity) and 1 <= capacity < MAX_ROWS):
        raise bad("capacity", "must be null or an integer in [1, 2**44)")
    if nbytes is not None and not (_is_int(nbytes) and nbytes >= 1):
        raise bad("capacity_bytes", "must be null or an integer >= 1")
    if capacity is None and (nbytes is None or meta["schema"] is not None):
        raise bad("capacity", "may be null only for a byte capacity before the first batch")
    if meta["durability"] not in ("process", "fsync"):
        raise bad("durability", "must be 'process' or 'fsync'")
    if not isinstance(meta.get("overcommit", False), bool):
        raise bad("overcommit", "must be true or false")
    if not isinstance(meta["sampler"], dict):
        raise bad("sampler", "must be a mapping such as {\"type\": \"uniform\"}")
    try:
        sampler = check_sampler(meta["sampler"])
    except (TypeError, ValueError) as e:
        raise bad("sampler", f"is not a valid sampler ({e})") from None
    schema = meta["schema"]
    if schema is not None:
        if not isinstance(schema, list) or not schema:
            raise bad("schema", "must be null or a non-empty list of {key, shape, dtype}")
        seen = set()
        for entry in schema:
            if not isinstance(entry, dict) or set(entry) != {"key", "shape", "dtype"}:
                raise bad("schema", f"has the entry {entry!r}, not {{key, shape, dtype}}")
            key, shape, dtype = entry["key"], entry["shape"], entry["dtype"]
            if not (isinstance(key, list) and key and all(isinstance(k, str) and safe_key_part(k) for k in key)) \
                    or tuple(key) in seen:
                raise bad("schema", f"has the key {key!r}: not a list of safe file names, or repeated")
            seen.add(tuple(key))
            if not (isinstance(shape, list) and len(shape) <= 32
                    and all(_is_int(d) and 0 <= d < 2**31 for d in shape)):
                raise bad("schema", f"has the shape {shape!r} for key {key!r}: not a list of dims >= 0")
            try:
                np_dtype = np.dtype(dtype) if isinstance(dtype, str) else None
            except TypeError:
                np_dtype = None
            if np_dtype is None or np_dtype.kind not in "biuf":
                raise bad("schema", f"has the dtype {dtype!r} for key {key!r}: not a bool, int or float type")
    return dict(meta, sampler=sampler)
