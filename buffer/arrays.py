"""Flat arrays <-> TensorDicts, position and index arguments, and the sample allocator.

The buffer's hot paths work on flat ``{key path: ndarray}`` dicts (what crosses Ray);
this module converts at the edges: a TensorDict ``[N]`` to views of its leaves for
``extend``, fresh sample arrays to a TensorDict without copying, and the many forms a
caller may pass as positions or indices to plain int64 arrays.

Runs wherever the buffer lives; everything is thread-safe (the shared state is the
once-per-process allocator setting and ``OutBatches``' lock-guarded cache).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from rlfleet.buffer.errors import SchemaMismatch
from rlfleet.buffer.storage import format_key

__all__ = [
    "OutBatches",
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
        value = value.numpy() if value.device.type == "cpu" and not value.requires_grad else value.detach().cpu().numpy()
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


def _leaf(td: TensorDictBase, key: tuple[str, ...]) -> Any:
    """The tensor at ``key`` by plain dict lookups (a TensorDict's private store; about
    20x cheaper than ``get``), or None when ``td`` is not stored that way."""
    node: Any = td
    try:
        for part in key:
            node = node._tensordict[part]
    except (AttributeError, KeyError, TypeError):
        return None
    return node


class OutBatches:
    """Numpy views of the tensors of caller-owned ``out`` batches, checked once per batch.

    ``sample(n, out=batch)`` copies rows straight into ``batch``'s tensors. The first call
    with a batch checks every key, dtype, shape and device against what ``sample``
    returns and keeps numpy views of its tensors; later calls only confirm, by identity,
    that the batch still holds those same tensors (about 1 us instead of 10).

    Thread-safe (a lock around the cache; the views themselves are the caller's).
    """

    def __init__(self) -> None:
        # id(batch) -> (weak ref to it, its batch dims, (key, tensor) pairs, numpy views)
        self._cache: dict[int, tuple[Any, ...]] = {}
        self._lock = threading.Lock()

    def views(self, out: Any, lead: tuple[int, ...],
              expected: Callable[[], Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]],
              where: str = "sample") -> dict[tuple[str, ...], np.ndarray]:
        """``{key: writable ndarray view}`` of ``out``'s tensors for every key of
        ``expected()`` (called only when ``out`` is new or changed), for batch dims ``lead``.

        Raises:
            TypeError: ``out`` is not a TensorDict.
            ValueError: ``out``'s batch size is not ``lead``, or a key is missing, or its
                tensor has another dtype or shape, is not on the CPU, or is not contiguous;
                the message names it and says the fix.
        """
        with self._lock:
            entry = self._cache.get(id(out))
        if (entry is not None and entry[0]() is out and entry[1] == lead
                and all(_leaf(out, k) is t for k, t in entry[2])):
            return entry[3]
        tensors, arrays = self._check(out, lead, expected(), where)
        with self._lock:
            if len(self._cache) >= 64:  # forget batches that were garbage-collected
                self._cache = {i: e for i, e in self._cache.items() if e[0]() is not None}
            self._cache[id(out)] = (weakref.ref(out), lead, tensors, arrays)
        return arrays

    @staticmethod
    def _check(out: Any, lead: tuple[int, ...], expected: Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]],
               where: str) -> tuple[tuple[tuple[tuple[str, ...], torch.Tensor], ...], dict[tuple[str, ...], np.ndarray]]:
        if not isinstance(out, TensorDictBase):
            raise TypeError(f"{where}: out must be a TensorDict returned by an earlier sample, got {type(out).__name__}")
        if tuple(out.batch_size) != lead:
            raise ValueError(
                f"{where}: out has batch_size {list(out.batch_size)} but this call gives {list(lead)}; "
                f"pass a batch an earlier sample with the same n returned"
            )
        tensors = []
        arrays = {}
        for key, (shape, dtype) in expected.items():
            name = format_key(key)
            value = out.get(key, None)
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{where}: out has no tensor at key '{name}'; pass a batch an earlier "
                    f"sample(n) of this buffer returned (it holds every key of the schema)"
                )
            want = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            if value.dtype != want or tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"{where}: out['{name}'] is {value.dtype} {list(value.shape)}, expected "
                    f"{want} {list(shape)}; pass a batch an earlier sample with the same n returned"
                )
            if value.device.type != "cpu" or not value.is_contiguous() or value.requires_grad:
                raise ValueError(
                    f"{where}: out['{name}'] must be a contiguous CPU tensor without grad "
                    f"(got device {value.device}, contiguous={value.is_contiguous()}, "
                    f"requires_grad={value.requires_grad}); sample into a batch sample returned"
                )
            tensors.append((key, value))
            arrays[key] = value.numpy()
        return tuple(tensors), arrays
