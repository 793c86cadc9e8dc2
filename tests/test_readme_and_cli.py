"""README's two commands and the command line stay true.

CI runs the README blocks marked `<!-- ci:test -->` and `<!-- ci:run -->` verbatim
(`.ci/run` extracts them), so here we check that they exist, name files that exist, and
that the README's command table matches the commands `rlfleet` really has.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from rlfleet.launch.cli import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(marker: str) -> list[str]:
    after = README.split(f"<!-- ci:{marker} -->\n", 1)[1]
    body = after.split("```", 2)[1]
    return [line for line in body.splitlines()[1:] if line.strip()]


def test_readme_test_command_installs_pinned_torch_then_the_project_and_runs_pytest():
    lines = _block("test")
    assert lines[0].startswith("python3 -m venv .venv")
    assert "pip install torch==2.13.0" in lines[1]
    assert 'pip install -e ".[test]"' in lines[1]
    assert lines[-1].startswith("python -m pytest")


def test_readme_run_command_runs_a_config_that_exists():
    lines = _block("run")
    assert "pip install torch==2.13.0" in lines[1]
    match = re.fullmatch(r"rlfleet run (\S+)", lines[-1])
    assert match, lines[-1]
    assert (ROOT / match.group(1)).is_file(), match.group(1)


def test_ci_script_runs_the_readme_blocks():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'readme_block test' in ci and 'readme_block run' in ci


def test_readme_command_table_matches_the_cli():
    documented = set(re.findall(r"^\| `rlfleet ([\w-]+)", README, flags=re.M))
    assert documented == set(COMMANDS)


def _rlfleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlfleet.launch.cli", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_cli_help_lists_every_command():
    out = _rlfleet("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", out.stdout, flags=re.M), name


def test_cli_unknown_command_is_refused_with_choices():
    out = _rlfleet("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr


def test_cli_prints_its_version():
    from importlib import metadata

    out = _rlfleet("--version")
    assert out.returncode == 0
    assert out.stdout == f"rlfleet {metadata.version('rlfleet')}\n"


def test_readme_command_table_says_which_commands_need_a_running_cluster():
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `rlfleet ([\w-]+)[^|]*\|[^|]*\| ([^|]+) \|$", README, flags=re.M)}
    assert set(rows) == set(COMMANDS)
    assert {name for name, ray in rows.items() if ray == "a running cluster"} == {"serve", "status", "sample", "stop"}
    assert rows["run"].startswith("its own embedded Ray")
