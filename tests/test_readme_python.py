"""Every Python block of README.md runs as written.

The blocks are taken from README.md the way ``.ci/run`` takes its shell blocks, and run
as a user reads them: top to bottom in one fresh Python process, in a new directory
that holds what a clone of this repository gives (a copy of ``configs/``); the README's
own first block sets up the rest (``path``, ``transitions``). A block preceded by
``<!-- readme:file NAME -->`` is a file the reader writes (an env, a network, a config),
not code for the session: it is written to NAME, and the config among them is loaded
and its env and network built from that directory, as ``rlfleet run`` would before
starting anything (``tests/test_run_user_code.py`` runs the same kind of files through
``rlfleet run``, ``--resume`` and ``rlfleet export``). A block preceded by
``<!-- readme:torchrl -->`` needs the ``[torchrl]`` extra and runs in
``tests/test_torchrl_interop.py`` instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
FILE_MARKER = re.compile(r"<!-- readme:file (\S+) -->\s*$")
TORCHRL_MARKER = re.compile(r"<!-- readme:torchrl -->\s*$")


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, file name or None)`` of every fenced block, in order."""
    blocks = []
    for match in FENCE.finditer(README):
        line = README.count("\n", 0, match.start()) + 1
        before = README[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if TORCHRL_MARKER.search(before):
            continue  # needs the [torchrl] extra: tests/test_torchrl_interop.py runs it
        marker = FILE_MARKER.search(before)
        blocks.append((line, match.group(1), match.group(2), marker.group(1) if marker else None))
    return blocks


# Runs the session's blocks in one namespace; a failure names the block's README line.
DRIVER = r'''
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for line, code in blocks:
    try:
        exec(compile(code, f"README.md block at line {line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"README.md: the Python block at line {line} failed", file=sys.stderr)
        sys.exit(1)
    print(f"README.md block at line {line}: ok", flush=True)
'''


def test_readme_has_the_blocks_this_test_runs():
    blocks = readme_blocks()
    session = [b for b in blocks if b[1] == "python" and b[3] is None]
    files = sorted(b[3] for b in blocks if b[3] is not None)
    assert len(session) >= 6
    assert files == ["corridor.yaml", "my_corridor.py", "my_nets.py"]
    assert "path = tempfile.mkdtemp()" in session[0][2]


def test_every_python_block_of_the_readme_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    session = [(line, code) for line, language, code, name in readme_blocks() if language == "python" and name is None]
    (tmp_path / "blocks.json").write_text(json.dumps(session))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "driver.py", "blocks.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    # (searched, not split by lines: Ray's own messages may share a line with ours)
    ran = [int(line) for line in re.findall(r"README\.md block at line (\d+): ok", done.stdout)]
    assert ran == [line for line, _ in session]
    assert re.search(r"^1024$", done.stdout, flags=re.M)  # the service block's print of the client's size


def test_the_readme_env_and_network_files_fit_together(tmp_path, monkeypatch):
    from rlfleet.collector.envs import make_env
    from rlfleet.collector.policies import build_policy
    from rlfleet.launch import load_config

    for _, _, code, name in readme_blocks():
        if name is not None:
            (tmp_path / name).write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for module in ("my_corridor", "my_nets"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    config = load_config("corridor.yaml")
    env = make_env(config.env, seed=0)
    net = build_policy(config.policy, env.observation_space, env.action_space)
    import torch

    obs, _ = env.reset(seed=0)
    assert net(torch.as_tensor(obs[None])).shape == (1, 2)
    assert env.step(1)[0].tolist() == pytest.approx([0.2])
