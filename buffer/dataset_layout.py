"""How rlfleet rows map onto offline dataset formats, both ways: the one place that
knows the Minari fields, the ``infos`` keys and the Hugging Face column names.

Export (``rlfleet export-dataset``) and import (``ReplayBuffer.from_dataset``) both call
these functions, so what one writes the other reads back key for key.

Minari: one episode of ``T`` rows (steps ``0 .. T-1`` of one ``episode_id``, the last
one done) is one Minari episode::

    observations   [T+1, ...]  the rows' observation, then the last row's ("next", "observation")
    actions        [T, ...]    action
    rewards        [T]         ("next", "reward")[:, 0]
    terminations   [T]         ("next", "terminated")[:, 0]
    truncations    [T]         ("next", "truncated")[:, 0]
    infos["rlfleet"][...]      every other key at its key path: episode_id, step,
                               collector_id, policy_version and any extra key of the
                               buffer, [T+1, ...] (Minari's infos run along the
                               observations: row t at t, the last row repeated at T)

``("next", "done")`` is not stored: it is terminated or truncated (DESIGN.md, "Data").
``("next", "observation")`` of rows ``0 .. T-2`` is the next row's observation, as the
collectors write it; an episode where it is not cannot be a Minari episode
(``episode_to_minari`` says so with ``EpisodeMismatch``). A Minari dataset that rlfleet
did not write imports with ``episode_id`` the Minari episode id, ``step`` counted from
0, and ``collector_id`` and ``policy_version`` -1 (not collected by rlfleet).

Hugging Face ``datasets``: one row per transition, one column per key, named by its key
path joined with ``"."`` (``next.observation``), per-row shapes as nested fixed-size
lists of the key's own dtype (uint8 frames stay uint8). A key part that holds a ``"."``
would make the name ambiguous and is refused on export.

Runs wherever an export or import runs (driver, a Ray task on a shard's node). Pure
functions and constants: thread-safe. minari, h5py, datasets and pyarrow are imported
only when called (``require``), so rlfleet runs without the extras.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "COLLECTOR_ID",
    "DONE",
    "EPISODE_ID",
    "EpisodeMismatch",
    "FOREIGN_ID",
    "FORMATS",
    "ID_KEYS",
    "INFOS_GROUP",
    "MINARI_KEYS",
    "NEXT_OBSERVATION",
    "OBSERVATION",
    "POLICY_VERSION",
    "STEP",
    "arrow_column_to_numpy",
    "column_key",
    "column_name",
    "episode_to_minari",
    "hf_features",
    "minari_schema_problem",
    "minari_to_rows",
    "require",
    "rows_to_arrow",
]

FORMATS = ("minari", "hf")
EPISODE_ID = ("episode_id",)
STEP = ("step",)
DONE = ("next", "done")
COLLECTOR_ID = ("collector_id",)
POLICY_VERSION = ("policy_version",)
ID_KEYS = (EPISODE_ID, STEP, COLLECTOR_ID, POLICY_VERSION)
OBSERVATION = ("observation",)
NEXT_OBSERVATION = ("next", "observation")
# Minari episode field <- the buffer key whose rows fill it (observations also take the
# last row's next observation)
MINARI_KEYS = {
    "observations": OBSERVATION,
    "actions": ("action",),
    "rewards": ("next", "reward"),
    "terminations": ("next", "terminated"),
    "truncations": ("next", "truncated"),
}
# the keys the Minari fields stand for, besides those in MINARI_KEYS: next obs, done
_MINARI_IMPLIED = (NEXT_OBSERVATION, DONE)
INFOS_GROUP = "rlfleet"  # Minari infos["rlfleet"] holds every other key
FOREIGN_ID = -1  # collector_id and policy_version of rows rlfleet did not collect

_EXTRAS = {"minari": "minari", "h5py": "minari", "datasets": "hf", "pyarrow": "hf"}

Arrays = dict[tuple[str, ...], np.ndarray]


class EpisodeMismatch(ValueError):
    """Rows of one episode that a Minari episode cannot hold as they are."""


def require(module: str) -> ModuleType:
    """Import an optional dependency, or say which rlfleet extra installs it.

    Raises:
        ModuleNotFoundError: ``module`` is not installed (the message names the extra).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra = _EXTRAS.get(module.split(".")[0], "minari,hf")
        raise ModuleNotFoundError(
            f"{module} is not installed; it comes with rlfleet's [{extra}] extra: "
            f'pip install "rlfleet[{extra}]"', name=module,
        ) from e


# ------------------------------------------------------------------------------ Minari


def minari_schema_problem(schema: Mapping[tuple[str, ...], Any]) -> str | None:
    """Why rows of ``schema`` cannot become Minari episodes, or None when they can."""
    needed = [*MINARI_KEYS.values(), *_MINARI_IMPLIED, EPISODE_ID, STEP]
    missing = [".".join(k) for k in needed if k not in schema]
    if missing:
        return (f"the buffer has no key {missing[0]!r} (keys: {sorted('.'.join(k) for k in schema)}); "
                f"Minari episodes need rlfleet's row layout (DESIGN.md, 'Data')")
    nested = sorted(".".join(k) for k in schema if len(k) > 1 and k[:1] in (OBSERVATION, ("action",)))
    if nested:
        return f"key {nested[0]!r}: Minari export takes one observation and one action array, not nested ones"
    for key in (*MINARI_KEYS.values(), DONE):
        if key[0] == "next" and key != NEXT_OBSERVATION and tuple(schema[key][0]) != (1,):
            return f"key {'.'.join(key)!r} has per-row shape {list(schema[key][0])}, rlfleet rows have [1]"
    return None


def episode_to_minari(rows: Arrays) -> dict[str, Any]:
    """The fields of one Minari episode (``EpisodeBuffer``'s keywords) from the rows of one
    whole episode, in step order (``{key path: [T, ...]}``).

    Raises:
        EpisodeMismatch: a row's next observation is not the following row's observation.
    """
    obs = rows[OBSERVATION]
    nxt = rows[NEXT_OBSERVATION]
    if len(obs) > 1 and not np.array_equal(nxt[:-1], obs[1:]):
        bad = int(np.flatnonzero([not np.array_equal(a, b) for a, b in zip(nxt[:-1], obs[1:])])[0])
        raise EpisodeMismatch(
            f"episode {int(rows[EPISODE_ID][0])}: next.observation of step {bad} is not the "
            f"observation of step {bad + 1}"
        )
    fields: dict[str, Any] = {"observations": np.concatenate([obs, nxt[-1:]])}
    for name in ("actions", "rewards", "terminations", "truncations"):
        value = rows[MINARI_KEYS[name]]
        fields[name] = value if name == "actions" else value[:, 0]
    infos: dict[str, Any] = {}
    implied = {*MINARI_KEYS.values(), *_MINARI_IMPLIED}
    for key, value in rows.items():
        if key in implied:
            continue
        node = infos
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = np.concatenate([value, value[-1:]])  # along the T+1 observations
    fields["infos"] = {INFOS_GROUP: infos}
    return fields


def minari_to_rows(episode: Any, *, episode_id: int) -> Arrays:
    """The rows of one Minari episode (an ``EpisodeData`` or its fields as a mapping).

    Keys rlfleet wrote under ``infos["rlfleet"]`` come back as they were; a dataset that
    rlfleet did not write gets ``episode_id`` (the Minari episode id, passed in), ``step``
    from 0, and ``collector_id`` and ``policy_version`` -1. Dict observations become
    nested keys (``("observation", name)``).
    """
    get = episode.get if isinstance(episode, Mapping) else lambda name: getattr(episode, name)
    rewards = np.asarray(get("rewards"))
    t = len(rewards)
    out: Arrays = {}
    for key, value in _flatten(get("observations"), OBSERVATION):
        out[key] = np.asarray(value[:t])
        out[("next", *key)] = np.asarray(value[1:t + 1])
    for key, value in _flatten(get("actions"), ("action",)):
        out[key] = np.asarray(value[:t])
    out[MINARI_KEYS["rewards"]] = rewards.astype(np.float32, copy=False).reshape(t, 1)
    terminated = np.asarray(get("terminations"), dtype=bool).reshape(t, 1)
    truncated = np.asarray(get("truncations"), dtype=bool).reshape(t, 1)
    out[MINARI_KEYS["terminations"]] = terminated
    out[MINARI_KEYS["truncations"]] = truncated
    out[DONE] = terminated | truncated
    infos = get("infos") or {}
    ours = infos.get(INFOS_GROUP) if isinstance(infos, Mapping) else None
    if isinstance(ours, Mapping):
        for key, value in _flatten(ours, ()):
            out[key] = np.asarray(value)[:t]
    else:
        out[EPISODE_ID] = np.full(t, episode_id, dtype=np.int64)
        out[STEP] = np.arange(t, dtype=np.int64)
        out[COLLECTOR_ID] = np.full(t, FOREIGN_ID, dtype=np.int64)
        out[POLICY_VERSION] = np.full(t, FOREIGN_ID, dtype=np.int64)
    return out


def _flatten(value: Any, prefix: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(value, Mapping):
        return [item for k, v in value.items() for item in _flatten(v, (*prefix, str(k)))]
    if isinstance(value, tuple):
        raise ValueError(f"{'.'.join(prefix)}: Tuple spaces have no rlfleet key layout; use a Dict space")
    return [(prefix, value)]


# ------------------------------------------------------------------------ Hugging Face


def column_name(key: tuple[str, ...]) -> str:
    """The Hugging Face column of a key: its parts joined with ``"."``.

    Raises:
        ValueError: a part holds a ``"."`` (the column could not be split back).
    """
    bad = next((part for part in key if "." in part), None)
    if bad is not None:
        raise ValueError(
            f"key {key!r}: the part {bad!r} holds a '.', which joins key parts in Hugging Face "
            f"column names; rename the key in the buffer to export it"
        )
    return ".".join(key)


def column_key(name: str) -> tuple[str, ...]:
    """The key of a Hugging Face column (``column_name``'s inverse)."""
    return tuple(name.split("."))


def hf_features(schema: Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]) -> Any:
    """``datasets.Features`` of rows of ``schema``: nested fixed-size lists of the key's
    dtype (``Sequence(..., length=d)`` per dimension), a plain ``Value`` for a scalar."""
    datasets = require("datasets")
    features = {}
    for key, (shape, dtype) in schema.items():
        dtype = np.dtype(dtype)
        feature = datasets.Value("bool" if dtype == np.bool_ else dtype.name)
        for dim in reversed(tuple(shape)):
            feature = datasets.Sequence(feature, length=int(dim))
        features[column_name(key)] = feature
    return datasets.Features(features)


def rows_to_arrow(rows: Arrays) -> Any:
    """A ``pyarrow.Table`` of rows (``hf_features``' layout), built without Python loops."""
    pa = require("pyarrow")
    columns = {}
    for key, value in rows.items():
        array = pa.array(np.ascontiguousarray(value).reshape(-1))
        for dim in reversed(value.shape[1:]):
            array = pa.FixedSizeListArray.from_arrays(array, int(dim))
        columns[column_name(key)] = array
    return pa.table(columns)


def arrow_column_to_numpy(column: Any, rows: int, name: str) -> np.ndarray:
    """A column of a ``pyarrow`` table as ``[rows, *shape]`` numpy, whatever list types
    (fixed-size lists, ``Array2D``.. extension arrays, uniform variable lists) hold it.

    Raises:
        ValueError: rows of different shapes, or values that are not numbers or bools.
    """
    pa = require("pyarrow")
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape: list[int] = []
    while True:
        if isinstance(array, pa.ExtensionArray):
            array = array.storage
        kind = array.type
        if pa.types.is_fixed_size_list(kind):
            shape.append(kind.list_size)
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            lengths = array.value_lengths().to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != lengths[0]).any():
                raise ValueError(f"column {name!r}: rows of different lengths; a buffer key has one per-row shape")
            shape.append(int(lengths[0]) if len(lengths) else 0)
        else:
            break
        array = array.flatten()
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)):
        raise ValueError(f"column {name!r} holds {array.type} values; buffers hold numbers and bools")
    return array.to_numpy(zero_copy_only=False).reshape(rows, *shape)
