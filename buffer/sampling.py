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

__all__ = ["SAMPLER_DEFAULTS", "check_n_step", "check_sampler"]

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

    Every type also takes ``n_step: {"n": 3, "gamma": 0.99}``: n-step transitions rebuilt
    at sample time (``nstep``); the key is left out when it is absent or None.

    Raises:
        ValueError: an unknown type or parameter, or a parameter out of its range
            (``alpha``, ``beta``: finite, >= 0; ``length``: an integer >= 1; ``n_step``:
            ``check_n_step``); the
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
    n_step = out.pop("n_step", None)
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
    if n_step is not None:
        out["n_step"] = check_n_step(n_step)
    return out


def check_n_step(n_step: Any) -> dict[str, Any]:
    """Normalise a sampler's ``n_step`` option to ``{"n": int >= 1, "gamma": float in [0, 1]}``."""
    example = "{'n': 3, 'gamma': 0.99}"
    if not isinstance(n_step, Mapping):
        raise ValueError(f"sampler n_step={n_step!r}: expected a mapping such as {example}, or None")
    unknown = sorted(set(n_step) - {"n", "gamma"}, key=str)
    if unknown or "n" not in n_step or "gamma" not in n_step:
        raise ValueError(
            f"sampler n_step={dict(n_step)!r}: needs exactly the keys 'n' and 'gamma', e.g. {example}"
        )
    n, gamma = n_step["n"], n_step["gamma"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sampler n_step n={n!r}: must be an integer >= 1 (steps per return), e.g. 3")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"sampler n_step gamma={gamma!r}: must be a number in [0, 1] (the discount), e.g. 0.99")
    return {"n": int(n), "gamma": float(gamma)}
