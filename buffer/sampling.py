"""Sampler options: the one place a sampler setting is checked and given its defaults.

``check_sampler`` turns ``"uniform"`` or ``{"type": "prioritized", "alpha": 0.7}`` into
the full mapping the buffer stores in ``meta.json`` (every parameter present). Everything
that takes a sampler calls it: ``ReplayBuffer.create`` and ``open``, the checks of a
stored ``meta.json``, and the YAML layer of ``rlfleet`` (``buffer.sampler``).

Runs anywhere; pure functions, thread-safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SAMPLER_DEFAULTS", "check_sampler"]

# every sampler type and its parameters with their defaults
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "without_replacement": {},
    "prioritized": {"alpha": 0.6, "beta": 0.4},
    "sequence": {"length": 8},
}


def check_sampler(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """Normalise a sampler name or mapping to the full mapping (type plus every parameter).

    Example::

        check_sampler("prioritized")  # {"type": "prioritized", "alpha": 0.6, "beta": 0.4}

    Raises:
        ValueError: an unknown type or parameter, or a parameter out of its range
            (``alpha``, ``beta``: finite, >= 0; ``length``: an integer >= 1); the
            message names the key, the value, the range and a value that works.
    """
    if isinstance(spec, str):
        out: dict[str, Any] = {"type": spec}
    elif isinstance(spec, Mapping):
        out = dict(spec)
    else:
        raise ValueError(
            f"sampler={spec!r}: expected a name ({', '.join(SAMPLER_DEFAULTS)}) or a mapping "
            f"such as {{'type': 'prioritized', 'alpha': 0.6, 'beta': 0.4}}"
        )
    kind = out.pop("type", None)
    if kind not in SAMPLER_DEFAULTS:
        raise ValueError(f"sampler type {kind!r} is unknown; choose one of {', '.join(SAMPLER_DEFAULTS)}")
    defaults = SAMPLER_DEFAULTS[kind]
    unknown = sorted(set(out) - set(defaults), key=str)
    if unknown:
        raise ValueError(
            f"sampler {kind!r} has no parameter {unknown[0]!r}; it takes "
            f"{sorted(defaults) or 'no parameters'}"
        )
    out = {"type": kind, **defaults, **out}
    for name in ("alpha", "beta"):
        if name in out:
            value = out[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(
                    f"sampler {name}={value!r}: must be a finite number >= 0 (default "
                    f"{defaults[name]})"
                )
            out[name] = float(value)
    if kind == "sequence":
        length = out["length"]
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(
                f"sampler length={length!r}: must be an integer >= 1 (rows per slice; "
                f"default {defaults['length']})"
            )
    return out
