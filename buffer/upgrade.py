"""Buffer format 1 and its upgrade, in place, to format 2.

Format 2 (this rlfleet) stores rows in TorchRL's layout: ``("next", "reward")`` and the
flags ``("next", "done" | "terminated" | "truncated")``, per-row shape ``[1]``. Format 1
kept those four keys at the root with per-row shape ``[]``. The buffer never looks at
keys, so the two differ only in where these files sit and what the metadata says: the
bytes of a ``[N]`` column and of a ``[N, 1]`` one are the same.

A format 1 directory opens read-only: sampling, ``rb[...]`` and ``check_buffer`` return
exactly what is stored (root keys and all), and ``extend`` / ``update_priority`` raise
``format1_error``. ``upgrade_buffer`` migrates it in place, in this order:

1. hard-link each moved ``data/<key>.memmap`` as ``data/next/<key>.memmap`` (one inode);
2. write tensordict metadata that lists the old keys and the new ones;
3. set the header's version word to 2;
4. replace ``meta.json`` (format 2, the new schema, an index tag): the commit;
5. write tensordict metadata of the new keys only, and unlink the old names.

Before step 4 the directory is a format 1 buffer with a few extra files (it opens,
checks and samples as before); from step 4 on it is a format 2 buffer, perhaps with
leftovers of step 5 that the next ``upgrade_buffer`` removes. A crash at any instant
leaves one of the two, and ``upgrade_buffer`` may run again any number of times.

Writers: the upgrade refuses a directory whose header another process maps for writing
(read from ``/proc/<pid>/maps``). That is best effort: it sees only processes this user
may inspect, on Linux; stop every writer before upgrading.

Runs on the driver or a shell (``rlfleet check --upgrade``). Not thread-safe: one
upgrade of a directory at a time.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tensordict import TensorDict

from rlfleet.buffer.errors import BufferFormatError
from rlfleet.buffer.indices import MAX_TAG
from rlfleet.buffer.storage import (
    FORMAT_VERSION,
    Header,
    Schema,
    format_key,
    read_meta,
    schema_from_json,
    schema_to_json,
    write_memmap_layout,
    write_meta,
)

__all__ = ["MOVED_KEYS", "UpgradeReport", "format1_error", "format2_schema", "upgrade_buffer"]

MOVED_KEYS = ("reward", "done", "terminated", "truncated")
SCRATCH = "upgrade.tmp"  # where tensordict writes the new metadata before it is moved in


def format1_error(what: str, path: Path) -> BufferFormatError:
    """The error of a call that would write a format 1 buffer (``what``: the call)."""
    return BufferFormatError(
        f"{what}: {path} is format 1 (reward and flags at the root); run `rlfleet check "
        f"--upgrade {path}` to migrate it in place to format 2"
    )


@dataclass
class UpgradeReport:
    """What ``upgrade_buffer`` did: the format it found, the keys it moved under
    ``next`` and the leftovers of an interrupted upgrade it removed (file names)."""

    path: str
    from_version: int
    to_version: int
    moved: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.from_version < self.to_version:
            moved = ", ".join(self.moved) or "no key"
            return (f"buffer {self.path}: upgraded from format {self.from_version} to "
                    f"{self.to_version} (moved under next: {moved})")
        if self.removed:
            return (f"buffer {self.path}: format {self.to_version}; finished an interrupted "
                    f"upgrade (removed {', '.join(self.removed)})")
        return f"buffer {self.path}: already format {self.to_version}; nothing to upgrade"


def format2_schema(schema: Schema, path: Path) -> tuple[Schema, list[str]]:
    """The format 2 schema of a format 1 one, and the keys that move (in schema order).

    Raises:
        BufferFormatError: the schema holds a moved key both at the root and under next.
    """
    out: Schema = {}
    moved = []
    for key, (shape, dtype) in schema.items():
        if len(key) == 1 and key[0] in MOVED_KEYS:
            if ("next", key[0]) in schema:
                raise BufferFormatError(
                    f"upgrade: {path} holds both '{key[0]}' and 'next.{key[0]}'; format 2 "
                    f"keeps only 'next.{key[0]}', so this buffer cannot be upgraded in place: "
                    f"copy its rows into a new buffer with the layout you want"
                )
            key, shape = ("next", key[0]), shape if shape else (1,)
            moved.append(format_key(key))
        out[key] = (shape, dtype)
    return out, moved


def upgrade_buffer(path: str | os.PathLike) -> UpgradeReport:
    """Migrate the format 1 buffer at ``path`` in place to format 2 (see the module
    docstring); on a format 2 buffer, finish an interrupted upgrade or do nothing.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        BufferFormatError: not an rlfleet buffer, damaged, of a newer format, a moved key
            both at the root and under next, or a process has it open for writing.
    """
    plan = _Upgrade(Path(path))
    if plan.version >= FORMAT_VERSION:
        if not _leftovers(plan.path, plan.schema):
            return UpgradeReport(str(plan.path), plan.version, plan.version)
        _refuse_if_written(plan.path)
        removed = _finish(plan.path, plan.schema, plan.capacity)
        return UpgradeReport(str(plan.path), plan.version, plan.version, removed=removed)
    _refuse_if_written(plan.path)
    for step in _Upgrade.STEPS:
        getattr(plan, step)()
    removed = _finish(plan.path, plan.new_schema, plan.capacity)
    return UpgradeReport(str(plan.path), plan.version, FORMAT_VERSION, moved=plan.moved, removed=removed)


class _Upgrade:
    """The steps 1-4 of the module docstring for one directory, each safe to repeat."""

    STEPS = ("link", "metadata", "header", "commit")

    def __init__(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(f"upgrade: no buffer directory at {path}")
        self.path = path
        self.meta = read_meta(path)
        self.version = self.meta["format_version"]
        self.capacity = self.meta["capacity"]
        self.schema = None if self.meta["schema"] is None else schema_from_json(self.meta["schema"])
        self.new_schema, self.moved = None, []
        if self.schema is not None and self.version < FORMAT_VERSION:
            self.new_schema, self.moved = format2_schema(self.schema, path)

    def link(self) -> None:
        """Step 1: each moved file gets its format 2 name as a hard link."""
        data = self.path / "data"
        for name in (key.split(".")[1] for key in self.moved):
            old, new = data / f"{name}.memmap", data / "next" / f"{name}.memmap"
            new.parent.mkdir(exist_ok=True)
            if new.exists() and not new.samefile(old):
                raise BufferFormatError(
                    f"upgrade: {new} exists and is not the data of '{name}'; the buffer "
                    f"directory is damaged or was edited by hand"
                )
            if not new.exists():
                os.link(old, new)
        if self.moved:
            _fsync_dir(data / "next")

    def metadata(self) -> None:
        """Step 2: tensordict metadata listing the old keys and the new ones."""
        if self.schema is not None:
            _write_tensordict_metadata(self.path, {**self.schema, **self.new_schema}, self.capacity)

    def header(self) -> None:
        """Step 3: the header's version word."""
        header = Header(self.path / "header.bin")
        header.version = FORMAT_VERSION
        header.sync()
        header.close()

    def commit(self) -> None:
        """Step 4: ``meta.json`` of format 2, replaced atomically."""
        tag = self.meta.get("index_tag", secrets.randbelow(MAX_TAG))
        schema = None if self.new_schema is None else schema_to_json(self.new_schema)
        write_meta(self.path, dict(self.meta, format_version=FORMAT_VERSION, index_tag=tag, schema=schema))


def _leftovers(path: Path, schema: Schema | None) -> list[Path]:
    """Files an interrupted upgrade left: the scratch directory, old names of moved
    files, and tensordict metadata that lists keys the schema lacks (its data dir)."""
    out = [path / SCRATCH] if (path / SCRATCH).exists() else []
    if schema is None:
        return out
    data = path / "data"
    for name in MOVED_KEYS:
        old, new = data / f"{name}.memmap", data / "next" / f"{name}.memmap"
        if (name,) not in schema and ("next", name) in schema and old.exists() and new.exists() \
                and old.samefile(new):
            out.append(old)
    listed = {(k,) if isinstance(k, str) else tuple(k)
              for k in TensorDict.load_memmap(data).keys(include_nested=True, leaves_only=True)}
    if listed != set(schema):
        out.append(data)
    return out


def _finish(path: Path, schema: Schema | None, capacity: int) -> list[str]:
    """Step 5: metadata of the schema's keys only, then unlink the old names."""
    leftovers = _leftovers(path, schema)
    if schema is not None and path / "data" in leftovers:
        _write_tensordict_metadata(path, schema, capacity)
    for f in leftovers:
        if f.name.endswith(".memmap"):
            f.unlink()
    shutil.rmtree(path / SCRATCH, ignore_errors=True)
    if leftovers:
        _fsync_dir(path / "data")
    return [f"tensordict metadata of old keys in {f.name}/" if f.is_dir() and f.name == "data"
            else str(f.relative_to(path)) for f in leftovers]


def _write_tensordict_metadata(path: Path, schema: Schema, capacity: int) -> None:
    """Replace the metadata files of ``data/`` with those tensordict writes for
    ``schema`` (each file atomically); the data files are left alone."""
    scratch = path / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    write_memmap_layout(scratch, schema, capacity)  # sparse files: no row data is written
    data = path / "data"
    for f in sorted(scratch.rglob("*")):
        if f.is_dir() or f.name.endswith(".memmap"):
            continue
        target = data / f.relative_to(scratch)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(f, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    shutil.rmtree(scratch)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_if_written(path: Path) -> None:
    """Raise when a process (that this user may inspect) maps the header shared and
    writable, i.e. has the buffer open for writing (best effort, Linux only)."""
    header = path / "header.bin"
    try:
        st = header.stat()
    except OSError:
        return
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            lines = (proc / "maps").read_text().splitlines()
        except OSError:
            continue  # gone, or another user's
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) >= 5 and parts[3] == dev and parts[4] == str(st.st_ino) and parts[1][1:4:2] == "ws":
                raise BufferFormatError(
                    f"upgrade: {path} is open for writing by process {proc.name}; close the "
                    f"buffer (stop the run or service using it) and upgrade again"
                )
