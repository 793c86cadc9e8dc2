"""``rlfleet serve | status | sample | stop``: the replay service from the command line.

Runs on the driver. Every command joins a running Ray cluster, named on purpose:
``--address HOST:PORT`` (``serve`` also reads ``ray.address`` from its config), else
``RAY_ADDRESS``, or ``--address auto`` for the cluster ``ray start --head`` started on this
machine; with none of them the command stops and says so, rather than attach to
whichever Ray happens to run here. A detached service has to outlive the command that
started it, so there is no embedded Ray. Joining goes through ``rlfleet.buffer.init_ray``
and gives up after ``--connect-timeout`` seconds, naming the address and the cause (nothing
listening, a refused token, other Ray/Python versions). Buffers and actors are looked up
in one Ray namespace: ``--namespace`` (``serve``: the config's ``ray.namespace``), by
default ``rlfleet``. Each command prints the cluster it joined on stderr and returns an
exit code; errors print one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "sample", "sample_arguments", "serve", "serve_arguments",
    "status", "status_arguments", "stop", "stop_arguments",
]


def _address_argument(parser: argparse.ArgumentParser, *, namespace: bool = True) -> None:
    if namespace:
        parser.add_argument(
            "--namespace", default=None, metavar="NAME",
            help="Ray namespace of the buffers and actors (a run's ray.namespace; default rlfleet)",
        )
    parser.add_argument(
        "--address", default=None,
        help="Ray cluster to join: HOST:PORT, or 'auto' for the one `ray start` started on "
             "this machine (default: RAY_ADDRESS; no default beyond it)",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=None, metavar="SECONDS",
        help="give up joining the cluster after this long (default 30; serve: ray.connect_timeout_s)",
    )


def _namespace(args: argparse.Namespace) -> str:
    """``--namespace``, checked by the name rule; exits with one line on stderr if bad."""
    from rlfleet.buffer import DEFAULT_NAMESPACE, check_namespace

    try:
        return check_namespace(args.namespace or DEFAULT_NAMESPACE, argument="--namespace")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def _attach(address: str | None, timeout_s: float | None, namespace: str,
            runtime_env: dict | None = None) -> None:
    """Join the cluster (see the module docstring) and say which one on stderr.

    ``runtime_env`` (``serve``: the config's ``ray.runtime_env``) goes to ``ray.init``, so
    the detached shards get the config's working dir and packages. Exits with one line on
    stderr when there is no address or the join fails."""
    from rlfleet.buffer import init_ray
    from rlfleet.buffer.cluster import DEFAULT_CONNECT_TIMEOUT_S

    try:
        info = init_ray(address, namespace=namespace, runtime_env=runtime_env,
                        timeout_s=DEFAULT_CONNECT_TIMEOUT_S if timeout_s is None else timeout_s)
    except (ConnectionError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    if info.started:  # joined just now (a process that called ray.init knows its cluster)
        print(info.describe(), file=sys.stderr)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


# -- serve ---------------------------------------------------------------------------------

def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (its name and buffer sections are used)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. buffer.num_shards=2")
    _address_argument(parser, namespace=False)  # the config's ray.namespace


def serve(args: argparse.Namespace) -> int:
    """Start (or reattach to) the config's replay service, detached, and print how to connect."""
    from rlfleet.buffer import DEFAULT_NAMESPACE, ReplayService, running_buffers
    from rlfleet.launch.config import load_config

    overrides = list(args.overrides)
    if args.connect_timeout is not None:
        overrides.append(f"ray.connect_timeout_s={args.connect_timeout}")
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    buf = config.buffer
    path = (Path(buf.path) if buf.path else Path(config.run.dir) / config.name / "buffer").absolute()
    namespace = config.ray.namespace
    _attach(args.address or config.ray.address, config.ray.connect_timeout_s, namespace, config.ray.runtime_env)
    import ray

    if config.name in running_buffers(namespace):
        # A running service keeps its directory: reattaching with another buffer.path
        # would report a path the data is not in.
        where = _running_path(config.name, namespace)
        if where is not None and where != path:
            return _fail(
                f"buffer {config.name!r} already runs with its data under {where}, not under "
                f"{path}; stop it first (`rlfleet stop {config.name}`) to serve it from {path}, "
                f"or set buffer.path={where}"
            )

    nodes = None
    if buf.node_resource is not None:  # shards only on the nodes offering it, as `run` does
        from rlfleet.launch.placement import cluster_nodes, plan_placement

        plan = plan_placement(config, config.name, cluster_nodes(), ray.get_runtime_context().get_node_id())
        if not plan.shard_nodes:
            return _fail(f"buffer.node_resource={buf.node_resource!r}: no alive node offers it; start nodes "
                         f"with --resources='{{\"{buf.node_resource}\": 1}}' or unset buffer.node_resource")
        nodes = list(plan.shard_nodes)
    try:
        service = ReplayService.launch(
            config.name, path.absolute(), nodes=nodes, detached=True, seed=config.seed,
            namespace=namespace, **buf.service_kwargs(config.env),
        )
    except (ValueError, OSError) as e:
        return _fail(str(e))
    stats = service.client().stats()
    where = _running_path(config.name, namespace) or path
    print(f"replay service {config.name!r}: {service.num_shards} shard(s) under {where}")
    print(_table(stats))
    address = ray.get_runtime_context().gcs_address
    print("connect from Python on the cluster:")
    elsewhere = namespace != DEFAULT_NAMESPACE
    connect = f"'{config.name}', namespace='{namespace}'" if elsewhere else f"'{config.name}'"
    print(f"    RAY_ADDRESS={address} RAY_AUTH_MODE=token python -c \"from rlfleet.buffer import "
          f"BufferClient; c = BufferClient.connect({connect}); print(len(c))\"")
    print(f"stop it with: rlfleet stop {config.name}" + (f" --namespace {namespace}" if elsewhere else ""))
    return 0


def _running_path(name: str, namespace: str) -> Path | None:
    """The directory the running buffer ``name`` keeps its shards in (shard 0's parent)."""
    from rlfleet.buffer import BufferClient, BufferNotFound, ShardUnavailable

    try:
        rows = BufferClient.connect(name, namespace=namespace).stats()["shards"]
    except (BufferNotFound, ShardUnavailable):
        return None
    paths = [row["path"] for row in rows if row.get("path")]
    return Path(paths[0]).parent if paths else None


# -- status --------------------------------------------------------------------------------

def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="one buffer or run (default: all)")
    parser.add_argument("--json", action="store_true", help="print buffers, components and nodes as JSON")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="wait per shard (s)")
    parser.add_argument("--watch", nargs="?", const=2.0, default=None, type=float, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="with --watch: stop after N redraws")
    _address_argument(parser)


def status(args: argparse.Namespace) -> int:
    """Print running buffers and their shards (nodes, sizes, rates, limiter), then every
    rlfleet actor with its state (starting, running, restarting, stopped) and node, then
    the nodes; with ``--watch``, redraw until Ctrl-C (or ``--iterations``)."""
    if args.watch is not None and not args.watch > 0:
        return _fail(f"--watch {args.watch:g}: must be > 0 seconds")
    if args.iterations is not None and args.iterations < 1:
        return _fail(f"--iterations {args.iterations}: must be at least 1")
    _attach(args.address, args.connect_timeout, _namespace(args))
    if args.watch is None:
        code, text = _status_once(args)
        if code:
            return _fail(text)
        print(text)
        return 0
    clear = sys.stdout.isatty() and not args.json
    done = 0
    try:
        while True:
            code, text = _status_once(args)
            if clear:
                print("\x1b[H\x1b[2J", end="")
            if not args.json:
                what = f" {args.name}" if args.name else ""
                print(f"every {args.watch:g}s: rlfleet status{what}  {time.strftime('%Y-%m-%d %H:%M:%S')}")
            print(f"error: {text}" if code else text, flush=True)
            done += 1
            if args.iterations is not None and done >= args.iterations:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:  # the way out of --watch
        return 0


def _status_once(args: argparse.Namespace) -> tuple[int, str]:
    """(0, the status text) or (1, an error message)."""
    from rlfleet.buffer import BufferClient, BufferNotFound, ShardUnavailable, running_buffers
    from rlfleet.launch.status import components_table, list_components, list_nodes, nodes_table

    namespace = _namespace(args)
    names = list(running_buffers(namespace))
    components = list_components(args.name, namespace=namespace)
    if args.name is not None:
        if args.name not in names and not components:
            return 1, (f"no replay buffer named {args.name!r}; running: {', '.join(names) or 'none'} "
                       f"(namespace {namespace!r}; another: --namespace)")
        names = [args.name] if args.name in names else []
    everything: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name in names:
        try:
            everything[name] = BufferClient.connect(name, namespace=namespace, timeout_s=args.timeout_s).stats()
        except BufferNotFound as e:  # stopped while we listed
            return 1, str(e)
        except ShardUnavailable as e:  # a shard is down: the components below say which
            problems[name] = str(e)
    nodes = list_nodes(components)
    if args.json:
        return 0, json.dumps({
            "buffers": everything, "unavailable": problems,
            "components": [c.to_dict() for c in components], "nodes": [n.to_dict() for n in nodes],
        }, default=str, indent=None if args.watch is not None else 2)
    parts = [_table(stats) for stats in everything.values()]
    parts += [f"buffer {name!r}: {message}" for name, message in problems.items()]
    if not names:
        parts.append("no replay buffers running")
    if components:
        parts.append(components_table(components))
    parts.append(nodes_table(nodes, components))
    return 0, "\n\n".join(parts)


def _capacity(row: dict[str, Any]) -> str:
    """Rows, or a byte capacity whose row count the first batch has not fixed yet."""
    from rlfleet.buffer.capacity import human_bytes

    if not row.get("capacity") and row.get("capacity_bytes"):
        return human_bytes(row["capacity_bytes"])
    return str(row.get("capacity", "-"))


def _table(stats: dict[str, Any]) -> str:
    from rlfleet.buffer.capacity import human_bytes

    header = ["buffer", "shard", "node", "size", "capacity", "inserted", "sampled",
              "ins/s", "smp/s", "disk", "waiting i/s"]
    lines = [header]
    name = stats["total"]["buffer"]

    def fmt(row: dict[str, Any], shard: str) -> list[str]:
        limiter = row.get("rate_limiter", {})
        return [
            name, shard, str(row.get("node_id") or "-")[:8], str(row.get("size", "-")),
            _capacity(row), str(row.get("total_inserted", "-")),
            str(row.get("samples", "-")), f"{row.get('inserts_per_s', 0):.0f}",
            f"{row.get('samples_per_s', 0):.0f}", human_bytes(row.get("bytes_on_disk", 0)),
            f"{limiter.get('inserts_waiting', 0)}/{limiter.get('samples_waiting', 0)}",
        ]

    for row in stats["shards"]:
        if "error" in row:
            lines.append([name, str(row["shard"]), "DOWN", row["error"]] + [""] * 7)
        else:
            lines.append(fmt(row, str(row["shard"])))
    total = stats["total"]
    lines.append(fmt(total, f"all({total['shards_up']}/{total['num_shards']})"))
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)


# -- sample --------------------------------------------------------------------------------

def sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="buffer name")
    parser.add_argument("-n", type=int, default=4, help="rows to print (default 4)")
    parser.add_argument("--timeout-s", type=float, default=10.0,
                        help="longest wait for the rate limiter (s)")
    _address_argument(parser)


def sample(args: argparse.Namespace) -> int:
    """Print a few sampled rows (from the shards that are up)."""
    from rlfleet.buffer import BufferClient, BufferNotFound, SampleTimeout, ShardUnavailable
    from rlfleet.buffer.indices import counter_of, shard_of

    if args.n < 1:
        return _fail(f"-n {args.n}: must be at least 1")
    namespace = _namespace(args)
    _attach(args.address, args.connect_timeout, namespace)
    try:
        batch = BufferClient.connect(args.name, namespace=namespace).sample(
            args.n, timeout_s=args.timeout_s, allow_partial=True)
    except (BufferNotFound, SampleTimeout, ShardUnavailable) as e:
        return _fail(str(e))
    keys = sorted(batch.keys(include_nested=True, leaves_only=True),
                  key=lambda k: k if isinstance(k, tuple) else (k,))
    for i in range(batch.batch_size[0]):
        index = batch["index"][i].reshape(-1)[:1].numpy()
        print(f"row {i}: shard {int(shard_of(index)[0])}, index {int(counter_of(index)[0])}")
        for key in keys:
            if key == "index":
                continue
            label = ".".join(key) if isinstance(key, tuple) else key
            print(f"  {label}: {_short(batch.get(key)[i])}")
    return 0


def _short(t: Any, limit: int = 8) -> str:
    flat = t.reshape(-1).tolist()
    text = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat[:limit])
    more = f", ... ({len(flat)} values, shape {list(t.shape)})" if len(flat) > limit else ""
    return f"[{text}{more}]" if t.ndim else text


# -- stop ----------------------------------------------------------------------------------

def stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="buffer name")
    parser.add_argument("--delete", action="store_true",
                        help="also delete the shards' directories (the data)")
    _address_argument(parser)


def stop(args: argparse.Namespace) -> int:
    """Stop a running buffer's shards; the data stays on disk unless --delete."""
    from rlfleet.buffer import BufferNotFound, ReplayService

    namespace = _namespace(args)
    _attach(args.address, args.connect_timeout, namespace)
    try:
        ReplayService.shutdown(args.name, namespace=namespace, delete=args.delete)
    except (BufferNotFound, ValueError) as e:
        return _fail(str(e))
    print(f"stopped {args.name!r}" + (" and deleted its data" if args.delete else
                                      " (data stays on disk; `rlfleet serve` reopens it)"))
    return 0
