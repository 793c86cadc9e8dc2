"""Compiled slice picking for the sequence sampler (numba): prefetch, then check, in one call.

A sequence sample reads a few hundred random cache lines (32 slices of 8 rows in each
column). In a buffer far larger than the CPU caches each is a trip to memory, and the
numpy gathers would take them almost one at a time: they do enough bookkeeping per row
that the CPU never has many loads in flight. ``pick_slices`` first asks for every line
the call will read (``llvm.prefetch``: a hint that never faults and returns nothing),
the check's ``episode_id`` and ``step`` lines first, and only then checks the slices, so
the misses overlap and the numpy gather that follows finds its rows in cache. That is
what keeps the cost of a sample nearly independent of the buffer's size.

``cache=True`` keeps the machine code next to this file.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

__all__ = ["pick_slices"]

LINE = 64  # bytes per cache line on every CPU numba targets that matters here


@intrinsic
def _prefetch(typingctx, data, offset):  # noqa: ARG001 (numba passes the typing context)
    """Hint the CPU to load the cache line holding ``data[offset]`` (1-D uint8)."""
    sig = types.void(data, offset)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(8).as_pointer())
        # the intrinsic's name carries its pointer type: "p0" (opaque, LLVM >= 15) or "p0i8"
        name = "llvm.prefetch.p0" if str(ptr.type) == "ptr" else "llvm.prefetch.p0i8"
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), name
        )
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _prefetch_rows(column: np.ndarray, row_bytes: int, slot: int, length: int, capacity: int) -> None:
    """Prefetch the lines of rows ``slot .. slot + length - 1`` (ring order) of one column."""
    stop = min(slot + length, capacity)
    offset = slot * row_bytes
    offset -= offset % LINE
    while offset < stop * row_bytes:
        _prefetch(column, offset)
        offset += LINE
    offset = 0
    while offset < (slot + length - capacity) * row_bytes:  # the part past the ring's end
        _prefetch(column, offset)
        offset += LINE


@numba.njit(cache=True, nogil=True)
def pick_slices(episode: np.ndarray, step: np.ndarray, columns: tuple, row_bytes: np.ndarray,
                episode_col: int, step_col: int, starts: np.ndarray, length: int,
                capacity: int, out: np.ndarray) -> int:
    """Write to ``out`` the first ``len(out)`` of ``starts`` (global indices) whose
    ``length`` rows share one ``episode_id`` with ``step`` rising by exactly 1; return
    how many were written.

    ``episode`` and ``step`` are the int64 ``[capacity]`` columns; ``columns`` holds every
    column as flat uint8 bytes (``row_bytes[k]`` per row), ``episode_col`` and ``step_col``
    naming those two. Prefetches the rows of every column for the first ``len(out)``
    starts, the ones most likely kept.
    """
    want = len(out)
    for i in range(len(starts)):
        slot = starts[i] % capacity
        _prefetch_rows(columns[episode_col], row_bytes[episode_col], slot, length, capacity)
        _prefetch_rows(columns[step_col], row_bytes[step_col], slot, length, capacity)
    for i in range(min(want, len(starts))):
        slot = starts[i] % capacity
        for k in range(len(columns)):
            if k != episode_col and k != step_col:
                _prefetch_rows(columns[k], row_bytes[k], slot, length, capacity)
    got = 0
    for i in range(len(starts)):
        if got == want:
            break
        slot = starts[i] % capacity
        first_episode = episode[slot]
        first_step = step[slot]
        ok = True
        for j in range(1, length):
            row = slot + j
            if row >= capacity:
                row -= capacity
            if episode[row] != first_episode or step[row] != first_step + j:
                ok = False
                break
        if ok:
            out[got] = starts[i]
            got += 1
    return got
