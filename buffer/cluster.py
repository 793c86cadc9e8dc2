"""Starting or joining Ray: ``init_ray``, the one function every rlfleet entry point calls.

Runs on the driver: any process about to use Ray (``rlfleet run``, ``serve``, ``status``,
``sample``, ``stop``, ``BufferClient.connect``, ``ReplayService.launch``). Not thread-safe:
call it from one thread, as ``ray.init`` itself.

Which cluster. One rule for every entry point:

- Ray already initialised in this process: that cluster, as it is.
- ``address="local"``: a new Ray owned by this process (embedded), never a cluster that
  ``ray start`` or another program left running on the machine. ``rlfleet run`` with
  ``ray.address: null`` asks for this.
- ``address=None``: the cluster named by ``RAY_ADDRESS``; without it,
  :class:`ClusterConnectError`. Silently attaching to whatever Ray runs on the machine
  once wrote a buffer into somebody else's cluster.
- ``address="auto"``: the cluster ``ray start`` started on this machine (Ray's own
  lookup), named on purpose.
- ``"host:port"`` (the head's GCS port, 6379 by default) or ``"ray://host:port"`` (Ray
  Client): that cluster.

Bounded wait. ``ray.init`` alone waits about ten minutes on an address where nothing
answers (20 tries of a 30 s GCS connect; both numbers are fixed when ``ray`` is imported,
so environment variables set later do not shorten them), and a refused auth token reads
as "could not connect" after 20 s of warnings. So before ``ray.init`` this module asks the
cluster itself, all within ``timeout_s``:

1. a TCP connect to host:port: "nothing listens" (refused) or "no answer" (timed out);
2. a GCS handshake with Ray's own client and a deadline, on a helper thread so a stuck
   handshake cannot outlive the bound: a refused token is named as such, with how to set
   it; silence means the port is not a Ray GCS;
3. the cluster's Ray and Python versions (its ``CLUSTER_METADATA``) against this process's.

Only then does ``ray.init`` run, and it joins in about a second: the cluster answered a
moment before. Steps 2 and 3 use Ray's private ``ray._raylet.InnerGcsClient``; with a Ray
that lacks it they are skipped, and ``ray.init``'s own errors are translated instead.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray

__all__ = ["ClusterConnectError", "ClusterInfo", "DEFAULT_CONNECT_TIMEOUT_S", "init_ray", "version_mismatch"]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 30.0

_START_ONE = (
    "start one with `RAY_AUTH_MODE=token ray start --head` (it prints the address; the "
    "token is in ~/.ray/auth_token), or check the address"
)


class ClusterConnectError(ConnectionError):
    """Ray could not be started or joined; the message names the address and the cause."""


@dataclass(frozen=True)
class ClusterInfo:
    """The Ray cluster this process uses after :func:`init_ray`.

    Attributes:
        address: the cluster's GCS address (``host:port``).
        started: this call initialised Ray in this process (the caller owns the
            connection and calls ``ray.shutdown()`` when done); False when Ray was
            already initialised.
        embedded: the cluster is a local Ray this process started (``address="local"``).
        num_nodes: alive nodes when this call started or joined it; None when Ray was
            already initialised (not counted: ``BufferClient`` calls this often).
    """

    address: str
    started: bool
    embedded: bool
    num_nodes: int | None

    def describe(self) -> str:
        """One line for the screen: which cluster, joined or started, how many nodes."""
        if self.num_nodes is None:
            return f"using the Ray cluster at {self.address}"
        nodes = f"{self.num_nodes} node" + ("" if self.num_nodes == 1 else "s")
        if self.embedded:
            return f"started an embedded Ray at {self.address} ({nodes})"
        verb = "joined" if self.started else "using"
        return f"{verb} the Ray cluster at {self.address} ({nodes})"


def init_ray(
    address: str | None,
    *,
    namespace: str = "rlfleet",
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    runtime_env: Mapping[str, Any] | None = None,
    **local_options: Any,
) -> ClusterInfo:
    """Start or join Ray by the rule in the module docstring, waiting at most ``timeout_s``.

    Args:
        address: ``"local"``, ``"auto"``, ``"host:port"``, ``"ray://host:port"``, or None
            for ``RAY_ADDRESS``.
        namespace: Ray namespace of this process's named actors.
        timeout_s: bound on finding out whether the cluster answers, accepts this
            process's token and runs the same versions (joining only).
        runtime_env: Ray's runtime env for this process's job (working dir, pip
            packages, env vars), handed to ``ray.init`` whether it starts or joins Ray;
            ignored when Ray is already initialised.
        local_options: more ``ray.init`` keyword arguments for an embedded Ray
            (``num_cpus``, ``include_dashboard``, ...); the dashboard binds to 127.0.0.1.

    Returns:
        A :class:`ClusterInfo`.

    Raises:
        ClusterConnectError: no address and no ``RAY_ADDRESS``; or the cluster at the
            address does not answer, refuses this process's token, or runs other Ray or
            Python versions. The message names the address and says what to do.
        ValueError: ``timeout_s`` is not positive, or a malformed address.
    """
    if not timeout_s > 0:
        raise ValueError(f"init_ray: timeout_s={timeout_s!r} must be > 0 seconds")
    if ray.is_initialized():
        return _info(started=False, embedded=False, count_nodes=False)
    if address == "local":
        options = {"dashboard_host": "127.0.0.1", "log_to_driver": False, **local_options}
        ray.init(address="local", namespace=namespace, runtime_env=_plain(runtime_env), **options)
        return _info(started=True, embedded=True)
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            raise ClusterConnectError(
                "no Ray cluster address: Ray is not initialised in this process and "
                "RAY_ADDRESS is not set. Name the cluster: --address HOST:PORT (or "
                "address='HOST:PORT'), RAY_ADDRESS=HOST:PORT, or 'auto' for the cluster "
                f"`ray start` started on this machine; {_START_ONE}. In Python, "
                "ray.init(address=...) first also works"
            )
        shown = f"{address!r} (from RAY_ADDRESS)"
        ray_argument = None  # ray.init reads RAY_ADDRESS itself, with its token rules
    else:
        shown = repr(address)
        ray_argument = address
    deadline = time.monotonic() + timeout_s
    if ray_argument in (None, "auto"):
        # What ray.init does next for these addresses: a token file turns token mode on
        # when RAY_AUTH_MODE is unset. Done first so the handshake below sees the same.
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )
        except ImportError:
            pass
        else:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    target, client_mode = _resolve(address, shown)
    _probe_tcp(target, shown, deadline, timeout_s)
    if not client_mode:
        _check_token_present(shown)
        _probe_gcs(target, shown, deadline, timeout_s)
    try:
        ray.init(address=ray_argument, namespace=namespace, log_to_driver=False, runtime_env=_plain(runtime_env))
    except Exception as e:
        raise ClusterConnectError(_init_failure(shown, e)) from e
    info = _info(started=True, embedded=False)
    log.info("%s", info.describe())
    return info


def version_mismatch(cluster_metadata: Mapping[str, Any]) -> str | None:
    """What differs between the cluster's Ray/Python versions and this process's, or None.

    ``cluster_metadata`` is the cluster's ``CLUSTER_METADATA`` record (``ray_version``,
    ``python_version``). Python is compared to the patch level, as Ray does unless
    ``RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor``.
    """
    theirs_ray = str(cluster_metadata.get("ray_version", "?"))
    theirs_py = str(cluster_metadata.get("python_version", "?"))
    mine_py = platform.python_version()
    level = os.environ.get("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "patch")
    digits = 2 if level == "minor" else 3
    same_py = theirs_py.split(".")[:digits] == mine_py.split(".")[:digits]
    if theirs_ray == ray.__version__ and same_py:
        return None
    return (
        f"version mismatch: the cluster runs Ray {theirs_ray} on Python {theirs_py}, this "
        f"process has Ray {ray.__version__} on Python {mine_py}; run both with the same Ray "
        f"and Python versions (same virtual environment or image)"
    )


# --------------------------------------------------------------------------- internals


def _plain(runtime_env: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if runtime_env is None else dict(runtime_env)


def _info(*, started: bool, embedded: bool, count_nodes: bool = True) -> ClusterInfo:
    context = ray.get_runtime_context()
    address = str(getattr(context, "gcs_address", "") or "?")
    num_nodes = None
    if count_nodes:
        try:
            num_nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        except Exception:  # a Ray Client session cannot list nodes: not worth failing for
            num_nodes = None
    return ClusterInfo(address=address, started=started, embedded=embedded, num_nodes=num_nodes)


def _resolve(address: str, shown: str) -> tuple[tuple[str, int], bool]:
    """``((host, port), is_ray_client)`` of an address, ``"auto"`` looked up as Ray does."""
    client_mode = address.startswith("ray://")
    rest = address[len("ray://"):] if client_mode else address
    if "://" in rest:
        raise ValueError(
            f"Ray address {shown}: give the head's GCS address HOST:PORT (port 6379 by "
            "default) or ray://HOST:10001 for Ray Client; an http:// address is the "
            "dashboard's (for `ray job submit`), not a cluster to join"
        )
    if rest == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:  # let ray.init look it up
            return ("", 0), True
        try:
            rest = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as e:
            raise ClusterConnectError(
                f"could not join the Ray cluster at {shown}: no cluster started with "
                f"`ray start` runs on this machine ({e}); {_START_ONE}"
            ) from None
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"Ray address {shown}: expected HOST:PORT (the head's GCS port, 6379 by default), "
            "'auto', or ray://HOST:PORT"
        )
    return (host, int(port)), client_mode


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _probe_tcp(target: tuple[str, int], shown: str, deadline: float, timeout_s: float) -> None:
    host, port = target
    if not host:
        return
    try:
        with socket.create_connection((host, port), timeout=max(0.05, _left(deadline))):
            return
    except ConnectionRefusedError:
        cause = f"nothing listens on {host}:{port} (connection refused)"
    except TimeoutError:
        cause = f"no answer from {host}:{port} within timeout_s={timeout_s:g} (host down or a firewall)"
    except OSError as e:
        cause = f"cannot reach {host}:{port} ({e.strerror or e})"
    raise ClusterConnectError(f"could not join the Ray cluster at {shown}: {cause}; {_START_ONE}")


def _probe_gcs(target: tuple[str, int], shown: str, deadline: float, timeout_s: float) -> None:
    """The handshake and the version check, bounded by ``deadline`` (see module docstring)."""
    try:
        from ray._raylet import InnerGcsClient
    except ImportError:
        return
    host, port = target
    gcs = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    outcome: dict[str, Any] = {}

    def handshake() -> None:
        try:
            client = InnerGcsClient.standalone(gcs, None, max(100, int(_left(deadline) * 1000)))
            outcome["metadata"] = client.internal_kv_get(
                b"CLUSTER_METADATA", b"cluster", timeout=max(0.1, _left(deadline)))
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    # a daemon thread: Ray's connect does not always honour its own deadline, ours does
    thread = threading.Thread(target=handshake, name="rlfleet-gcs-probe", daemon=True)
    thread.start()
    thread.join(_left(deadline))
    if thread.is_alive() or ("error" in outcome and "Timed out" in str(outcome["error"])):
        raise ClusterConnectError(
            f"could not join the Ray cluster at {shown}: something listens on {gcs} but no "
            f"Ray GCS answered within timeout_s={timeout_s:g}; is it the head's GCS port "
            "(6379 by default; `ray start --head` prints it)? A busy head may need a longer "
            "timeout (ray.connect_timeout_s, --connect-timeout)"
        )
    error = outcome.get("error")
    if error is not None:
        if type(error).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(error):
            raise ClusterConnectError(_token_refused(shown))
        raise ClusterConnectError(f"could not join the Ray cluster at {shown}: {error}")
    metadata = outcome.get("metadata")
    if metadata:
        mismatch = version_mismatch(json.loads(metadata))
        if mismatch:
            raise ClusterConnectError(f"could not join the Ray cluster at {shown}: {mismatch}")


def _check_token_present(shown: str) -> None:
    """In token mode without any token, Ray's own client aborts the whole process (a
    failed C++ check, no exception): say what is missing before it gets the chance."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None or mode.lower() != "token":
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN") or (path and os.path.isfile(path)) \
            or os.path.isfile(os.path.expanduser("~/.ray/auth_token")):
        return
    raise ClusterConnectError(
        f"could not join the Ray cluster at {shown}: RAY_AUTH_MODE=token but this process "
        "has no auth token. Give it the cluster's token: RAY_AUTH_TOKEN=<token>, or the "
        "file ~/.ray/auth_token (RAY_AUTH_TOKEN_PATH for another file); `ray "
        "get-auth-token` on the head prints it"
    )


def _token_refused(shown: str) -> str:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() == "token":
        why, fix = "its token differs from the cluster's", "Give"
    else:
        state = f"is {mode!r}" if mode else "is not set"
        why, fix = f"RAY_AUTH_MODE {state} here", "Export RAY_AUTH_MODE=token and give"
    return (
        f"could not join the Ray cluster at {shown}: the cluster refused this process's auth "
        f"token ({why}). {fix} this process the cluster's token: RAY_AUTH_TOKEN=<token>, or "
        "the file ~/.ray/auth_token (RAY_AUTH_TOKEN_PATH for another file); `ray "
        "get-auth-token` on the head prints it"
    )


def _init_failure(shown: str, error: Exception) -> str:
    text = str(error)
    if type(error).__name__ == "AuthenticationError" or "InvalidAuthToken" in text:
        return _token_refused(shown)
    if "ersion mismatch" in text:
        return f"could not join the Ray cluster at {shown}: version mismatch: {text.splitlines()[0]}"
    return f"could not join the Ray cluster at {shown}: {type(error).__name__}: {text}"
