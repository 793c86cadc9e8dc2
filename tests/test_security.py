"""Security: names that try path traversal, tampered buffer metadata, checkpoints holding
pickled code, and a client without the cluster token. Each is refused with a clear
message, and a refused call writes nothing.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rlfleet.buffer import BufferFormatError, ReplayBuffer, ReplayService, SchemaMismatch
from rlfleet.buffer.check import check_buffer
from rlfleet.launch.config import ConfigError, parse_config
from rlfleet.launch.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

BAD_NAMES = [
    pytest.param("..", id="dotdot"),
    pytest.param("../escape", id="parent"),
    pytest.param("a/../../b", id="nested-parent"),
    pytest.param("a/b", id="slash"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("a\0b", id="nul"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("x" * 65, id="too-long"),
    pytest.param("x" * 5000, id="very-long"),
    pytest.param("", id="empty"),
    pytest.param(".hidden", id="leading-dot"),
]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (what 'nothing written' compares)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("name", BAD_NAMES)
def test_buffer_names_that_try_path_traversal_are_refused(tmp_path, name):
    # validated before Ray is touched, so no cluster is needed to refuse them
    with pytest.raises(ValueError, match=r"buffer name = .*: use 1-64 letters, digits"):
        ReplayService.launch(name, tmp_path / "svc", capacity=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", BAD_NAMES)
def test_run_names_that_try_path_traversal_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=r"name = .*: use 1-64 letters, digits"):
        parse_config(json.dumps({"name": name}))
    with pytest.raises(ConfigError, match=r"name = .*: use 1-64 letters, digits"):
        parse_config("", [f"name={json.dumps(name)}"])
    with pytest.raises(ValueError, match=r"run name = .*: use 1-64 letters, digits"):
        RunDir.create(tmp_path / "runs", name)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["runs"])


@pytest.mark.parametrize("key", ["..", "a/b", "../../escape", "", "a\0b", "x" * 300, "c:d", "%2e"])
def test_batch_keys_that_cannot_name_a_file_are_refused(tmp_path, key):
    with ReplayBuffer.create(tmp_path / "b", capacity=4) as rb:
        before = tree(tmp_path)
        with pytest.raises(SchemaMismatch, match=r"which cannot name a data file; key parts must"):
            rb.extend_arrays({("next", key): np.arange(2)})
        assert rb.schema is None and tree(tmp_path) == before
        assert not (tmp_path / "b" / "data").exists()
        rb.extend_arrays({("next", "ok"): np.arange(2)})  # the buffer still takes a good batch
        assert len(rb) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# --------------------------------------------------------------------------- meta.json

@pytest.fixture
def stored(tmp_path):
    path = tmp_path / "b"
    with ReplayBuffer.create(path, capacity=16, sampler="prioritized") as rb:
        rb.extend_arrays({("x",): np.arange(20), ("next", "o"): np.ones((20, 3), np.float32)})
    return path, json.loads((path / "meta.json").read_text())


def _with(meta: dict, **changes) -> dict:
    out = dict(meta)
    for k, v in changes.items():
        if v is ...:
            del out[k]
        else:
            out[k] = v
    return out


def _schema_with(meta: dict, **entry) -> dict:
    schema = [dict(meta["schema"][0], **entry)] + meta["schema"][1:]
    return dict(meta, schema=schema)


TAMPERED = {
    "capacity-string": (lambda m: _with(m, capacity="16"), r"field 'capacity'='16' must be null or an integer"),
    "capacity-negative": (lambda m: _with(m, capacity=-5), r"field 'capacity'=-5 must be null or an integer"),
    "capacity-huge": (lambda m: _with(m, capacity=2**80), r"field 'capacity'=\d+ must be null or an integer in \[1, 2\*\*44\)"),
    "capacity-float": (lambda m: _with(m, capacity=16.5), r"field 'capacity'=16.5"),
    "capacity-smaller": (lambda m: _with(m, capacity=2), r"data file .*x.memmap is missing or not 16 bytes"),
    "capacity-larger": (lambda m: _with(m, capacity=10**6), r"data file .*x.memmap is missing or not 8000000 bytes"),
    "capacity-missing": (lambda m: _with(m, capacity=...), r"lacks 'capacity'; the buffer directory is damaged"),
    "sampler-string": (lambda m: _with(m, sampler="prioritized"), r"field 'sampler'='prioritized' must be a mapping"),
    "sampler-unknown": (lambda m: _with(m, sampler={"type": "evil"}), r"field 'sampler'=.* is not a valid sampler \(sampler type 'evil' is unknown"),
    "sampler-negative-alpha": (lambda m: _with(m, sampler={"type": "prioritized", "alpha": -1, "beta": 0.4}), r"sampler alpha=-1: must be a finite number >= 0"),
    "durability-wrong": (lambda m: _with(m, durability="never"), r"field 'durability'='never' must be 'process' or 'fsync'"),
    "overcommit-string": (lambda m: _with(m, overcommit="yes"), r"field 'overcommit'='yes' must be true or false"),
    "version-negative": (lambda m: _with(m, format_version=-1), r"field 'format_version'=-1 must be an integer >= 1"),
    "version-newer": (lambda m: _with(m, format_version=7), r"format version 7; this rlfleet reads versions up to 2"),
    "format-other": (lambda m: _with(m, format="pickle"), r"is not an rlfleet buffer's meta.json \(format is 'pickle'"),
    "schema-string": (lambda m: _with(m, schema="x"), r"field 'schema' must be null or a non-empty list"),
    "schema-object-dtype": (lambda m: _schema_with(m, dtype="|O"), r"has the dtype '\|O' for key \['x'\]: not a bool, int or float"),
    "schema-negative-shape": (lambda m: _schema_with(m, shape=[-1]), r"has the shape \[-1\] for key \['x'\]"),
    "schema-traversal-key": (lambda m: _schema_with(m, key=["..", "..", "x"]), r"has the key \['..', '..', 'x'\]: not a list of safe file names"),
    "schema-absolute-key": (lambda m: _schema_with(m, key=["/etc/passwd"]), r"has the key \['/etc/passwd'\]"),
    "schema-missing-field": (lambda m: _with(m, schema=[{"key": ["x"]}]), r"has the entry \{'key': \['x'\]\}, not \{key, shape, dtype\}"),
    "list": (lambda m: [m], r"is not an rlfleet buffer's meta.json \(format is None"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_meta_json_is_refused_naming_the_file_and_nothing_is_written(stored, case):
    path, meta = stored
    change, message = TAMPERED[case]
    (path / "meta.json").write_text(json.dumps(change(meta)))
    before = tree(path)
    with pytest.raises(BufferFormatError, match=message) as err:
        ReplayBuffer.open(path)
    assert str(path) in str(err.value)  # names the file (or the directory, for a version)
    assert tree(path) == before
    report = check_buffer(path)  # `rlfleet check` reports it instead of crashing
    assert not report.ok
    assert tree(path) == before


@pytest.mark.parametrize("damage", ["truncated-half", "not-json", "binary", "empty"])
def test_truncated_or_garbled_meta_json_is_refused(stored, damage):
    path, _ = stored
    text = (path / "meta.json").read_bytes()
    data = {"truncated-half": text[: len(text) // 2], "not-json": b"schema: [x]\n",
            "binary": bytes(range(256)), "empty": b""}[damage]
    (path / "meta.json").write_bytes(data)
    before = tree(path)
    with pytest.raises(BufferFormatError, match=r"meta.json is not valid JSON"):
        ReplayBuffer.open(path)
    assert tree(path) == before


def test_symlinked_meta_json_and_header_are_refused(stored, tmp_path):
    path, meta = stored
    with ReplayBuffer.create(tmp_path / "other", capacity=16, sampler="prioritized") as rb:
        rb.extend_arrays({("x",): np.arange(3), ("next", "o"): np.ones((3, 3), np.float32)})
    (path / "meta.json").unlink()
    (path / "meta.json").symlink_to(tmp_path / "other" / "meta.json")
    before, other = tree(path), tree(tmp_path / "other")
    with pytest.raises(BufferFormatError, match=r"meta.json is a symbolic link; a buffer directory holds its own"):
        ReplayBuffer.open(path)
    with pytest.raises(BufferFormatError, match=r"symbolic link"):
        ReplayBuffer.open(path, sampler="uniform")  # would rewrite meta.json: refused first
    assert tree(path) == before and tree(tmp_path / "other") == other
    (path / "meta.json").unlink()
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "header.bin").rename(tmp_path / "header.elsewhere")
    (path / "header.bin").symlink_to(tmp_path / "header.elsewhere")
    with pytest.raises(BufferFormatError, match=r"header .*header.bin is a symbolic link"):
        ReplayBuffer.open(path)


def test_tampered_window_is_not_repaired_before_the_files_check_out(stored):
    """A meta.json that shrinks the capacity below the stored window must not make open
    rewrite the header's window before it finds that the data files do not match."""
    path, meta = stored
    (path / "meta.json").write_text(json.dumps(_with(meta, capacity=4)))
    header = (path / "header.bin").read_bytes()
    with pytest.raises(BufferFormatError, match=r"data file .* is missing or not 32 bytes"):
        ReplayBuffer.open(path)
    assert (path / "header.bin").read_bytes() == header


# --------------------------------------------------------------------------- checkpoints

class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: code execution from a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_holding_pickled_code_is_refused(tmp_path):
    from rlfleet.launch.export import load_policy_state

    marker = tmp_path / "pwned"
    run_dir = RunDir.create(tmp_path / "runs", "sec")
    torch.save({"weight": torch.zeros(2), "evil": _Payload(str(marker))}, run_dir.policy_state_path)
    # the file really carries code: a plain pickle load would run it
    assert b"touch" in run_dir.policy_state_path.read_bytes()
    with pytest.raises(pickle.UnpicklingError, match=r"policy_state.pt' holds more than a state_dict .*Weights only load failed.*nothing in it ran"):
        load_policy_state(run_dir)
    assert not marker.exists()


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_in_the_library_is_weights_only():
    found = {}
    for package in ("buffer", "collector", "launch"):
        for f in sorted((REPO / package).rglob("*.py")):
            for line, safe in _torch_load_calls(f):
                found[f"{f.relative_to(REPO)}:{line}"] = safe
    assert found, "no torch.load call found: the scan is broken"
    assert [where for where, safe in found.items() if not safe] == []
    # and nothing reads pickles directly
    for package in ("buffer", "collector", "launch"):
        for f in sorted((REPO / package).rglob("*.py")):
            text = f.read_text()
            assert "pickle.load" not in text and "pickle.loads" not in text, f


# --------------------------------------------------------------------------- cluster token

@pytest.mark.parametrize("token", ["missing", pytest.param("wrong", marks=pytest.mark.slow)])
def test_a_client_without_the_cluster_token_is_refused(ray_cluster, tmp_path, token):
    """A process joining the cluster without its token (or with another) gets a
    ClusterConnectError (a ConnectionError) that says to set the token, within the subprocess timeout. A wrong
    token surfaces only after Ray's connect retries (about a minute): slow."""
    home = tmp_path / "home"  # an empty home: no ~/.ray/auth_token
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token",
               RAY_ADDRESS=ray_cluster.address_info["address"])
    if token == "wrong":
        env["RAY_AUTH_TOKEN"] = "0" * 32
    script = textwrap.dedent("""
        from rlfleet.buffer import BufferClient
        try:
            BufferClient.connect("anything", timeout_s=20)
        except Exception as e:
            print("REFUSED", type(e).__name__, str(e).replace("\\n", " "))
        else:
            print("CONNECTED")
    """)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=180, cwd=tmp_path)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("REFUSED", "CONNECTED"))]
    assert lines and lines[-1].startswith("REFUSED ClusterConnectError"), (out.stdout[-2000:], out.stderr[-3000:])
    assert "token" in lines[-1] and "RAY_AUTH_TOKEN" in lines[-1] and "auth_token" in lines[-1]
