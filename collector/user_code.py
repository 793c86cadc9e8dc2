"""Importing user code named ``"package.module:attr"`` (envs, wrappers, policy networks).

Runs wherever a config is turned into objects: the driver (``rlfleet run`` checks the env
and the policy before anything starts), collector actors and learner actors. Thread-safe
as far as ``importlib`` is.

Where modules are found: as ``python -m`` does, the current working directory comes
first, so ``env.id: my_env:make`` finds ``./my_env.py`` from the directory the command
runs in, without ``PYTHONPATH=.`` (the ``rlfleet`` console script alone would only search
its own ``bin`` directory). Ray actors run in a directory of Ray's, not the user's: Ray
puts the driver's working directory at the time of ``ray.init`` on every worker's
``sys.path`` of the job (``JobConfig``'s driver sys.path, Ray 2.x), which is the same
directory, so the actors import the same file. That holds on one machine and on clusters
whose nodes share the path; across machines without it, ship the code with Ray's
``runtime_env`` (``ray job submit --working-dir .``, as README's cluster section does)
or install it as a package.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__all__ = ["import_attr"]


def _cwd_first() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_attr(path: str, what: str) -> Any:
    """The object ``path`` = ``"package.module:attr"`` names.

    Args:
        path: ``module:attr``; ``module`` may be dotted, ``attr`` may not be empty.
        what: the config field, for messages (``"env.id"``, ``"policy.type"``).

    Returns:
        The attribute, or None when the module has none of that name (callers that
        accept other meanings, such as gymnasium's ``module:EnvId``, decide).

    Raises:
        ValueError: ``path`` is malformed or its module does not import; the message says
            where modules are searched.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {path!r}: expected 'package.module:callable'")
    _cwd_first()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"{what} {path!r}: cannot import module {module_name!r} ({e}); it is searched in "
            f"the working directory ({os.getcwd()}) first, then on sys.path: run from the "
            "directory that holds it, install it, or fix the 'package.module:callable' path"
        ) from e
    return getattr(module, attr, None)
