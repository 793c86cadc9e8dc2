"""A second Ray cluster for tests that join one on purpose: ``ray start --head --block``
with token authentication, in a temp dir of its own (so nothing else on the machine finds
it by accident), stopped by its own processes only (never ``ray stop``, which would end
every Ray on the machine, this test session's included).

Used by ``test_cluster_connect.py`` (joining, tokens) and ``test_ray_jobs.py`` (the Job
Submission SDK, which needs the dashboard, and a cluster whose Python lacks rlfleet).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN = "0123456789abcdef" * 2
START_CLUSTER_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without_ray(**extra: str) -> dict[str, str]:
    """This environment without Ray's address and auth settings, plus ``extra``."""
    drop = {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _wait_for_port(port: int, proc: subprocess.Popen, deadline: float) -> bool:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.2)


class TokenCluster:
    """``ray start --head --block`` with token auth in a temp dir of its own (the test's).

    Args:
        python: the interpreter whose Ray runs the cluster (its workers and job drivers
            use it too); this test session's by default.
        dashboard: start the dashboard (the Job Submission SDK talks to it) on a free port,
            ``dashboard_url`` then names it.
    """

    def __init__(self, python: str = sys.executable, dashboard: bool = False) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rlf")  # short: Ray's socket paths live under it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # PATH as an activated venv has it: a job's entrypoint (`rlfleet run ...`) finds
        # the console scripts of the cluster's Python.
        bin_dir = str(Path(python).parent)
        self.env = env_without_ray(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN,
                        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
        args = [python, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={self.port}",
                f"--temp-dir={self.temp_dir}", "--num-cpus=2", "--disable-usage-stats"]
        self.dashboard_url = None
        if dashboard:
            dashboard_port = free_port()
            self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
            # The agents' fixed default ports (52365, ...) are taken when this session's
            # own Ray runs: an agent that cannot bind dies, and the job server then says
            # "No available agent" to every submission.
            args += [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                     f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        else:
            args += ["--include-dashboard=false"]
        self.proc = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + START_CLUSTER_S
        up = _wait_for_port(self.port, self.proc, deadline)
        if up and dashboard:
            up = _wait_for_port(dashboard_port, self.proc, deadline)
        if not up:
            self.stop()
            raise RuntimeError(f"ray start --head on port {self.port} did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block drains and stops its processes
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Whatever of ours outlived it (its processes name the temp dir): end it by pid.
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir in cmdline:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
