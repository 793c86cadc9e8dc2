"""The shell blocks of README.md's "Using rlfleet with ..." section run as written.

A block preceded by ``<!-- readme:sh -->`` is run with bash (``-euo pipefail``), the blocks
in README order in one fresh directory that holds what a clone gives (a copy of
``configs/``), with this venv's ``bin`` first on ``PATH`` as an activated venv has it. So
the first block's run directory (``runs/smoke-*``) is what the next block exports.
Afterwards, what the blocks say they make is checked: TensorBoard event files and an
offline W&B run in the run directory, a Minari dataset, Hugging Face shards, and an
imported buffer with as many rows as the export wrote.

Slow (CI's second step): one smoke run and two exports, about a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SH_BLOCK = re.compile(r"<!-- readme:sh -->\n```bash\n(.*?)^```\n", re.M | re.S)

pytestmark = pytest.mark.slow


def test_readme_has_its_shell_blocks():
    blocks = SH_BLOCK.findall(README)
    assert len(blocks) == 2
    assert "run.loggers=[tensorboard, wandb]" in blocks[0]
    assert "--format minari" in blocks[1] and "--format hf" in blocks[1] and "import-dataset" in blocks[1]


def test_every_shell_block_of_the_readme_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "MINARI_DATASETS_PATH")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    outputs = []
    for block in SH_BLOCK.findall(README):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README block:\n{block}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "Event statistics for tag return_mean" in outputs[0]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))

    # minari and hf export the same whole episodes; the minari block's load prints them
    exports = re.findall(r"^exported (\d+) episodes \((\d+) rows\) to (\S+) \((minari|hf)\)$", outputs[1], re.M)
    assert [(e[2], e[3]) for e in exports] == [("datasets/smoke-v0", "minari"), ("smoke-hf", "hf")], outputs[1]
    episodes, rows = int(exports[0][0]), int(exports[0][1])
    assert episodes > 0 and [(int(e[0]), int(e[1])) for e in exports] == [(episodes, rows)] * 2
    assert re.search(rf"^{episodes} episodes {rows} steps$", outputs[1], re.M), outputs[1]
    assert (tmp_path / "datasets" / "smoke-v0" / "data").is_dir()
    assert list((tmp_path / "smoke-hf").glob("data-*.arrow"))
    assert "buffer smoke-buffer: OK" in outputs[1]

    from rlfleet.buffer import ReplayBuffer

    rb = ReplayBuffer.open(tmp_path / "smoke-buffer")
    try:
        assert len(rb) == rows
        assert int((rb[:]["step"] == 0).sum()) == episodes  # whole episodes, each from step 0
    finally:
        rb.close()
