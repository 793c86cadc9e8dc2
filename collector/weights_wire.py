"""The broadcast transport's wire format and group forming, shared by its two ends.

``weights_broadcast.py`` holds the two ends (publisher and receiver) and writes the
protocol down; this module holds what both ends must agree on byte for byte: the store
keys, the layout of a message (``int64 version`` then every tensor's bytes), packing and
unpacking, and forming a generation's gloo group. Pure functions of their arguments:
thread-safe. Runs wherever an end runs (learner rank 0, collector actors).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

__all__ = [
    "GEN_KEY",
    "HEADER_BYTES",
    "JOINS_KEY",
    "LAYOUT_KEY",
    "broadcast_options",
    "gloo_group",
    "local_address",
    "message_bytes",
    "pack_state_dict",
    "state_dict_layout",
    "unpack_state_dict",
]

GEN_KEY = "gen"
JOINS_KEY = "joins"
LAYOUT_KEY = "layout"
HEADER_BYTES = 8


def state_dict_layout(state_dict: Mapping[str, torch.Tensor]) -> list[list[Any]]:
    """``[[key, dtype name, shape], ...]`` in the state dict's order (JSON-ready)."""
    return [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in state_dict.items()]


def _sizes(layout: list[list[Any]]) -> list[int]:
    sizes = []
    for _, dtype, shape in layout:
        numel = 1
        for d in shape:
            numel *= int(d)
        sizes.append(numel * torch.empty((), dtype=getattr(torch, dtype)).element_size())
    return sizes


def message_bytes(layout: list[list[Any]]) -> int:
    """Bytes of one message of this layout, the version header included."""
    return HEADER_BYTES + sum(_sizes(layout))


def pack_state_dict(state_dict: Mapping[str, torch.Tensor], version: int) -> torch.Tensor:
    """One flat ``uint8`` tensor: the version (int64) then every tensor's bytes."""
    parts = [torch.tensor([int(version)], dtype=torch.int64).view(torch.uint8)]
    parts += [v.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for v in state_dict.values()]
    return torch.cat(parts)


def unpack_state_dict(buf: torch.Tensor, layout: list[list[Any]]) -> tuple[dict[str, torch.Tensor], int]:
    """Inverse of :func:`pack_state_dict`: ``(state_dict, version)``, tensors copied out of ``buf``."""
    version = int(buf[:HEADER_BYTES].view(torch.int64)[0])
    out: dict[str, torch.Tensor] = {}
    offset = HEADER_BYTES
    for (key, dtype_name, shape), size in zip(layout, _sizes(layout)):
        out[key] = buf[offset : offset + size].view(getattr(torch, dtype_name)).reshape(shape).clone()
        offset += size
    return out, version


def gloo_group(store: dist.Store, gen: int, rank: int, size: int, *, host: str, timeout_s: float) -> dist.ProcessGroup:
    """Build the gloo group of generation ``gen`` (blocks until all ``size`` ranks arrive or ``timeout_s``).

    ``host`` is this process's own address for gloo to bind to.
    """
    prefix = dist.PrefixStore(f"g{gen}/", store)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefix, rank, size, options)


def broadcast_options() -> dist.BroadcastOptions:
    """Options of a broadcast from rank 0 of a weight group."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return opts


def local_address() -> str:
    """This node's address in the Ray cluster; loopback outside Ray (tests, scripts)."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
