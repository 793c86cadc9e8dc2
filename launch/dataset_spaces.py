"""The observation and action spaces a Minari export records for a buffer's rows.

From the run's env (``config.yaml``), from an env id given for a bare buffer, or
inferred from the stored shapes and dtypes: Box spaces over the dtype's range (uint8:
0..255, so Minari sees images; floats unbounded). An inferred integer action is a Box,
not a Discrete: the number of actions is not stored. Spaces from an env are checked
against the rows, so a dataset never claims spaces its data does not have.

Runs on the driver (building the env once). Thread-safe as far as the env's constructor is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rlfleet.launch.dataset_export import BufferSource

__all__ = ["spaces_for"]


def spaces_for(source: "BufferSource", env: str | None, schema: dict) -> tuple[Any, Any, Any, str]:
    """``(observation_space, action_space, env_spec or None, where they came from)``.

    Raises:
        ValueError: the env's spaces do not describe the stored rows.
    """
    import gymnasium

    if env is None and source.env is None:
        obs, act = (_box(*schema[(k,)]) for k in ("observation", "action"))
        return obs, act, None, "inferred from the buffer's schema (Box spaces; pass --env ID for the env's own)"
    from rlfleet.collector import EnvConfig, make_env

    config = EnvConfig(id=env) if env is not None else source.env
    made = make_env(config, seed=source.seed)
    try:
        obs, act = made.observation_space, made.action_space
        spec = made.spec if ":" not in config.id and not config.wrappers else None
    finally:
        made.close()
    for name, space in (("observation", obs), ("action", act)):
        shape, dtype = schema[(name,)]
        if isinstance(space, gymnasium.spaces.Discrete):
            fits = shape == () and np.issubdtype(dtype, np.integer)
        else:
            fits = tuple(getattr(space, "shape", ()) or ()) == tuple(shape) and np.dtype(space.dtype) == dtype
        if not fits:
            raise ValueError(
                f"export-dataset: env {config.id!r} has {name} space {space}, but the buffer stores "
                f"{name} as {dtype} {list(shape)}; pass the env the rows came from (--env ID)"
            )
    return obs, act, spec, f"env {config.id!r}" + (" (the run's)" if env is None else "")


def _box(shape: tuple[int, ...], dtype: np.dtype) -> Any:
    import gymnasium

    if dtype == np.uint8:
        low, high = 0, 255
    elif np.issubdtype(dtype, np.integer):
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
    elif dtype == np.bool_:
        low, high = 0, 1
    else:
        low, high = -np.inf, np.inf
    return gymnasium.spaces.Box(low, high, tuple(shape), dtype)
