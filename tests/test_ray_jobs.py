"""Runs sent to a shared cluster that does not have rlfleet installed.

A real second cluster (``ray start --head`` with token auth and its dashboard, see
``clusters.py``) runs on a Python that has every dependency of rlfleet but not rlfleet
itself: a venv whose only site entry is this venv's site-packages (a ``.pth`` line), so
rlfleet's own install, an editable finder activated by a ``.pth`` file of that
directory, does not load. What the cluster runs of rlfleet comes with the run:

- ``ray job submit`` through the Job Submission SDK, as README's "Ray Jobs" lines do it:
  the working dir holds the config and a wheel of rlfleet (``pip wheel --no-deps .``),
  installed by Ray's ``pip`` runtime env (the cluster's own packages are inherited, so
  only rlfleet is installed). While it runs, ``rlfleet status`` lists its buffer and
  actors; the job then succeeds.
- ``rlfleet run ... ray.address=HOST:PORT ray.runtime_env={...}`` from outside: the
  config key hands the same runtime env to ``ray.init``, so the actors import rlfleet.

Slow (CI's second step): the cluster and the runtime env take about a minute to set up.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters import TokenCluster

ROOT = Path(__file__).resolve().parent.parent
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
WHEEL = f"rlfleet-{VERSION}-py3-none-any.whl"
PIP_WHEEL = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/dist/" + WHEEL

pytestmark = pytest.mark.slow


def _python_without_rlfleet(where: Path) -> str:
    """A venv with this venv's packages on its path, rlfleet excepted (see the docstring)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = str(where / "bin" / "python")
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "rlfleet_test_base.pth").write_text(ours + "\n")
    probe = subprocess.run([python, "-c", "import ray, torch, tensordict, gymnasium\n"
                            "try:\n import rlfleet.buffer\nexcept ImportError: print('no rlfleet')"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "no rlfleet", probe.stdout + probe.stderr
    return python


@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory):
    """(cluster, working dir with configs/ and dist/<rlfleet wheel>)."""
    base = tmp_path_factory.mktemp("jobs")
    python = _python_without_rlfleet(base / "venv")
    work = base / "work"
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "smoke.yaml").write_text((ROOT / "configs" / "smoke.yaml").read_text())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(ROOT), "-w", str(work / "dist")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert (work / "dist" / WHEEL).is_file(), sorted(p.name for p in (work / "dist").iterdir())
    cluster = TokenCluster(python=python, dashboard=True)
    yield cluster, work
    cluster.stop()


# The SDK calls, in a process with the cluster's token (this session has its own Ray).
SUBMIT = r'''
import json, sys, time
from ray.job_submission import JobSubmissionClient
url, entrypoint, runtime_env = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = JobSubmissionClient(url)
deadline = time.monotonic() + 120
while True:  # the dashboard answers before its job agent has registered
    try:
        print(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env))
        break
    except RuntimeError as e:
        if "No available agent" not in str(e) or time.monotonic() > deadline:
            raise
        time.sleep(1)
'''

# Until `rlfleet status` shows the run (its shard, collector and learner running) or the
# job ends first: one process polls both, so a job that fails before it shows says why.
WATCH = r"""
import json, subprocess, sys, time
from ray.job_submission import JobSubmissionClient
url, job, address, prefix = sys.argv[1:5]
client = JobSubmissionClient(url)
deadline, polls, last = time.monotonic() + 420, 0, None
while time.monotonic() < deadline:
    state = client.get_job_status(job)
    if state.is_terminal():
        break
    polls += 1
    done = subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", "status", "--address", address, "--json"],
                          capture_output=True, text=True, timeout=180)
    if done.returncode == 0:
        last = json.loads(done.stdout)
        names = {c["component"] for c in last["components"]
                 if c["group"].startswith(prefix) and c["state"] == "running"}
        if {"shard-0", "collector-0", "learner-0"} <= names and last["buffers"]:
            print(json.dumps({"seen": last, "polls": polls}))
            sys.exit(0)
    else:
        last = done.stderr[-2000:]
    time.sleep(2)
print(json.dumps({"seen": None, "polls": polls, "job": str(client.get_job_status(job)), "last_status": last,
                  "logs": client.get_job_logs(job)[-6000:]}))
"""

# `ray job stop`, then the job's end state and its driver's log.
STOP = r"""
import json, sys, time
from ray.job_submission import JobSubmissionClient
url, job = sys.argv[1], sys.argv[2]
client = JobSubmissionClient(url)
client.stop_job(job)
deadline = time.monotonic() + 300
while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
    time.sleep(1)
print(json.dumps({"status": str(client.get_job_status(job)), "logs": client.get_job_logs(job)}))
"""


def _sdk(code: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def _status(cluster: TokenCluster) -> dict:
    done = subprocess.run([sys.executable, "-m", "rlfleet.launch.cli", "status", "--address", cluster.address,
                           "--json"], capture_output=True, text=True, env=cluster.env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_readme_names_the_wheel_this_version_builds():
    named = set(re.findall(r"dist/(rlfleet-[^\"]+\.whl)", (ROOT / "README.md").read_text()))
    assert named == {WHEEL}


def test_a_submitted_job_installs_rlfleet_runs_shows_in_status_and_ray_job_stop_ends_it_cleanly(bare_cluster,
                                                                                               tmp_path):
    cluster, work = bare_cluster
    runs = tmp_path / "runs"
    entrypoint = (f"python -m rlfleet.launch.cli run configs/smoke.yaml ray.address=auto name=jobsmoke "
                  f"run.dir={runs} run.total_frames=100000000 run.time_limit_s=1800 --plain")
    # Ray gives a stopped job 3 s before SIGKILL; a run needs longer to write its summary.
    runtime_env = {"working_dir": str(work), "pip": [PIP_WHEEL], "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}
    job = _sdk(SUBMIT, cluster.dashboard_url, entrypoint, json.dumps(runtime_env), env=cluster.env)
    assert job.startswith("raysubmit_"), job

    # While it runs, `rlfleet status` lists its buffer and its actors, running.
    watched = json.loads(_sdk(WATCH, cluster.dashboard_url, job, cluster.address, "jobsmoke-", env=cluster.env))
    assert watched["seen"] is not None, (
        f"rlfleet status did not show the run's shard, collector and learner in {watched['polls']} polls; "
        f"the job is {watched['job']}; last status: {watched['last_status']}\njob log:\n{watched['logs']}")
    (buffer_name,) = watched["seen"]["buffers"]
    assert buffer_name.startswith("jobsmoke-")

    # `ray job stop` (SIGTERM to the driver) ends the run as Ctrl-C would: summary written, actors gone.
    result = json.loads(_sdk(STOP, cluster.dashboard_url, job, env=cluster.env))
    assert result["status"] == "STOPPED", result["logs"][-3000:]
    assert "run finished" in result["logs"] and "stopped by                   terminated" in result["logs"], (
        result["logs"][-3000:])
    (run_dir,) = runs.iterdir()
    assert run_dir.name == buffer_name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "terminated" and summary["frames"] > 0
    assert not [c for c in _status(cluster)["components"] if c["group"] == buffer_name and c["state"] == "running"]


def test_ray_runtime_env_carries_rlfleet_to_a_cluster_that_lacks_it(bare_cluster, tmp_path):
    cluster, work = bare_cluster
    runtime_env = json.dumps({"working_dir": str(work), "pip": [PIP_WHEEL]})
    done = subprocess.run(
        [sys.executable, "-m", "rlfleet.launch.cli", "run", str(work / "configs" / "smoke.yaml"),
         f"ray.address={cluster.address}", f"ray.runtime_env={runtime_env}", "name=envsmoke",
         f"run.dir={tmp_path / 'runs'}", "run.total_frames=1500", "--plain"],
        capture_output=True, text=True, env=cluster.env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "total_frames" and summary["frames"] >= 1500
