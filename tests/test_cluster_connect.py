"""Joining Ray: every entry point gives up within its bound and says why (``init_ray``).

Real parts only: a dead port, a port where something listens that is not Ray, and a real
second Ray cluster started with ``ray start --head --block`` and token authentication
(its own temp dir, so nothing else on the machine finds it by accident). Each case runs in
a fresh process, as a user's command would: this test session may hold its own Ray.
Every bound is the code's own timeout; the tests only check what the error says.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet.buffer.cluster import version_mismatch

from clusters import TOKEN, TokenCluster, env_without_ray, free_port

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def _rlfleet(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


# Every entry point against one address, in one process (none of them initialises Ray
# when the join fails). Prints {entry point: "ExceptionType: message" or exit code + stderr}.
ENTRY_POINTS = r'''
import contextlib, io, json, sys
from rlfleet.buffer import BufferClient, ReplayService
from rlfleet.launch.cli import main

address, timeout = sys.argv[1], sys.argv[2]
out = {}
for name in ("status", "sample", "stop"):
    argv = {"status": ["status"], "sample": ["sample", "buf"], "stop": ["stop", "buf"]}[name]
    argv += ["--address", address, "--connect-timeout", timeout] if address != "-" else []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code, text = 1, str(e.code)
            err.write(text + "\n")
    out[name] = [code, err.getvalue().strip()]
try:
    BufferClient.connect("buf", address=None if address == "-" else address, timeout_s=float(timeout))
    out["connect"] = "joined"
except Exception as e:
    out["connect"] = f"{type(e).__name__}: {e}"
try:
    ReplayService.launch("buf", "buffer-dir", 100)
    out["launch"] = "launched"
except Exception as e:
    out["launch"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
'''

START_ONE = (
    "start one with `RAY_AUTH_MODE=token ray start --head` (it prints the address; the token "
    "is in ~/.ray/auth_token), or check the address"
)


def test_a_dead_address_fails_at_once_naming_the_address_at_every_entry_point(tmp_path):
    port = free_port()  # bound and released: nothing listens there
    address = f"127.0.0.1:{port}"
    done = _python(ENTRY_POINTS, address, "5", env=env_without_ray(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    message = f"could not join the Ray cluster at '{address}': nothing listens on {address} (connection refused); {START_ONE}"
    for name in ("status", "sample", "stop"):
        assert out[name] == [1, f"error: {message}"], name
    assert out["connect"] == f"ClusterConnectError: {message}"
    # launch has no address of its own: RAY_ADDRESS or nothing (see the next test)
    assert out["launch"].startswith("ClusterConnectError: no Ray cluster address")


def test_no_address_is_refused_instead_of_joining_whatever_runs_here(tmp_path):
    done = _python(ENTRY_POINTS, "-", "5", env=env_without_ray(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    message = (
        "no Ray cluster address: Ray is not initialised in this process and RAY_ADDRESS is "
        "not set. Name the cluster: --address HOST:PORT (or address='HOST:PORT'), "
        "RAY_ADDRESS=HOST:PORT, or 'auto' for the cluster `ray start` started on this machine; "
        f"{START_ONE}. In Python, ray.init(address=...) first also works"
    )
    assert out["status"] == [1, f"error: {message}"]
    assert out["connect"] == f"ClusterConnectError: {message}"
    assert out["launch"] == f"ClusterConnectError: {message}"


def test_a_port_that_is_not_ray_fails_within_connect_timeout(tmp_path):
    # Something accepts connections and never answers: Ray's own client would wait ~40 s
    # per try; the bound is --connect-timeout.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        done = _rlfleet("status", "--address", address, "--connect-timeout", "2", env=env_without_ray(), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: could not join the Ray cluster at '{address}': something listens on {address} but "
        "no Ray GCS answered within timeout_s=2; is it the head's GCS port (6379 by default; "
        "`ray start --head` prints it)? A busy head may need a longer timeout "
        "(ray.connect_timeout_s, --connect-timeout)"
    )


def test_run_with_a_dead_ray_address_fails_before_leaving_a_run_directory(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    done = _rlfleet("run", str(ROOT / "configs" / "smoke.yaml"), f"run.dir={tmp_path / 'runs'}",
                    f"ray.address={address}", "--connect-timeout", "5", env=env_without_ray(), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"rlfleet run: ClusterConnectError: could not join the Ray cluster at '{address}': "
        f"nothing listens on {address} (connection refused); {START_ONE}"
    )
    assert list((tmp_path / "runs").iterdir()) == []  # the run's directory was taken back


@pytest.mark.parametrize(
    "address, message",
    [
        ("http://127.0.0.1:8265", "Ray address 'http://127.0.0.1:8265': give the head's GCS address HOST:PORT"),
        ("127.0.0.1", "Ray address '127.0.0.1': expected HOST:PORT (the head's GCS port, 6379 by default)"),
    ],
)
def test_a_malformed_address_is_refused_before_any_connection(tmp_path, address, message):
    done = _rlfleet("status", "--address", address, env=env_without_ray(), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"error: {message}")


def test_version_mismatch_names_both_sides():
    import platform

    import ray

    here = {"ray_version": ray.__version__, "python_version": platform.python_version()}
    assert version_mismatch(here) is None
    other = dict(here, ray_version="2.9.0")
    assert version_mismatch(other) == (
        f"version mismatch: the cluster runs Ray 2.9.0 on Python {here['python_version']}, this "
        f"process has Ray {ray.__version__} on Python {here['python_version']}; run both with the "
        "same Ray and Python versions (same virtual environment or image)"
    )
    assert "on Python 2.7.18" in version_mismatch(dict(here, python_version="2.7.18"))


# --------------------------------------------------------------------------- a second cluster


@pytest.fixture(scope="module")
def token_cluster():
    cluster = TokenCluster()
    yield cluster
    cluster.stop()


def _token_message(address: str, why: str, fix: str) -> str:
    return (
        f"error: could not join the Ray cluster at '{address}': the cluster refused this process's "
        f"auth token ({why}). {fix} this process the cluster's token: RAY_AUTH_TOKEN=<token>, or the "
        "file ~/.ray/auth_token (RAY_AUTH_TOKEN_PATH for another file); `ray get-auth-token` on the "
        "head prints it"
    )


def test_a_wrong_token_is_reported_as_a_token_problem(token_cluster, tmp_path):
    wrong = env_without_ray(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="f" * 32)
    done = _rlfleet("status", "--address", token_cluster.address, "--connect-timeout", "20", env=wrong, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == _token_message(
        token_cluster.address, "its token differs from the cluster's", "Give")

    no_mode = env_without_ray(RAY_AUTH_TOKEN=TOKEN)  # the token, but token mode not turned on
    done = _rlfleet("status", "--address", token_cluster.address, "--connect-timeout", "20", env=no_mode, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == _token_message(
        token_cluster.address, "RAY_AUTH_MODE is not set here", "Export RAY_AUTH_MODE=token and give")


@pytest.mark.slow
def test_serve_says_which_cluster_it_joined_and_where_the_data_is(token_cluster, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"name: joined\nbuffer: {{path: {tmp_path / 'a'}, capacity: 100}}\n")
    env = token_cluster.env
    served = _rlfleet("serve", str(config), "--address", token_cluster.address, env=env, cwd=tmp_path)
    assert served.returncode == 0, served.stderr
    assert "joined the Ray cluster at " in served.stderr and "(1 node)" in served.stderr
    assert f"replay service 'joined': 1 shard(s) under {tmp_path / 'a'}" in served.stdout
    # serving it again from another directory would report a path the data is not in
    again = _rlfleet("serve", str(config), f"buffer.path={tmp_path / 'b'}", "--address", token_cluster.address,
                     env=env, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: buffer 'joined' already runs with its data under {tmp_path / 'a'}, not under "
        f"{tmp_path / 'b'}; stop it first (`rlfleet stop joined`) to serve it from {tmp_path / 'b'}, "
        f"or set buffer.path={tmp_path / 'a'}"
    )
    stopped = _rlfleet("stop", "joined", "--address", token_cluster.address, env=env, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped 'joined'" in stopped.stdout


LIST_ACTORS = r'''
import json, ray
ray.init(address=__import__("sys").argv[1], log_to_driver=False)
print(json.dumps(sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True))))
'''


@pytest.mark.slow
def test_run_with_no_address_starts_its_own_ray_even_with_another_cluster_named(token_cluster, tmp_path):
    # RAY_ADDRESS names the second cluster (as a `ray start` shell leaves it): `rlfleet run`
    # with ray.address null must not write its buffer into it.
    env = dict(token_cluster.env, RAY_ADDRESS=token_cluster.address)
    done = _rlfleet("run", str(ROOT / "configs" / "smoke.yaml"), f"run.dir={tmp_path / 'runs'}",
                    "run.total_frames=600", "--plain", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"RAY_ADDRESS={token_cluster.address} is set, but ray.address is null: this run starts its "
            "own embedded Ray") in done.stderr
    assert "started an embedded Ray at " in done.stderr
    actors = _python(LIST_ACTORS, token_cluster.address, env=token_cluster.env)
    assert actors.returncode == 0, actors.stderr
    assert json.loads(actors.stdout.splitlines()[-1]) == []
