"""Flat arrays <-> TensorDicts, position and index arguments, and the sample allocator.

The buffer's hot paths work on flat ``{key path: ndarray}`` dicts (what crosses Ray);
this module converts at the edges: a TensorDict ``[N]`` to views of its leaves for
``extend``, fresh sample arrays to a TensorDict without copying, and the many forms a
caller may pass as positions or indices to plain int64 arrays.

Runs wherever the buffer lives; every function is thread-safe (no shared state except
the once-per-process allocator setting).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from rlfleet.buffer.errors import SchemaMismatch
from rlfleet.buffer.storage import format_key

__all__ = [
    "arrays_to_tensordict",
    "as_numpy",
    "normalise_key",
    "positions",
    "tensordict_to_arrays",
    "tune_allocator",
]

logger = logging.getLogger(__name__)

_allocator_tuned = False


def tune_allocator() -> None:
    """Keep freed multi-MB sample outputs in the heap instead of returning them to the OS.

    glibc serves blocks above its mmap threshold with a fresh mmap and unmaps them on
    free, so every batch would page-fault its output anew (gathers cap near 3 GB/s
    instead of ~14). Raising the mmap and trim thresholds makes freed outputs reusable.
    Process-wide, done once at the first create/open (never at import); a no-op off glibc.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum on 64-bit
        libc.mallopt(m_trim_threshold, 256 * 2**20)
    except (OSError, AttributeError):
        logger.debug("mallopt unavailable; sample outputs use the default allocator")


def normalise_key(key: Any) -> tuple[str, ...]:
    if type(key) is tuple and key and type(key[0]) is str and len(key) == 1:
        return key  # the common case, checked cheaply
    if isinstance(key, str):
        return (key,)
    if isinstance(key, tuple) and key and all(isinstance(k, str) for k in key):
        return key
    raise ValueError(f"extend_arrays: key {key!r} must be a string or a tuple of strings")


def tensordict_to_arrays(td: TensorDictBase, where: str = "extend") -> dict[tuple[str, ...], np.ndarray]:
    """Flat ``{key path: ndarray}`` views of a TensorDict ``[N]`` (no copy for CPU tensors)."""
    if not isinstance(td, TensorDictBase):
        raise TypeError(f"{where}: expected a TensorDict with batch_size [N], got {type(td).__name__}")
    if td.batch_dims != 1:
        raise ValueError(
            f"{where}: expected a TensorDict with batch_size [N], got batch_size "
            f"{list(td.batch_size)}; build it with batch_size=[N] (or reshape(-1) it)"
        )
    out: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in td.items(include_nested=True, leaves_only=True):
        key = normalise_key(key)
        if not isinstance(value, torch.Tensor):
            raise SchemaMismatch(
                f"{where}: key '{format_key(key)}' holds {type(value).__name__}, not a tensor; "
                f"only tensors can be stored"
            )
        if value.dtype == torch.bfloat16 or value.is_complex():
            raise SchemaMismatch(
                f"{where}: key '{format_key(key)}' has dtype {value.dtype}, which has no "
                f"numpy equivalent; store it as float32"
            )
        out[key] = value.detach().cpu().numpy()
    return out


def arrays_to_tensordict(arrays: Mapping[tuple[str, ...], np.ndarray], batch_size: list[int]) -> TensorDict:
    """Wrap flat arrays (key paths) into a nested TensorDict without copying.

    The arrays must be writable and own-able by the result (fresh sample outputs are);
    every array has the leading dims ``batch_size``.
    """
    size = torch.Size(batch_size)
    if _new_unsafe is not None:
        try:
            return _build(_plan(tuple(arrays)), arrays, size)
        except TypeError:  # a tensordict whose private constructor takes other arguments
            pass
    nested: dict[str, Any] = {}
    for key, arr in arrays.items():
        node = nested
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = torch.from_numpy(arr)
    return TensorDict(nested, batch_size=size)


# TensorDict's constructor validates every leaf (about 40 us for a cartpole batch, as
# much as the gather itself); our leaves are fresh CPU tensors of the right batch
# size by construction, so the unchecked constructor is safe. Fall back if it is gone.
_new_unsafe = getattr(TensorDict, "_new_unsafe", None)

# A plan is the nesting of one key layout, worked out once: a tuple of
# (name, key path) for leaves and (name, sub-plan) for nested TensorDicts. A buffer
# has one or two layouts (with and without "weight"), so the cache stays tiny.
_Plan = tuple[tuple[str, Any, bool], ...]
_plans: dict[tuple[tuple[str, ...], ...], _Plan] = {}
_MAX_PLANS = 256


def _plan(keys: tuple[tuple[str, ...], ...]) -> _Plan:
    plan = _plans.get(keys)
    if plan is None:
        nested: dict[str, Any] = {}
        for key in keys:
            node = nested
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = key
        plan = _compile(nested)
        if len(_plans) < _MAX_PLANS:
            _plans[keys] = plan
    return plan


def _compile(nested: dict[str, Any]) -> _Plan:
    return tuple(
        (name, _compile(item), False) if isinstance(item, dict) else (name, item, True)
        for name, item in nested.items()
    )


def _build(plan: _Plan, arrays: Mapping[tuple[str, ...], np.ndarray], size: torch.Size) -> TensorDict:
    source = {
        name: torch.from_numpy(arrays[item]) if leaf else _build(item, arrays, size)
        for name, item, leaf in plan
    }
    return _new_unsafe(source=source, batch_size=size)


def as_numpy(value: Any, dtype: type, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if dtype is np.int64 and arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"update_priority: {name} has dtype {arr.dtype}; pass integer indices")
    return arr.astype(dtype, copy=False)


def positions(pos: Any, size: int) -> tuple[np.ndarray, bool]:
    if isinstance(pos, (int, np.integer)) and not isinstance(pos, bool):
        p = int(pos)
        if not -size <= p < size:
            raise IndexError(f"position {p} is out of range for a buffer of {size} rows")
        return np.array([p % size], dtype=np.int64), True
    if isinstance(pos, slice):
        return np.arange(*pos.indices(size), dtype=np.int64), False
    arr = pos.detach().cpu().numpy() if isinstance(pos, torch.Tensor) else np.asarray(pos)
    if arr.dtype == np.bool_:
        if arr.shape != (size,):
            raise IndexError(f"boolean mask of shape {list(arr.shape)} for a buffer of {size} rows")
        return np.flatnonzero(arr).astype(np.int64), False
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise IndexError(f"positions must be an int, a slice or a 1-D int tensor, got {pos!r}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < -size or arr.max() >= size):
        raise IndexError(f"positions {arr.min()}..{arr.max()} out of range for a buffer of {size} rows")
    return arr % max(size, 1), False
